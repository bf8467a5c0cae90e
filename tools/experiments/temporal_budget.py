"""Where temporal coding's bytes go over a clip, frame by frame, beside x265's (issue 18).

For each frame: latentcast-temporal's packet bytes, its kind (keyframe / P), the grounded boxes, the
cells coded as CODE (ROI) and BGCODE (background), and x265's packet bytes at one CRF (zerolatency: one
packet per frame, in order). Summed over windows of frames, it shows where the two codecs' budgets part.
``--score``: also the detection mAP of every window's scored frames (every 8th, as ``latentcast eval``: YOLOX on
the originals at score 0.3 is the ground truth), both codecs decoded.

    python tools/experiments/temporal_budget.py --data ../shared/data/video/vtest.avi --levels q0/t1 \
        --crf 47 --out results/temporal_levers/budget
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/video/vtest.avi")
    ap.add_argument("--levels", default="q0/t1", help="comma-separated q<rate point>/t<threshold>")
    ap.add_argument("--crf", type=float, default=47.0, help="x265 CRF for the per-frame comparison")
    ap.add_argument("--window", type=int, default=100, help="frames per row of the summary")
    ap.add_argument("--max-frames", type=int, default=None)
    ap.add_argument("--edge-config", default=None, help="an edge YAML whose temporal section replaces the defaults")
    ap.add_argument("--score", action="store_true", help="also mAP per window (decodes both codecs)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import torch

    import latentcast.edge.temporal as et
    from latentcast.detector import YoloxDetector
    from latentcast.edge.config import TemporalConfig
    from latentcast.edge.encoder import EdgeEncoder
    from latentcast.edge.temporal import TemporalEncoder
    from latentcast.models.codec import LatentCodec
    from latentcast.models.temporal import TemporalDecoder, default_tables_path
    from latentcast.proto.temporal import BGCODE, CODE, TemporalTables
    from latentcast.tools.eval.baselines import _decode_video, _encode_video, make_baselines
    from latentcast.tools.eval.data import GtBox, load_data
    from latentcast.tools.eval.learned import GroundingSettings, grounding_rois
    from latentcast.tools.eval.metrics import detection_map
    from latentcast.tools.eval.runner import PRED_SCORE
    from latentcast.tools.options import temporal_settings

    torch.set_num_threads(1)
    det = YoloxDetector(score_threshold=GroundingSettings.score_threshold)
    clip = load_data(a.data, classes=det.labels, max_frames=a.max_frames)[0]
    gs = GroundingSettings(labels=("person", "vehicle", "bicycle"))
    rois = grounding_rois(clip, gs, det, {}, every_frame=True)
    enc = EdgeEncoder()
    dec = LatentCodec.load("elic-lite")
    tables = TemporalTables.load(default_tables_path(dec), weights_hash=dec.weights_hash)
    base = temporal_settings(a.edge_config) if a.edge_config else TemporalConfig(mode="temporal")
    scored = set(clip.scored)
    pred_det = YoloxDetector(score_threshold=PRED_SCORE) if a.score else None
    gt: dict[int, list] = {}
    class_ids: list[int] = []
    if a.score:
        from latentcast.edge.grounding import map_labels

        class_ids = sorted(map_labels(list(gs.labels), det.labels))
        for i, frame in clip.frames():
            if i in scored:
                gt[i] = [GtBox(d.x0, d.y0, d.x1, d.y1, d.class_id) for d in det.detect(frame)]
            if i >= clip.n_frames - 1:
                break

    def window_map(preds: dict[int, list], w0: int, w1: int) -> tuple[float, float]:
        keys = [k for k in gt if w0 <= k < w1]
        m = detection_map({k: gt[k] for k in keys}, {k: preds.get(k, []) for k in keys}, class_ids=class_ids)
        return m["map50"], m["map"]

    record: list = []
    orig = et.choose_modes

    def spy(*args, **kw):
        modes, sym = orig(*args, **kw)
        record.append((int((modes == CODE).sum()), int((modes == BGCODE).sum()),
                       int(np.abs(sym[:, modes == CODE]).sum()), int(np.abs(sym[:, modes == BGCODE]).sum())))
        return modes, sym

    et.choose_modes = spy
    frames = list(clip.frames())[: clip.n_frames]
    out: dict = {"data": a.data, "frames": len(frames), "levels": {}}
    for level in a.levels.split(","):
        q, t = (int(s[1:]) for s in level.split("/"))
        cfg = dataclasses.replace(base, rate_point=q, threshold=t, target_kbps=0.0)
        te = TemporalEncoder(compressor=enc, tables=tables, config=cfg, fps=clip.fps)
        td = TemporalDecoder(codec=dec, tables=tables) if a.score else None
        preds: dict[int, list] = {}
        rows = []
        t0 = time.time()
        for i, frame in frames:
            record.clear()
            data = te.encode(frame, rois[i])
            if td is not None:
                if i in scored:
                    preds[i] = pred_det.detect(np.ascontiguousarray(td.decompress(data).frame))
                else:
                    td.decode_state(data)
            code, bgcode, l1_code, l1_bg = record[0] if record else (0, 0, 0, 0)
            rows.append({"i": i, "bytes": len(data), "key": not record, "boxes": len(rois[i]), "code": code,
                         "bgcode": bgcode, "l1_code": l1_code, "l1_bg": l1_bg})
        out["levels"][level] = {"rows": rows, "counts": dict(te.counts), "seconds": time.time() - t0,
                                "map": [window_map(preds, w0, w0 + a.window) for w0 in range(0, len(rows), a.window)]
                                if a.score else None}
        print(level, sum(r["bytes"] for r in rows), te.counts, flush=True)

    s = make_baselines(["x265"], preset="medium", gop=None, threads=1)[0]
    bs = _encode_video(clip, s._settings, a.crf)
    x265 = [len(p) for p in bs.packets]
    out["x265"] = {"crf": a.crf, "bytes": x265, "extradata": len(bs.extradata), "map": None}
    if a.score:
        recon, _ = _decode_video(clip, s._settings, bs)
        xpred = {k: pred_det.detect(np.ascontiguousarray(v)) for k, v in recon.items()}
        out["x265"]["map"] = [window_map(xpred, w0, w0 + a.window) for w0 in range(0, len(frames), a.window)]

    od = Path(a.out)
    od.mkdir(parents=True, exist_ok=True)
    (od / "budget.json").write_text(json.dumps(out))
    lines = [f"# Temporal budget: `{a.data}`, {len(frames)} frames, x265 CRF {a.crf:g}", ""]
    for level, v in out["levels"].items():
        rows = v["rows"]
        lines += [f"## {level} ({v['counts']})", "",
                  "| frames | latentcast bytes | key bytes | P bytes | boxes/frame | CODE cells/frame | BGCODE "
                  "cells/frame | x265 bytes | ratio | mAP@0.5:0.95 latentcast / x265 |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for k, w0 in enumerate(range(0, len(rows), a.window)):
            rs = rows[w0:w0 + a.window]
            acc = "-"
            if v["map"] is not None:
                acc = f"{v['map'][k][1]:.3f} / {out['x265']['map'][k][1]:.3f}"
            n = len(rs)
            lb = sum(r["bytes"] for r in rs)
            kb = sum(r["bytes"] for r in rs if r["key"])
            xb = sum(x265[w0:w0 + a.window])
            lines.append(f"| {w0}–{w0 + n - 1} | {lb} | {kb} | {lb - kb} | {sum(r['boxes'] for r in rs) / n:.1f} | "
                         f"{sum(r['code'] for r in rs) / n:.1f} | {sum(r['bgcode'] for r in rs) / n:.1f} | {xb} | "
                         f"{lb / max(xb, 1):.2f} | {acc} |")
        lines.append("")
    (od / "budget.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
