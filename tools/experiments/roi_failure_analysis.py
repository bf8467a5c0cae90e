"""Why ROI-only coding loses detections on crowded scenes: one variable at a time, measured.

::

    image ─► grounding (the edge's Grounder, every image) ─► ROIs
      │
      ├─ full          every cell coded                                   (the upper bound at this rate)
      ├─ roi           ROI cells + z (today's ROI-only packet)
      ├─ roi+orig-bg   roi's decode inside the coded cells, the ORIGINAL outside   → is the ROI content enough?
      ├─ orig+prior-bg ORIGINAL inside the coded cells, roi's decode outside       → does the prior-only
      │                                                                                background hurt by itself?
      ├─ full+prior-bg full's decode inside the coded cells, roi's decode outside  → the same, at codec quality
      ├─ roi+16px / roi+32px   ROIs grown by one / two latent cells                → context at ROI borders?
      └─ q<q>/b<b>     ROI cells at q, every other cell at a coarser rate point b (LCF v2)

Each variant is scored like ``latentcast eval``: COCO mAP of YOLOX-nano on the reconstruction
against YOLOX-nano on the original (score >= 0.3), bpp from real packet bytes. Two more numbers
point at the cause:

- ``fp_outside``: detections (score >= 0.3) whose box centre lies outside the coded cells and that
  match no ground-truth box: false objects invented on the hyperprior-only background.
- ``recall_small`` / ``recall_medium`` / ``recall_large``: share of ground-truth boxes found (IoU >= 0.5,
  same class, score >= 0.3) by COCO size (area < 32², < 96², larger): small objects at 1/16 latent
  resolution?

::

    python -m latentcast.tools.crowded_devset --out devset/crowded
    python tools/experiments/roi_failure_analysis.py --data devset/crowded --out results/roi_failure

writes ``roi_failure.json`` (every number, the command, commit and machine) and ``roi_failure.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["coded_pixels", "size_recall", "main"]

SCORE = 0.3  # detections that count as "found" (and as ground truth on the original)
AREA_SMALL, AREA_MEDIUM = 32 ** 2, 96 ** 2  # COCO's size buckets


def coded_pixels(mask: np.ndarray, width: int, height: int, stride: int = 16) -> np.ndarray:
    """(rows, cols) cell mask -> (height, width) bool: the pixels whose latent cell is coded."""
    return np.kron(mask.astype(np.uint8), np.ones((stride, stride), np.uint8))[:height, :width].astype(bool)


def _match(gt: list, dets: list) -> tuple[list[bool], list[bool]]:
    """Greedy same-class matching at IoU >= 0.5 (highest score first): (gt found?, det matched?)."""
    from latentcast.edge.grounding import iou_matrix

    found = [False] * len(gt)
    used = [False] * len(dets)
    if not gt or not dets:
        return found, used
    iou = iou_matrix(np.array([[d.x0, d.y0, d.x1, d.y1] for d in dets], dtype=np.float64),
                     np.array([[g.x0, g.y0, g.x1, g.y1] for g in gt], dtype=np.float64))
    for j in sorted(range(len(dets)), key=lambda j: -dets[j].score):
        best, bi = 0.5, -1
        for i, g in enumerate(gt):
            if not found[i] and g.class_id == dets[j].class_id and iou[j, i] >= best:
                best, bi = iou[j, i], i
        if bi >= 0:
            found[bi] = used[j] = True
    return found, used


def size_recall(gt: list, dets: list) -> dict[str, tuple[int, int]]:
    """(found, total) ground-truth boxes per COCO size bucket, detections at score >= SCORE."""
    found, _ = _match(gt, [d for d in dets if d.score >= SCORE])
    out = {"small": [0, 0], "medium": [0, 0], "large": [0, 0]}
    for g, f in zip(gt, found):
        area = (g.x1 - g.x0) * (g.y1 - g.y0)
        k = "small" if area < AREA_SMALL else "medium" if area < AREA_MEDIUM else "large"
        out[k][0] += int(f)
        out[k][1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def _fp_outside(gt: list, dets: list, coded: np.ndarray) -> int:
    dets = [d for d in dets if d.score >= SCORE]
    _, used = _match(gt, dets)
    h, w = coded.shape
    n = 0
    for d, u in zip(dets, used):
        cx, cy = int(min(w - 1, (d.x0 + d.x1) / 2)), int(min(h - 1, (d.y0 + d.y1) / 2))
        n += int(not u and not coded[cy, cx])
    return n


def main(argv: list[str] | None = None) -> int:
    import torch

    from latentcast.detector import YoloxDetector
    from latentcast.edge.encoder import EdgeEncoder
    from latentcast.edge.grounding import Grounder, map_labels
    from latentcast.models.codec import LatentCodec
    from latentcast.proto.bitstream import Roi
    from latentcast.proto.grid import coded_cells
    from latentcast.tools import provenance
    from latentcast.tools.eval.data import GtBox, load_data
    from latentcast.tools.eval.learned import roibg_levels
    from latentcast.tools.eval.metrics import detection_map

    p = argparse.ArgumentParser(
        prog="python tools/experiments/roi_failure_analysis.py", description=__doc__.split("\n")[0]
    )
    p.add_argument("--data", default="devset/crowded", help="image folder (default devset/crowded)")
    p.add_argument("--labels", default="person,vehicle,bicycle", help="task labels: ROIs and scored classes")
    p.add_argument("--weights", default=None, help="codec weights (default: the shipped elic-lite)")
    p.add_argument("--bundle", default=None, help="edge bundle (default: the shipped export)")
    p.add_argument("--rates", default="", help="rate points to analyse (default: all)")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/roi_failure")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    det = YoloxDetector(score_threshold=0.01)
    gdet = YoloxDetector(score_threshold=SCORE)
    labels = [s.strip() for s in a.labels.split(",") if s.strip()]
    class_ids = sorted(map_labels(labels, det.labels))
    enc = EdgeEncoder(bundle=a.bundle)
    dec = LatentCodec.load(a.weights or "elic-lite")
    rates = [int(v) for v in a.rates.split(",")] if a.rates else list(range(dec.n_rates))
    clips = load_data(a.data, classes=det.labels, max_frames=a.max_images)
    t0 = time.time()

    gt: dict[int, list] = {}
    preds: dict[str, dict[int, list]] = {}
    nbytes: dict[str, int] = {}
    extra: dict[str, dict] = {}
    npix = 0

    def add(name: str, k: int, img: np.ndarray, coded: np.ndarray, n: int | None) -> None:
        d = det.detect(img)
        preds.setdefault(name, {})[k] = d
        if n is not None:
            nbytes[name] = nbytes.get(name, 0) + n
        e = extra.setdefault(name, {"fp_outside": 0, "small": [0, 0], "medium": [0, 0], "large": [0, 0]})
        e["fp_outside"] += _fp_outside(gt[k], d, coded)
        for b, (f, t) in size_recall(gt[k], d).items():
            e[b][0] += f
            e[b][1] += t

    for k, clip in enumerate(clips):
        _, img = next(clip.frames())
        h, w = img.shape[:2]
        npix += w * h
        gt[k] = [GtBox(x0=d.x0, y0=d.y0, x1=d.x1, y1=d.y1, class_id=d.class_id) for d in gdet.detect(img)
                 if d.class_id in class_ids]
        rois = list(Grounder(labels=labels, detector=gdet, every=1).update(img).rois)
        boxes = [(r.x0, r.y0, r.x1, r.y1) for r in rois]
        roi_cells, _ = coded_cells(w, h, boxes, roi_only=True, rate_point=0)
        inside = coded_pixels(roi_cells, w, h)
        add("original", k, img, inside, None)
        for q in rates:
            full = enc.compress(img, rois, rate_point=q, roi_only=False)
            only = enc.compress(img, rois, rate_point=q)
            rf = dec.decompress(full).frame
            rr = dec.decompress(only).frame
            add(f"q{q} full", k, rf, np.ones_like(inside), len(full))
            add(f"q{q} roi", k, rr, inside, len(only))
            add(f"q{q} roi+orig-bg", k, np.where(inside[..., None], rr, img), inside, None)
            add(f"q{q} orig+prior-bg", k, np.where(inside[..., None], img, rr), inside, None)
            add(f"q{q} full+prior-bg", k, np.where(inside[..., None], rf, rr), inside, None)
            for grow in (16, 32):
                big = [Roi(x0=max(0, r.x0 - grow), y0=max(0, r.y0 - grow), x1=min(w, r.x1 + grow),
                           y1=min(h, r.y1 + grow), label_id=r.label_id, score=r.score) for r in rois]
                data = enc.compress(img, big, rate_point=q)
                cells, _ = coded_cells(w, h, [(r.x0, r.y0, r.x1, r.y1) for r in big], roi_only=True, rate_point=q)
                add(f"q{q} roi+{grow}px", k, dec.decompress(data).frame, coded_pixels(cells, w, h), len(data))
        for lv in roibg_levels(dec.n_rates):
            q, b = (int(v[1:]) for v in lv.split("/"))
            if q not in rates:
                continue
            data = enc.compress(img, rois, rate_point=q, background=b)
            add(f"{lv} roi+bg", k, dec.decompress(data).frame, np.ones_like(inside), len(data))
        log.info("image %d/%d done (%.0f s)", k + 1, len(clips), time.time() - t0)
        print(f"{k + 1}/{len(clips)} images", flush=True)

    names = [c for c in det.labels]
    rows = []
    for name, pr in preds.items():
        m = detection_map(gt, pr, class_ids=class_ids, class_names=[names[i] for i in class_ids])
        e = extra[name]
        rows.append({"variant": name, "bpp": (nbytes[name] * 8 / npix) if name in nbytes else None,
                     "map50": m["map50"], "map": m["map"], "fp_outside": e["fp_outside"],
                     **{f"recall_{b}": (e[b][0] / e[b][1] if e[b][1] else None) for b in ("small", "medium", "large")}})
    n_gt = {b: extra["original"][b][1] for b in ("small", "medium", "large")}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": provenance.command("python tools/experiments/roi_failure_analysis.py"),
        "commit": provenance.commit(),
        "machine": provenance.machine(),
        "data": str(a.data),
        "images": len(clips),
        "gt_boxes": sum(len(v) for v in gt.values()),
        "gt_by_size": n_gt,
        "weights_hash": dec.weights_hash.hex(),
        "labels": labels,
        "score": SCORE,
        "seconds": round(time.time() - t0, 1),
        "rows": rows,
    }
    (out / "roi_failure.json").write_text(json.dumps(result, indent=1))

    def f(v, d=3):
        return "n/a" if v is None else f"{v:.{d}f}"

    lines = [f"# Why ROI-only loses detections: {len(clips)} images of `{a.data}`",
             "", f"`{result['command']}` at commit `{result['commit']}`, weights `{result['weights_hash']}`; "
             f"{result['gt_boxes']} ground-truth boxes (YOLOX-nano >= {SCORE} on the originals; "
             f"small/medium/large: {n_gt['small']}/{n_gt['medium']}/{n_gt['large']}).", "",
             "| variant | bpp | mAP@0.5 | mAP@0.5:0.95 | FP outside ROIs | recall small | medium | large |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {f(r['bpp'], 4)} | {f(r['map50'])} | {f(r['map'])} | {r['fp_outside']} | "
                     f"{f(r['recall_small'], 2)} | {f(r['recall_medium'], 2)} | {f(r['recall_large'], 2)} |")
    (out / "roi_failure.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    raise SystemExit(main())
