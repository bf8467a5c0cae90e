"""``latentcast bench codec|stream|composer|grounding|hostile|temporal|serve``: one module per benchmark.

Each module has ``add_arguments(parser)`` (its options only, with their defaults) and ``main(args)``,
and runs on its own as ``python -m latentcast.tools.bench.<name>``. Every benchmark writes a JSON
result with the command, commit and machine (``tools/provenance.py``), and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import importlib
import logging

log = logging.getLogger(__name__)

__all__ = ["BENCHMARKS", "add_arguments", "main"]

#: subcommand -> (module under latentcast.tools.bench, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "codec": ("codec", "Kodak bpp/PSNR, ROI ratio, speed, JPEG/WebP in the same run"),
    "stream": ("stream", "N concurrent streams, edge + cloud on loopback, vs JPEG over gRPC"),
    "composer": ("composer", "seconds per frame of each composer (none, ControlNet)"),
    "grounding": ("grounding", "seconds per frame, YOLOX vs Grounding DINO"),
    "hostile": ("hostile", "a good stream's latency beside forged packets"),
    "temporal": ("temporal", "rate control and loss recovery of temporal coding on a video"),
    "serve": ("serve", "the same load through the embedded pipeline and Ray Serve stages"),
}


def main(args: argparse.Namespace) -> int:
    """Runs the benchmark the arguments name."""
    module = importlib.import_module(f"latentcast.tools.bench.{BENCHMARKS[args.bench][0]}")
    return module.main(args)


def add_arguments(b: argparse.ArgumentParser) -> None:
    """``bench <benchmark> [options]`` on the ``bench`` command's parser, each with its module's options."""
    bs = b.add_subparsers(dest="bench", required=True)
    for name, (module_name, text) in BENCHMARKS.items():
        module = importlib.import_module(f"latentcast.tools.bench.{module_name}")
        p = bs.add_parser(name, help=text, description=(module.__doc__ or text).split("\n")[0])
        module.add_arguments(p)
        p.set_defaults(func=main, prog="latentcast")
