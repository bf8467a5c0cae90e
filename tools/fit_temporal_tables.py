"""Fitting the temporal P-frame entropy model on a video: ``latentcast train temporal``.

::

    video ─► edge grounding (ROIs) ─► per rate point, the edge's own closed loop
             (proto.temporal.choose_motion and choose_modes, keyframe at the first frame) ─► mode counts per context,
             residual symbols per (rate point, context, class, channel)   [training frames only]
          ─► class edges = quartiles of the residual L1 norm; per (context, channel) the codec's
             Gaussian table that codes the residuals in the fewest bits ─► TemporalTables
          ─► <weights>/<codec>-temporal.safetensors (or --out), with the command, commit and data

Frames whose index is divisible by ``--every`` are held out (scored by ``latentcast eval`` and
``latentcast bench temporal``). The cloud decodes with the tables in ``models/temporal.py``; the edge
codes with them in ``edge/temporal.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from latentcast.proto.grid import transmit_mask
from latentcast.proto.temporal import (
    BGCODE,
    CODE,
    N_CLASSES,
    N_GROUP_CTX,
    N_MODE_CTX,
    N_RES_CTX,
    Motion,
    TemporalInfo,
    TemporalState,
    TemporalTables,
    box_cells,
    choose_modes,
    choose_motion,
    code_lengths,
    group_context,
)

log = logging.getLogger(__name__)

__all__ = ["fit_tables", "add_arguments", "main"]


def fit_tables(codec: Any, frames: Iterable[tuple[int, np.ndarray, list]], *, train: Callable[[int], bool],
               key_rate_point: int, bg_rate_point: int = 0, threshold: int = 1, bg_threshold: int = 8,
               motion: bool = True, progress=None) -> tuple[TemporalTables, dict]:
    """Fit :class:`TemporalTables` on a video: ``frames`` yields (index, RGB frame, ROI boxes in pixels);
    ``codec`` is a :class:`latentcast.models.codec.LatentCodec`.

    Every rate point runs its own closed loop over all frames (keyframe at the first frame); only
    frames with ``train(index)`` add to the statistics. The class edges are the quartiles of the coded
    cells' residual L1 norm at each rate point; then, per context, class and channel, the Gaussian
    table that codes the residuals in the fewest bits. ``motion``: the loop predicts coded cells from the moved
    latent as the edge's ``temporal.motion`` does (P_MC frames). The edge's ``temporal.rd`` test is not applied
    (it needs tables to price the cells): it only drops cells of small change, so the fit sees a few more."""
    n_rates, M = codec.n_rates, codec.M
    steps = codec.rate_deltas
    lengths, R = code_lengths(codec.y_tables)
    mode_counts = np.zeros((N_MODE_CTX, 4), dtype=np.int64)
    cells_by_rate: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(n_rates)]  # (group ctx, symbols)
    states: list[TemporalState | None] = [None] * n_rates
    n_train = 0
    for i, frame, boxes in frames:
        h, w = frame.shape[:2]
        y, z = codec.analyze(frame)
        roi = transmit_mask(w, h, boxes, True)
        use = bool(train(i))
        n_train += use
        for q in range(n_rates):
            if states[q] is None:
                info = TemporalInfo(kind=0, frame_id=i, ref_id=i, key_id=i)
                _, y_hat = codec.compress_key(frame, rate_point=key_rate_point, temporal=info, analysis=(y, z))
                states[q] = TemporalState.from_key(y_hat, i)
                continue
            st = states[q]
            mv = choose_motion(st, y, roi, box_cells(boxes, roi.shape), step=steps[q]) if motion and boxes else None
            modes, sym = choose_modes(st, y, roi, step=steps[q], bg_step=steps[bg_rate_point], threshold=threshold,
                                      bg_threshold=bg_threshold, mv=mv)
            frame_motion = None if mv is None else Motion(cells=np.where((modes == CODE)[None], mv, 0))
            if use:
                np.add.at(mode_counts, (st.mode_context().ravel(), modes.ravel()), 1)
                for kind, cells in enumerate((modes == CODE, modes == BGCODE)):
                    if cells.any():
                        rq = q if kind == 0 else bg_rate_point
                        cells_by_rate[rq].append((group_context(st, cells, kind, rq),
                                                  np.clip(sym[:, cells], -R, R).astype(np.int16)))
            st.apply(modes, sym, step=steps[q], bg_step=steps[bg_rate_point], frame_id=i, motion=frame_motion)
        if progress is not None:
            progress.update(1)
    class_counts = np.zeros((n_rates * N_GROUP_CTX, N_CLASSES), dtype=np.int64)
    edges = np.zeros((n_rates, N_CLASSES - 1), dtype=np.int64)
    hist = np.zeros((n_rates * N_RES_CTX, M, 2 * R + 1), dtype=np.int64)
    for q, parts in enumerate(cells_by_rate):
        if not parts:
            edges[q] = np.arange(1, N_CLASSES)
            continue
        g = np.concatenate([p[0] for p in parts])
        v = np.concatenate([p[1] for p in parts], axis=1).astype(np.int64)  # (M, n)
        l1 = np.abs(v).sum(0)
        e = np.quantile(l1, np.arange(1, N_CLASSES) / N_CLASSES, method="lower").astype(np.int64) + 1
        edges[q] = np.maximum.accumulate(np.maximum(e, np.arange(1, N_CLASSES)))
        k = np.searchsorted(edges[q], l1, side="right")
        np.add.at(class_counts, (g, k), 1)
        ctx = q * N_RES_CTX + (g - q * N_GROUP_CTX) * N_CLASSES + k
        ch = np.broadcast_to(np.arange(M)[:, None], v.shape)
        np.add.at(hist, (np.broadcast_to(ctx[None], v.shape).ravel(), ch.ravel(), (v + R).ravel()), 1)
    # per (context, channel): the table with the fewest bits; unseen contexts: the channel's best overall
    cost = np.einsum("cmv,tv->cmt", hist.astype(np.float64), lengths)  # (ctx, M, tables)
    best = cost.argmin(-1)
    seen = hist.sum(-1) > 0
    pooled = np.einsum("mv,tv->mt", hist.sum(0).astype(np.float64), lengths).argmin(-1)
    res_scale = np.where(seen, best, pooled[None]).astype(np.int64)
    bits = float(np.take_along_axis(cost, best[..., None], -1).sum())
    stats = {"train_frames": n_train, "residual_symbols": int(hist.sum()), "residual_bits": round(bits),
             "class_edges": edges.tolist(), "mode_counts": mode_counts.tolist()}
    meta = {"key_rate_point": key_rate_point, "bg_rate_point": bg_rate_point, "threshold": threshold,
            "bg_threshold": bg_threshold, "motion": motion}
    return TemporalTables.from_counts(mode_counts, class_counts, edges, res_scale, meta=meta), stats


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``latentcast train temporal``."""
    p.add_argument("--codec", default="elic-lite",
                   help="the codec the tables are fitted for (shipped name or .safetensors; default elic-lite)")
    p.add_argument("--data", default="data/video/vtest.avi",
                   help="video to fit on (relative paths resolve against $LATENTCAST_SHARED, default ../shared; "
                        "default data/video/vtest.avi)")
    p.add_argument("--every", type=int, default=8, help="frames whose index is divisible by this are held out "
                                                        "(default 8)")
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    p.add_argument("--labels", default="person,vehicle,bicycle", help="task labels the edge grounds (ROIs)")
    p.add_argument("--key-rate-point", type=int, default=2, help="rate point of the keyframe (default 2)")
    p.add_argument("--bg-rate-point", type=int, default=0, help="rate point of background updates (default 0)")
    p.add_argument("--no-motion", dest="motion", action="store_false",
                   help="fit for P frames without motion vectors (the edge's temporal.motion: false)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", default=None,
                   help="tables file (default models/weights/<codec>-temporal.safetensors beside the shipped codec)")
    return p


def main(a: argparse.Namespace) -> int:
    """``latentcast train temporal``: fit the tables on ``--data`` and write them (prints their metadata)."""
    import torch
    from tqdm import tqdm

    from latentcast.detector import YoloxDetector
    from latentcast.edge.grounding import Grounder
    from latentcast.models.codec import LatentCodec
    from latentcast.models.temporal import default_tables_path
    from latentcast.shared import portable_path, shared_path
    from latentcast.tools import provenance
    from latentcast.tools.eval.data import video_clip

    torch.set_num_threads(a.threads)
    if a.every < 2:
        raise SystemExit(f"error: --every {a.every} must be >= 2 (frames divisible by it are held out)")
    path = Path(a.data)
    if not path.is_file():
        path = shared_path(a.data)
    codec = LatentCodec.load(a.codec)
    clip = video_clip(path, every=a.every, max_frames=a.max_frames)
    grounder = Grounder(labels=[s.strip() for s in a.labels.split(",") if s.strip()],
                        detector=YoloxDetector(score_threshold=0.3), every=5)

    def frames() -> Iterable[tuple[int, np.ndarray, list]]:
        for i, f in clip.frames():
            if a.max_frames is not None and i >= a.max_frames:
                return
            yield i, f, [(r.x0, r.y0, r.x1, r.y1) for r in grounder.update(f).rois]

    t0 = time.time()
    with tqdm(total=clip.n_frames, unit="frame", desc="fit temporal tables") as bar:
        tables, stats = fit_tables(codec, frames(), train=lambda i: i % a.every != 0, key_rate_point=a.key_rate_point,
                                   bg_rate_point=a.bg_rate_point, motion=a.motion, progress=bar)
    meta = dict(tables.meta, data=portable_path(path), held_out=f"frames with index % {a.every} == 0",
                frames=clip.n_frames, command=provenance.command(), commit=provenance.commit(),
                seconds=round(time.time() - t0, 1), **{k: v for k, v in stats.items() if k != "mode_counts"})
    tables = dataclasses.replace(tables, meta=meta)
    out = Path(a.out) if a.out else default_tables_path(codec)
    tables.save(out, weights_hash=codec.weights_hash)
    print(json.dumps({"out": portable_path(out), **meta}, indent=2))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise SystemExit(main(add_arguments(argparse.ArgumentParser(prog="python -m latentcast.tools.fit_temporal_tables",
                                                               description=__doc__.split("\n")[0])).parse_args()))
