"""``latentcast export edge|grounding``: ONNX graphs for the edge.

- ``edge``: the codec's encoder bundle (analysis and entropy graphs, tables, manifest;
  ``models/export.py``), by default ``models/weights/<codec>.onnx/`` beside the shipped codec;
- ``grounding``: a Grounding DINO bundle for the open-vocabulary grounding backend (``tools/export_grounding.py``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["add_arguments", "export_edge", "main"]


def export_edge(a: argparse.Namespace) -> int:
    """``latentcast export edge``: write the bundle and print its folder."""
    from latentcast.models.codec import LatentCodec
    from latentcast.models.export import export_edge_bundle
    from latentcast.weights import weights_path

    codec = LatentCodec.load(a.weights or "elic-lite")
    out = Path(a.out) if a.out else weights_path(codec.codec_name, "edge-bundle")
    print(export_edge_bundle(codec, out, int8=a.int8))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    from latentcast.tools import export_grounding

    xs = p.add_subparsers(dest="export", required=True)
    e = xs.add_parser("edge", help="the codec's encoder bundle (ONNX + tables) for the edge")
    e.add_argument("--weights", help="codec weights (.safetensors); default: the shipped elic-lite")
    e.add_argument("--out", help="bundle folder; default: models/weights/<codec>.onnx")
    e.add_argument("--no-int8", dest="int8", action="store_false",
                   help="leave out the int8 analysis stages (they are calibrated on training images from the "
                        "shared data folder)")
    e.set_defaults(func=export_edge)
    g = xs.add_parser("grounding", help="Grounding DINO for the open-vocabulary edge backend")
    g.add_argument("--out", help="bundle folder; default: grounding/<model>-<task>")
    export_grounding.add_arguments(g)
    g.set_defaults(func=export_grounding.main)


def main(a: argparse.Namespace) -> int:
    """Runs the ``export`` subcommand the arguments name."""
    return a.func(a)
