"""Experiment: how many bits would motion compensation save in temporal P frames (issue 7)?

The shipped P frame codes a ROI cell's change against the *previous decoded latent*
(``proto.temporal``: the mean of the residual is ŷ_{t-1}). A walking person moves a few
pixels per frame, which a latent at 1/16 resolution cannot follow, so most of a moving cell's
latent is re-coded. This experiment measures the best case of the obvious fix::

    x̂_{t-1} = g_s(ŷ_{t-1})  (the reconstruction both ends could hold)
    per grounded box: the integer motion vector (±6 px, luma SAD against x̂_{t-1})
    x̃_t = x̂_{t-1} with each box's cells moved by its vector
    p_t = g_a(x̃_t)                                 (the motion-compensated prediction)
    per ROI cell: mean = p_t or ŷ_{t-1}, whichever leaves the smaller residual (1 flag per ROI cell)
    then the shipped mode decision, entropy tables and update

against the shipped coding (mean = ŷ_{t-1}) in the same closed loop, and x265 in the same run.
The bytes are real: the shipped P-packet (header, modes, classes, residuals) plus, for ``mc``,
the motion vectors (13-symbol uniform table) and the per-cell flags (a 2-symbol table from the
frame's own counts, whose two counts are sent as 2 x 2 bytes) entropy coded with the project's
coder. mAP is scored as ``latentcast eval`` does (YOLOX-nano on the uncompressed frames is the
ground truth) on every ``--every``-th frame of the first ``--frames``.

What it leaves out, so the ``mc`` numbers are an upper bound of this design's gain:
- the residual tables are the shipped ones, fitted without motion compensation (a refit would
  save a little more);
- p_t comes from PyTorch on both ends here; an edge running ONNX Runtime would hold a p_t that
  differs by float rounding, so the two latents would no longer be bit-identical.

    python tools/experiments/temporal_mc_experiment.py --frames 200 --every 4 \\
        --out results/temporal_mc_experiment.json
"""

from __future__ import annotations

import time

import numpy as np
from _video import load_video_codec, video_parser

LEVELS = ("q0/t4", "q0/t1", "q1/t1")
X265_CRF = (51, 47, 44)
MV_RANGE = 6


def _search(cur: np.ndarray, ref: np.ndarray, box, r: int) -> tuple[int, int]:
    """Integer motion vector of ``box`` (luma mean absolute difference against ``ref``, ±r pixels)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    h, w = cur.shape[:2]
    x0, y0, x1, y1 = max(x0, r), max(y0, r), min(x1, w - r), min(y1, h - r)
    if x1 <= x0 or y1 <= y0:
        return 0, 0
    c = cur[y0:y1, x0:x1].astype(np.float32).mean(-1)
    refl = ref.astype(np.float32).mean(-1)
    best = (np.inf, 0, 0)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            s = float(np.abs(c - refl[y0 + dy:y1 + dy, x0 + dx:x1 + dx]).mean())
            if s < best[0]:
                best = (s, dx, dy)
    return best[1], best[2]


def _move_boxes(ref: np.ndarray, boxes, mvs) -> np.ndarray:
    """``ref`` with the 16x16 cells each box touches copied from ``ref`` displaced by the box's vector."""
    out = ref.copy()
    h, w = ref.shape[:2]
    for (x0, y0, x1, y1), (dx, dy) in zip(boxes, mvs):
        cx0, cy0 = int(x0) // 16 * 16, int(y0) // 16 * 16
        cx1, cy1 = min(-(-int(x1) // 16) * 16, w), min(-(-int(y1) // 16) * 16, h)
        ys = np.clip(np.arange(cy0, cy1) + dy, 0, h - 1)
        xs = np.clip(np.arange(cx0, cx1) + dx, 0, w - 1)
        out[cy0:cy1, cx0:cx1] = ref[ys][:, xs]
    return out


def _side_bytes(mvs, flags: np.ndarray) -> int:
    """Real entropy-coded bytes of the motion vectors and the per-ROI-cell flags."""
    from latentcast.proto.entropy import SymbolEncoder, quantize_pmf
    from latentcast.proto.temporal import _freq_tableset

    n = 2 * MV_RANGE + 1
    tabs_mv = _freq_tableset(quantize_pmf(np.ones(n))[None].astype(np.int32))
    counts = np.array([(~flags).sum(), flags.sum()], dtype=np.float64) + 0.5
    tabs_f = _freq_tableset(quantize_pmf(counts)[None].astype(np.int32))
    enc = SymbolEncoder()
    if mvs:
        v = (np.asarray(mvs, dtype=np.int64) + MV_RANGE).ravel()
        enc.encode(v, np.zeros(v.size, dtype=np.int64), tabs_mv)
    if flags.size:
        enc.encode(flags.astype(np.int64).ravel(), np.zeros(flags.size, dtype=np.int64), tabs_f)
    return len(enc.to_bytes()) + 4


def run_level(codec, tables, clip, rois, analysis, level: str, method: str) -> dict:
    """One closed loop over the clip; returns bytes, counts and the reconstructions of the scored frames."""
    import torch

    from latentcast.proto.grid import transmit_mask
    from latentcast.proto.temporal import KIND_P, TemporalInfo, TemporalState, choose_modes, encode_p

    q, t = (int(s[1:]) for s in level.split("/"))
    steps = codec.rate_deltas
    keep = set(clip.scored)
    st = z_key = x_prev = None
    n_bytes, side, n_mc, n_frames, recon = 0, 0, 0, 0, {}
    t0 = time.perf_counter()

    def render(y, w, h):
        every = np.ones(y.shape[1:], dtype=bool)
        lat = codec.synthesize(torch.from_numpy(y)[None], every, z_key, width=w, height=h)
        return codec.latent_to_frame(lat, w, h)

    for i, frame in clip.frames():
        if i >= clip.n_frames:
            break
        h, w = frame.shape[:2]
        y, z = analysis[i]
        n_frames += 1
        if st is None:
            from latentcast.proto.bitstream import Packet

            info = TemporalInfo(kind=0, frame_id=i, ref_id=i, key_id=i)
            data, y_hat = codec.compress_key(frame, rate_point=2, temporal=info, analysis=(y, z))
            z_key = codec.decode_y(Packet.from_bytes(data))[1]
            st = TemporalState.from_key(y_hat, i)
            n_bytes += len(data)
        else:
            boxes = rois[i]
            roi = transmit_mask(w, h, boxes, True)
            base = st
            if method == "mc":
                mvs = [_search(frame, x_prev, b, MV_RANGE) for b in boxes]
                p = codec.analyze(_move_boxes(x_prev, boxes, mvs))[0].astype(np.float64)
                l1 = lambda m, y=y: np.abs(np.floor((y - m) / steps[q] + 0.5)).sum(0)  # noqa: E731
                use = roi & (l1(p) < l1(st.y))
                base = st.copy()
                base.y = np.where(use[None], p, st.y)
                s = _side_bytes(mvs, use[roi])
                side += s
                n_bytes += s
                n_mc += int(use.sum())
            modes, sym = choose_modes(base, y, roi, step=steps[q], bg_step=steps[0], threshold=t, bg_threshold=8)
            yb, crc = encode_p(st, modes, sym, tables=tables, y_tables=codec.y_tables, rate_point=q, bg_rate_point=0)
            info = TemporalInfo(kind=KIND_P, frame_id=i, ref_id=st.frame_id, key_id=st.key_id)
            n_bytes += len(codec.p_packet(width=w, height=h, rate_point=q, y_bytes=yb, crc=crc, temporal=info))
            st.y = base.y
            st.apply(modes, sym, step=steps[q], bg_step=steps[0], frame_id=i)
        if method == "mc" or i in keep:
            x_prev = render(st.y, w, h)
            if i in keep:
                recon[i] = x_prev
    return {"bytes": n_bytes, "side_bytes": side, "mc_cells_per_frame": n_mc / max(n_frames - 1, 1),
            "frames": n_frames, "seconds": time.perf_counter() - t0, "recon": recon}


def main(argv: list[str] | None = None) -> int:

    from latentcast.detector import YoloxDetector
    from latentcast.tools import provenance
    from latentcast.tools.eval.baselines import X265Codec
    from latentcast.tools.eval.data import GtBox, video_clip
    from latentcast.tools.eval.learned import GroundingSettings, grounding_rois
    from latentcast.tools.eval.metrics import detection_map, psnr
    from latentcast.tools.eval.runner import PRED_SCORE

    p = video_parser(__doc__, frames=200, out="results/temporal_mc_experiment.json",
                     frames_help="code the first N frames")
    p.add_argument("--every", type=int, default=4, help="score every N-th frame")
    a = p.parse_args(argv)
    path, codec, tables = load_video_codec(a)
    clip = video_clip(path, every=a.every, max_frames=a.frames)
    det = YoloxDetector(score_threshold=PRED_SCORE, threads=a.threads)
    classes = [0, 1, 2, 3, 5, 7]  # person, bicycle, car, motorcycle, bus, truck (the eval's default task)
    gt = {i: [GtBox(x0=d.x0, y0=d.y0, x1=d.x1, y1=d.y1, class_id=d.class_id) for d in det.detect(f) if d.score >= 0.3]
          for i, f in clip.scored_frames()}

    def score(recon: dict) -> dict:
        m = detection_map(gt, {i: det.detect(recon[i]) for i in gt}, class_ids=classes)
        orig = dict(clip.scored_frames())
        return {"map50": m["map50"], "map": m["map"], "psnr": float(np.mean([psnr(orig[i], recon[i]) for i in gt]))}

    g = GroundingSettings(labels=("person", "vehicle", "bicycle"))
    rois = {i: [(r.x0, r.y0, r.x1, r.y1) for r in v]
            for i, v in grounding_rois(clip, g, YoloxDetector(score_threshold=g.score_threshold), {},
                                       every_frame=True).items()}
    analysis = {i: codec.analyze(f) for i, f in clip.frames() if i < clip.n_frames}
    pixels = clip.n_frames * clip.width * clip.height
    points = []
    for crf in X265_CRF:
        run = X265Codec(params=[crf]).run(clip, crf)
        points.append({"codec": "x265", "setting": f"crf {crf}", "bpp": run.bytes * 8 / run.pixels,
                       "bytes_per_frame": run.bytes / run.frames_coded, **score(run.recon)})
        print(points[-1], flush=True)
    for method in ("shipped", "mc"):
        for level in LEVELS:
            r = run_level(codec, tables, clip, rois, analysis, level, method)
            points.append({"codec": f"temporal-{method}", "setting": level, "bpp": r["bytes"] * 8 / pixels,
                           "bytes_per_frame": r["bytes"] / r["frames"],
                           "side_bytes_per_frame": r["side_bytes"] / r["frames"],
                           "mc_cells_per_frame": r["mc_cells_per_frame"], "seconds": round(r["seconds"], 1),
                           **score(r["recon"])})
            print(points[-1], flush=True)
    from latentcast.tools.eval.metrics import bd_rate

    def curve(name: str, metric: str) -> list[tuple[float, float]]:
        return [(p["bpp"], p[metric]) for p in points if p["codec"] == name]

    bd = {name: {metric: bd_rate(curve("x265", metric), curve(name, metric)) for metric in ("map50", "map", "psnr")}
          for name in ("temporal-shipped", "temporal-mc")}
    result = {"command": provenance.command("python tools/experiments/temporal_mc_experiment.py"),
              "commit": provenance.commit(), "machine": provenance.machine(), "data": f"{path.name}, first "
              f"{clip.n_frames} frames, every {a.every}th scored ({len(gt)} frames, {sum(map(len, gt.values()))} "
              "ground-truth boxes)", "points": points,
              "bd_rate_vs_x265": bd}
    rows = ["| codec | setting | bpp | bytes/frame | mAP@0.5 | mAP@0.5:0.95 | PSNR |", "|---|---|---|---|---|---|---|"]
    rows += [f"| {p['codec']} | {p['setting']} | {p['bpp']:.4f} | {p['bytes_per_frame']:.0f} | {p['map50']:.3f} | "
             f"{p['map']:.3f} | {p['psnr']:.2f} |" for p in points]
    md = "\n".join(
        [
            "# Motion-compensated P frames: an experiment\n",
            f"- command: `{result['command']}`",
            f"- commit {result['commit']}, {result['machine'].get('cpu', '')}",
            f"- data: {result['data']}",
            "",
            *rows,
            "",
            "BD-rate against x265 (negative = fewer bits for the same accuracy; n/a = no overlap):",
            "",
            "| codec | mAP@0.5 | mAP@0.5:0.95 | PSNR |",
            "|---|---|---|---|",
            *[
                f"| {n} | " + " | ".join("n/a" if v is None else f"{v:+.1f} %" for v in b.values()) + " |"
                for n, b in bd.items()
            ],
            "",
        ]
    )
    provenance.write_results(a.out, result, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
