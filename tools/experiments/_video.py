"""What the temporal experiments share: their common options and loading the video, codec and P-frame tables.

The scripts run as ``python tools/experiments/<script>.py``, so this folder is on ``sys.path``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def video_parser(doc: str, *, frames: int, out: str, frames_help: str) -> argparse.ArgumentParser:
    """--data (a video, default the shared vtest.avi), --frames, --threads, --out."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--data", default="data/video/vtest.avi", help="a video (default: the shared vtest.avi)")
    p.add_argument("--frames", type=int, default=frames, help=frames_help)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=out)
    return p


def load_video_codec(args: argparse.Namespace):
    """Set torch's threads; return (the video's path, the shipped elic-lite codec, its temporal tables)."""
    import torch

    from latentcast.models.codec import LatentCodec
    from latentcast.models.temporal import default_tables_path
    from latentcast.proto.temporal import TemporalTables
    from latentcast.shared import shared_path

    torch.set_num_threads(args.threads)
    path = Path(args.data) if Path(args.data).is_file() else shared_path(args.data)
    codec = LatentCodec.load("elic-lite")
    return path, codec, TemporalTables.load(default_tables_path(codec), weights_hash=codec.weights_hash)


def key_state(codec, frame, index: int, analysis, *, rate_point: int = 2):
    """The closed loop's start at a keyframe: (the TemporalState both ends hold after it, zero residuals)."""
    import numpy as np

    from latentcast.proto.temporal import TemporalInfo, TemporalState

    info = TemporalInfo(kind=0, frame_id=index, ref_id=index, key_id=index)
    _, y_hat = codec.compress_key(frame, rate_point=rate_point, temporal=info, analysis=analysis)
    return TemporalState.from_key(y_hat, index), np.zeros(y_hat.shape, dtype=np.int64)
