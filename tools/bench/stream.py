"""The options of ``latentcast bench stream``; the benchmark itself is ``tools/bench_stream.py``.

``tools/bench_stream.py`` is being rewritten by its owner; until it moves into this folder with its own
``add_arguments``, its options are declared here and its ``main(args)`` is called unchanged.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)

__all__ = ["add_arguments", "main"]


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from latentcast.cloud.config import CodecConfig
    from latentcast.tools.options import EDGE_CONFIG_HELP, add_dataclass_options, add_encoder_options

    p.add_argument("--streams", default="1,4,16",
                   help="concurrent camera streams per configuration, comma-separated (default 1,4,16)")
    p.add_argument("--seconds", type=float, default=20.0,
                   help="duration of each (system, streams) configuration in seconds (default 20)")
    p.add_argument("--warmup", type=float, default=2.0,
                   help="first seconds of each configuration not counted in rates and latency (default 2)")
    p.add_argument("--pace", type=float, default=10.0,
                   help="frames per second per camera, realtime pacing (default 10)")
    p.add_argument("--jpeg-quality", type=int, default=75,
                   help="JPEG quality of the JPEG-over-gRPC baseline (default 75)")
    p.add_argument("--systems", default="latentcast,latentcast-temporal,jpeg",
                   help="systems to run, comma-separated from latentcast,latentcast-temporal,jpeg (default all)")
    p.add_argument("--placement", choices=("processes", "shared"), default="processes",
                   help="processes (default): the cloud in one process and each camera's edge in its own, as they "
                        "are deployed; shared: all of them in this process (one interpreter lock)")
    p.add_argument("--video", help="video every camera reads (default vtest.avi in the shared folder)")
    p.add_argument("--rate", type=int, help="codec rate point of the edges (default: the edge config's, 1)")
    p.add_argument("--labels", help="task labels of the edges, e.g. person,car (default: the edge config's)")
    p.add_argument("--task", help="ground this task's label list instead of --labels (latentcast task list)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch, ONNX Runtime encoder and YOLOX threads on edge and cloud, which share this machine "
                        "(default 1: with the libraries' defaults they fight over the cores; 0 = leave them)")
    p.add_argument("--cloud-threads", type=int, default=None,
                   help="the cloud's torch and detector threads (default: --threads)")
    p.add_argument("--workers", type=int, default=None,
                   help="the cloud's worker threads (default: its config's, 0 = one per --cloud-threads cores)")
    p.add_argument("--weights", help="codec weights; default: the shipped elic-lite")
    p.add_argument("--bundle", help="edge bundle folder; default: the shipped one")
    p.add_argument("--tables", help="temporal P-frame tables of edge and cloud; default: the codec's shipped ones")
    add_dataclass_options(p, CodecConfig, include=("synthesis", "temporal_synthesis", "temporal_render",
                                                   "render_runtime"),
                          help_extra={"synthesis": "(codec.synthesis)",
                                      "temporal_synthesis": "(codec.temporal_synthesis)",
                                      "temporal_render": "(codec.temporal_render)",
                                      "render_runtime": "(codec.render_runtime)"})
    add_encoder_options(p)
    p.add_argument("--edge-config", default=None, help=f"latentcast-temporal: {EDGE_CONFIG_HELP}")
    p.add_argument("--out", default="results/stream_bench.json",
                   help="JSON result path, a .md table is written beside it (default results/stream_bench.json)")
    return p


def main(args: argparse.Namespace) -> int:
    from latentcast.tools.bench_stream import main as bench_stream_main

    return bench_stream_main(args)
