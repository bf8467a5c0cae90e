"""The ``latentcast`` command: wires each subcommand to the module that owns its options and its work.

::

    latentcast encode IMAGE [--roi x0,y0,x1,y1 ...] [--labels person,car] [--rate 1] [--full] -o OUT.lcf
    latentcast decode IN.lcf -o OUT.png [--latent OUT.npy]                    tools/packet.py
    latentcast info IN.lcf
    latentcast export edge|grounding ...                                      tools/export.py
    latentcast train codec|composer|temporal|synthesis ...                    tools/train.py
    latentcast release codec|synthesis CHECKPOINT --out W.safetensors         tools/train.py
    latentcast bench codec|stream|composer|grounding|hostile|temporal ...     tools/bench/
    latentcast task new|show|list ...                                         tools/task.py
    latentcast edge --config edge.yaml [--task NAME] | cloud --config cloud.yaml | token new|hash
                                                                              tools/services.py
    latentcast dashboard --cloud HOST:PORT [--config dashboard.yaml]          tools/dashboard.py
    latentcast demo [VIDEO] [--dashboard]                                     tools/demo.py
    latentcast eval --data VIDEO|DIR|COCO.json --out DIR                      tools/eval/runner.py

``latentcast <command> --help`` lists a command's options. A command's options are declared only
when it runs (its module may import torch, which the edge does not have).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger("latentcast")

__all__ = ["COMMANDS", "build_parser", "main"]

#: command -> ("module:function" that declares its options and sets ``func``, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "encode": ("latentcast.tools.packet:add_encode_arguments",
               "encode an image (or a video's first frame) into a .lcf packet"),
    "decode": ("latentcast.tools.packet:add_decode_arguments", "decode a .lcf packet into an image"),
    "info": ("latentcast.tools.packet:add_info_arguments",
             "print a packet's header, ROI list, bytes per section and bpp"),
    "export": ("latentcast.tools.export:add_arguments",
               "export ONNX graphs: edge (the codec's encoder bundle) or grounding (Grounding DINO for the "
               "open-vocabulary edge backend)"),
    "train": ("latentcast.tools.train:add_arguments",
              "train the codec or the ControlNet composer (stage I then II; resumable), fit the temporal "
              "P-frame entropy model on a video, or train a cheaper synthesis g_s for the cloud"),
    "release": ("latentcast.tools.train:add_release_arguments",
                "freeze a training checkpoint into a codec or synthesis weight file"),
    "edge": ("latentcast.tools.services:add_edge_arguments",
             "run the edge service: capture, grounding, encoding, stream to the cloud"),
    "task": ("latentcast.tools.task:add_arguments",
             "task label lists: make one with an LLM (DISCOVER Algorithm 1), show, list"),
    "cloud": ("latentcast.tools.services:add_cloud_arguments",
              "run the cloud service: gRPC Stream/Subscribe, health+reflection, /metrics"),
    "token": ("latentcast.tools.services:add_token_arguments",
              "bearer tokens for the cloud's server.tokens_file: new (random token + its entry) or hash "
              "(the sha256 of a token read from stdin)"),
    "dashboard": ("latentcast.tools.dashboard:add_arguments",
                  "serve a live web page of a running cloud: every camera's frames with detections, bitrate, "
                  "fps, latency; a detections timeline"),
    "demo": ("latentcast.tools.demo:add_arguments",
             "edge + cloud on loopback over a video: live stats, side-by-side video, summary"),
    "bench": ("latentcast.tools.bench:add_arguments",
              "benchmarks: codec, stream, composer, grounding, hostile, temporal"),
    "eval": ("latentcast.tools.eval.runner:add_arguments",
             "rate vs task accuracy (mAP, top-1, PSNR, MS-SSIM, BD-rate) of latentcast and "
             "JPEG/WebP/x264/x265/downscaling on a video, image folder or COCO file"),
}


def _resolve(target: str) -> Callable[[argparse.ArgumentParser], Any]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


class _CommandParser(argparse.ArgumentParser):
    """A parser whose options are declared by ``declare`` the first time it parses or prints help."""

    def __init__(self, *args: Any, declare: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._declare = declare

    def _declared(self) -> None:
        if self._declare is not None:
            target, self._declare = self._declare, None
            _resolve(target)(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._declared()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._declared()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentcast", description="task-aware latent streaming, edge to cloud")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_CommandParser)
    for name, (target, text) in COMMANDS.items():
        sub.add_parser(name, help=text, description=text, declare=target)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, RuntimeError) as exc:  # bad input, missing files/weights, absent backends
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
