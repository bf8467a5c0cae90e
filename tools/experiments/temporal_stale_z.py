"""What a temporal stream's stale hyper-latent costs its renders (issue 18).

A temporal stream sends ẑ only in keyframes: every P frame is rendered with M(ẑ) of its keyframe (up to
``refresh_s`` old), whatever entered the picture since. This codes a clip as the product does and renders
each scored frame (every 8th) twice from the same decoded ŷ: with the keyframe's M(ẑ) (what the cloud
shows) and with M(ẑ) of that frame's own z, quantized at the keyframe's rate point (an oracle: what sending
ẑ in every P frame would give, its bits not counted). It also counts the z cells whose symbols differ from
the keyframe's (what such updates would have to carry). Detection: YOLOX-nano on the originals at score 0.3
is the ground truth, as in ``latentcast eval``.

::

    python tools/experiments/temporal_stale_z.py --rate-point 0 --out results/temporal_levers/stale-z/v1.json
    python tools/experiments/temporal_stale_z.py --weights models/weights/elic-lite-v3.safetensors \\
        --bundle checkpoints/elic-lite-v3.onnx --tables checkpoints/elic-lite-v3-temporal.safetensors \\
        --key-rate-point 3 --bg-rate-point 1 --rate-point 1 --out results/temporal_levers/stale-z/v3.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

SCORED_EVERY = 8  # as latentcast eval scores a video


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/video/vtest.avi")
    ap.add_argument("--weights", default="elic-lite", help="codec weights (default: the shipped elic-lite)")
    ap.add_argument("--bundle", default=None, help="its edge bundle (default: the shipped one)")
    ap.add_argument("--tables", default=None, help="its P-frame tables (default: the shipped ones)")
    ap.add_argument("--synthesis", default="auto", help="temporal render's synthesis (codec.use_synthesis name)")
    ap.add_argument("--rate-point", type=int, default=0, help="ROI cells' rate point (threshold 1)")
    ap.add_argument("--key-rate-point", type=int, default=None, help="default: the edge's")
    ap.add_argument("--bg-rate-point", type=int, default=None, help="default: the edge's")
    ap.add_argument("--max-frames", type=int, default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import cv2
    import torch

    from latentcast.detector import YoloxDetector
    from latentcast.edge.config import TemporalConfig
    from latentcast.edge.encoder import EdgeEncoder
    from latentcast.edge.grounding import Grounder
    from latentcast.edge.temporal import TemporalEncoder
    from latentcast.models.codec import LatentCodec
    from latentcast.models.temporal import TemporalDecoder, default_tables_path
    from latentcast.proto.bitstream import Packet, SectionKind
    from latentcast.proto.temporal import TemporalTables
    from latentcast.tools.eval.data import GtBox
    from latentcast.tools.eval.metrics import detection_map, psnr
    from latentcast.tools.eval.runner import PRED_SCORE

    torch.set_num_threads(1)
    t0 = time.time()
    codec = LatentCodec.load(a.weights)
    codec.use_synthesis(a.synthesis, temporal=True)
    enc = EdgeEncoder(bundle=a.bundle, threads=1)
    tables = TemporalTables.load(a.tables or default_tables_path(codec), weights_hash=enc.weights_hash)
    kw = {k: v for k, v in (("key_rate_point", a.key_rate_point), ("bg_rate_point", a.bg_rate_point))
          if v is not None}
    cfg = TemporalConfig(rate_point=a.rate_point, threshold=1, **kw)
    te = TemporalEncoder(compressor=enc, tables=tables, config=cfg, fps=10.0)
    dec = TemporalDecoder(codec=codec, tables=tables)
    grounder = Grounder(labels=["person", "vehicle", "bicycle"], detector=YoloxDetector(threads=1),
                        strict_labels=False)
    det, gt_det = YoloxDetector(threads=1, score_threshold=PRED_SCORE), YoloxDetector(threads=1)
    classes = ["person", "bicycle", "car", "motorcycle", "bus", "truck"]
    class_ids = [det.labels.index(c) for c in classes]
    zdelta = codec.model.rate_zdelta[cfg.key_rate_point].view(1, 1, 1, 1)

    cap = cv2.VideoCapture(a.data)
    if not cap.isOpened():
        raise SystemExit(f"cannot open {a.data}")
    gt, shown, oracle = {}, {}, {}
    rows, key_sym, key_z_bytes, n_bytes, i = [], None, 0, 0, 0
    while a.max_frames is None or i < a.max_frames:
        ok, bgr = cap.read()
        if not ok:
            break
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        data = te.encode(rgb, grounder.update(rgb).rois)
        n_bytes += len(data)
        rec = dec.decompress(data)
        h, w = rgb.shape[:2]
        is_key, scored = te._since_key == 1, i % SCORED_EVERY == 0
        if is_key or scored:  # this frame's z at the keyframe's rate point (g_a and h_a once)
            sym = enc.z_symbols(enc.analyze(rgb)[1], cfg.key_rate_point)
        if is_key:  # its z is what the P frames after it render with
            key_sym = sym
            key_z_bytes = len(Packet.from_bytes(data).sections[SectionKind.Z])
        if scored:
            with torch.no_grad():
                gz = dec.g_s.global_features((torch.from_numpy(sym).double()[None] * zdelta).float())
                rows_y, cols_y = dec.state.y.shape[1:]
                latent = dec._synthesis(torch.from_numpy(dec.state.y)[None].float(), torch.ones(1, 1, rows_y, cols_y),
                                        gz[:, :, :rows_y, :cols_y])
            f = codec.cfg.latent_factor
            frame = codec.latent_to_frame(latent[:, :, : -(-h // f), : -(-w // f)], w, h)
            gt[i] = [GtBox(x0=d.x0, y0=d.y0, x1=d.x1, y1=d.y1, class_id=d.class_id) for d in gt_det.detect(rgb)]
            shown[i], oracle[i] = det.detect(rec.frame), det.detect(frame)
            rows.append({"frame": i, "psnr_shown": psnr(rec.frame, rgb), "psnr_own_z": psnr(frame, rgb),
                         "z_cells_changed": int(np.any(sym != key_sym, axis=0).sum()), "z_cells": int(sym[0].size)})
        i += 1
    m_shown = detection_map(gt, shown, class_ids=class_ids, class_names=classes)
    m_oracle = detection_map(gt, oracle, class_ids=class_ids, class_names=classes)
    out = {
        "command": "python tools/experiments/temporal_stale_z.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v is not None),
        "weights_hash": codec.weights_hash.hex()[:16], "frames": i, "scored": len(rows),
        "bpp": 8 * n_bytes / (i * 768 * 576) if i else None,
        "keyframe_z": {"psnr": float(np.mean([r["psnr_shown"] for r in rows])), "map": m_shown["map"],
                       "map50": m_shown["map50"]},
        "own_z_oracle": {"psnr": float(np.mean([r["psnr_own_z"] for r in rows])), "map": m_oracle["map"],
                         "map50": m_oracle["map50"]},
        "z_cells_changed_mean": float(np.mean([r["z_cells_changed"] for r in rows])),
        "keyframe_z_section_bytes": key_z_bytes, "seconds": round(time.time() - t0, 1), "rows": rows,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
