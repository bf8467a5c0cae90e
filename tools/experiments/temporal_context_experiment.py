"""Experiment: would richer contexts shrink the P-frame residual bits (issue 7)?

The shipped P-frame tables (``proto.temporal.TemporalTables``) pick each channel's Gaussian table from
(rate point, mode, coded last frame, cell class). This runs the edge's own closed loop over a video
(``choose_modes`` at one rate point, grounded ROIs, the shipped tables' classes), collects the CODE
cells of the training frames (index not divisible by 8, as ``latentcast train temporal``) and
compares the ideal code length of their residual symbols, each (context, channel) coded with its best
table from the codec's own Gaussian tables (escapes priced as the coder does), under:

- ``shipped``: the shipped contexts;
- ``+previous residual``: and min(|s|, 2) of the same channel of the cell in the previous frame;
- ``+first group``: and, for channels past the first group, min(nonzeros of the first group, 3);
- ``both``.

The numbers are code lengths of a fit on the same symbols (an upper bound of what new tables
would save), not bytes of a built coder.

    python tools/experiments/temporal_context_experiment.py --frames 300 \\
        --out results/temporal_context_experiment.json
"""

from __future__ import annotations

import numpy as np
from _video import key_state, load_video_codec, video_parser


def _fit_bits(v: np.ndarray, ctx: np.ndarray, lengths: np.ndarray, R: int) -> float:
    """Bits of symbols ``v`` (M, n) when each (channel, context) uses its cheapest table."""
    total = 0.0
    for m in range(v.shape[0]):
        for c in np.unique(ctx[m]):
            hist = np.bincount(v[m, ctx[m] == c] + R, minlength=2 * R + 1)
            total += float((lengths @ hist).min())
    return total


def main(argv: list[str] | None = None) -> int:

    from latentcast.detector import YoloxDetector
    from latentcast.proto.grid import transmit_mask
    from latentcast.proto.temporal import (
        BGCODE,
        CODE,
        cell_classes,
        choose_modes,
        code_lengths,
    )
    from latentcast.shared import portable_path
    from latentcast.tools import provenance
    from latentcast.tools.eval.data import video_clip
    from latentcast.tools.eval.learned import GroundingSettings, grounding_rois

    p = video_parser(__doc__, frames=300, out="results/temporal_context_experiment.json",
                     frames_help="run over the first N frames")
    p.add_argument("--rate", type=int, default=0, help="rate point of ROI cells (default 0)")
    a = p.parse_args(argv)
    path, codec, tables = load_video_codec(a)
    clip = video_clip(path, every=8, max_frames=a.frames)
    g = GroundingSettings(labels=("person", "vehicle", "bicycle"))
    rois = grounding_rois(clip, g, YoloxDetector(score_threshold=g.score_threshold), {}, every_frame=True)
    steps, q = codec.rate_deltas, a.rate
    lengths, R = code_lengths(codec.y_tables)
    parts: list[tuple[np.ndarray, ...]] = []
    st = prev = None
    for i, frame in clip.frames():
        if i >= clip.n_frames:
            break
        h, w = frame.shape[:2]
        y, z = codec.analyze(frame)
        if st is None:
            st, prev = key_state(codec, frame, i, (y, z))
            continue
        roi = transmit_mask(w, h, [(r.x0, r.y0, r.x1, r.y1) for r in rois[i]], True)
        modes, sym = choose_modes(st, y, roi, step=steps[q], bg_step=steps[0], threshold=1, bg_threshold=8)
        cells = modes == CODE
        if cells.any() and i % 8:
            v = sym[:, cells]
            parts.append((cell_classes(tables, v, q), st.coded[cells].astype(np.int64),
                          np.minimum(np.abs(prev[:, cells]), 2), np.clip(v, -R, R),
                          np.minimum((v[:codec.cfg.groups[0]] != 0).sum(0), 3)))
        st.apply(modes, sym, step=steps[q], bg_step=steps[0], frame_id=i)
        prev = np.where(((modes == CODE) | (modes == BGCODE))[None], sym, 0)
    k, coded, pm, v, g0 = (np.concatenate(x, axis=-1) for x in zip(*parts))
    n = v.shape[1]
    base = np.broadcast_to((k * 2 + coded)[None], v.shape)
    later = np.arange(v.shape[0])[:, None] >= codec.cfg.groups[0]
    variants = {"shipped": base, "+previous residual": base * 3 + pm,
                "+first group": np.where(later, base * 4 + g0[None], base * 4),
                "both": np.where(later, (base * 3 + pm) * 4 + g0[None], (base * 3 + pm) * 4)}
    bits = {name: _fit_bits(v, ctx, lengths, R) for name, ctx in variants.items()}
    rows = [
        {"contexts": name, "bits_per_cell": b / n, "vs_shipped": b / bits["shipped"] - 1} for name, b in bits.items()
    ]
    result = {"command": provenance.command("python tools/experiments/temporal_context_experiment.py"),
              "commit": provenance.commit(), "machine": provenance.machine(),
              "data": f"{portable_path(path)}, first {clip.n_frames} frames, CODE cells of frames not divisible by 8",
              "rate_point": q, "cells": n, "symbols": int(v.size), "rows": rows}
    md = "\n".join(["# P-frame residual contexts: an experiment\n", f"- command: `{result['command']}`",
                    f"- commit {result['commit']}", f"- data: {result['data']}; rate point {q}; {n} cells", "",
                    "| contexts | bits per coded cell | vs shipped |", "|---|---|---|",
                    *[f"| {r['contexts']} | {r['bits_per_cell']:.1f} | {100 * r['vs_shipped']:+.1f} % |" for r in rows],
                    ""])
    provenance.write_results(a.out, result, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
