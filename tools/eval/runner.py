"""``latentcast eval``: rate versus machine-task accuracy, latentcast against classical codecs.

::

    --data (video | image folder | COCO json) ─► clips ─► reference pass on the ORIGINAL frames:
        ground truth = COCO annotations, or else the detector's boxes (score >= --gt-score) on the
        uncompressed frames; the classifier's top-1 on the uncompressed frames
    for every codec, for every setting in its sweep:
        codec.run(clip, setting) ─► real bytes + reconstructions of the scored frames
        ─► detector (score >= 0.01, COCO style) ─► mAP@0.5, mAP@0.5:0.95 (pycocotools) vs ground truth
        ─► classifier ─► top-1 agreement with the uncompressed frames
        ─► PSNR, MS-SSIM against the originals
    ─► one point per (codec, setting): bpp = 8 x total bytes / total pixels
    ─► BD-rate (Bjøntegaard, quality vs log-rate, PCHIP on each curve's Pareto front) of every codec
       against every other, for every metric ─► JSON, markdown, plots (report.py)

Only the task's classes are scored (``--labels``; default: the edge's default task labels, person,
vehicle, bicycle; ``all``: every detector class, i.e. general detection), and the same labels drive
latentcast's ROI grounding, as a deployed edge would.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latentcast.tools.eval.data import Clip, GtBox, load_data
from latentcast.tools.eval.learned import TEMPORAL_LEVELS

log = logging.getLogger(__name__)

__all__ = ["TASKS", "CODECS", "METRICS", "evaluate", "add_arguments", "main"]

TASKS = ("detection", "classification")
# latentcast = latentcast-full + latentcast-roi (independent frames); latentcast-roibg: ROIs plus a coarser coded
# background (independent frames); latentcast-temporal codes the clip as video
CODECS = ("latentcast", "latentcast-roibg", "latentcast-temporal", "jpeg", "webp", "x264", "x265", "downscale",
          "x264-roi", "x265-roi", "x265-freeze")  # the last three: task-aware classical anchors (task_aware.py)
# metric key -> (label, task it needs or None)
METRICS = {"map50": ("mAP@0.5", "detection"), "map": ("mAP@0.5:0.95", "detection"),
           "top1": ("top-1 agreement", "classification"), "psnr": ("PSNR dB", None), "ms_ssim": ("MS-SSIM", None)}
PRED_SCORE = 0.01  # detections kept for mAP (COCO practice: low threshold, the PR curve does the rest)
MS_SSIM_MIN_SIDE = 161  # MS-SSIM's 5 scales need at least this many pixels on a side


@dataclass(frozen=True)
class _Ref:
    """The reference pass: per image id, ground truth, the detector's output and the classifier's top-1
    on the original (each model runs once per original frame)."""

    gt: dict[int, list[GtBox]]
    dets: dict[int, list]  # the detector on the original (score >= PRED_SCORE): the uncompressed point
    top1: dict[int, int]
    ids: dict[tuple[int, int], int]  # (clip index, frame index) -> image id
    source: str


def _reference(clips: list[Clip], *, detector, classifier, gt_score: float, progress) -> _Ref:
    gt, dets, top1, ids = {}, {}, {}, {}
    annotated = all(c.gt is not None for c in clips)
    for ci, clip in enumerate(clips):
        for fi, frame in clip.scored_frames():
            k = ids[(ci, fi)] = len(ids)
            if detector is not None:
                dets[k] = detector.detect(frame)
            if annotated:
                gt[k] = list(clip.gt.get(fi, []))
            elif detector is not None:
                gt[k] = [GtBox(x0=d.x0, y0=d.y0, x1=d.x1, y1=d.y1, class_id=d.class_id)
                         for d in dets[k] if d.score >= gt_score]
            if classifier is not None:
                top1[k] = classifier.top1(frame)
            progress.update(1)
    source = ("annotations (COCO file)" if annotated else
              f"the detector's boxes with score >= {gt_score} on the uncompressed frames (no annotations given)")
    return _Ref(gt=gt, dets=dets, top1=top1, ids=ids, source=source)


def _score(clips: list[Clip], runs: list, ref: _Ref, *, detector, classifier, class_ids, class_names,
           keep_example: tuple[int, int] | None, progress) -> tuple[dict, np.ndarray | None, list]:
    from latentcast.tools.eval.metrics import detection_map, ms_ssim, psnr, top1_agreement

    preds, t1, ps, ss = {}, {}, [], []
    example, example_dets = None, []
    for ci, (clip, run) in enumerate(zip(clips, runs)):
        for fi, orig in clip.scored_frames():
            rec = run.recon[fi]
            k = ref.ids[(ci, fi)]
            if detector is not None:
                preds[k] = detector.detect(rec)
            if classifier is not None:
                t1[k] = classifier.top1(rec)
            ps.append(psnr(orig, rec))
            if min(orig.shape[:2]) >= MS_SSIM_MIN_SIDE:
                ss.append(ms_ssim(orig, rec))
            if keep_example == (ci, fi):
                example, example_dets = rec, preds.get(k, [])
            progress.update(1)
    out = {"psnr": float(np.mean(ps)), "ms_ssim": float(np.mean(ss)) if ss else None}
    if detector is not None:
        m = detection_map(ref.gt, preds, class_ids=class_ids, class_names=class_names)
        out |= {"map50": m["map50"], "map": m["map"], "pred_boxes": m["pred_boxes"],
                "per_class_ap50": m["per_class_ap50"]}
    if classifier is not None:
        keys = sorted(ref.top1)
        out["top1"] = top1_agreement([ref.top1[k] for k in keys], [t1[k] for k in keys])
    return out, example, example_dets


def _example_key(ref: _Ref) -> tuple[int, int]:
    """The scored frame with the most ground-truth boxes (the first one on a tie)."""
    inv = {v: k for k, v in ref.ids.items()}
    if not ref.gt:
        return inv[0]
    return inv[max(sorted(ref.gt), key=lambda k: len(ref.gt[k]))]


def evaluate(clips: list[Clip], codecs: list, *, tasks: tuple[str, ...], detector=None, classifier=None,
             class_ids: list[int] | None = None, class_names: list[str] | None = None, gt_score: float = 0.3,
             show_progress: bool = True) -> dict:
    """Every codec at every setting on ``clips``: a dict with ``points``, the uncompressed
    reference, the ground-truth source and the example frame's reconstructions (``examples``,
    not JSON: numpy arrays) for the report."""
    from tqdm import tqdm

    from latentcast.tools.eval.metrics import detection_map

    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"task {t!r} is not one of {', '.join(TASKS)}")
    if "detection" in tasks and (detector is None or not class_ids):
        raise ValueError("the detection task needs a detector and at least one class id")
    if "classification" in tasks and classifier is None:
        raise ValueError("the classification task needs a classifier")
    det = detector if "detection" in tasks else None
    cls = classifier if "classification" in tasks else None
    n_scored = sum(len(c.scored) for c in clips)
    n_points = sum(len(c.params) for c in codecs)
    bar = tqdm(total=n_scored * (n_points + 2), unit="frame", desc="eval", disable=not show_progress)
    bar.set_postfix_str("reference")
    ref = _reference(clips, detector=det, classifier=cls, gt_score=gt_score, progress=bar)
    ex_key = _example_key(ref)

    # the uncompressed frames scored like any codec point: mAP 1 against detector pseudo ground truth,
    # the detector's own accuracy against annotations
    uncompressed = {"codec": "uncompressed", "param_name": None, "param": None, "bpp": 24.0, "psnr": None,
                    "ms_ssim": None}
    if det is not None:
        m = detection_map(ref.gt, ref.dets, class_ids=class_ids, class_names=class_names)
        uncompressed |= {"map50": m["map50"], "map": m["map"], "gt_boxes": m["gt_boxes"],
                         "per_class_ap50": m["per_class_ap50"]}
        bar.update(n_scored)
    if cls is not None:
        uncompressed["top1"] = 1.0
    ex_orig = next(f for fi, f in clips[ex_key[0]].scored_frames() if fi == ex_key[1])
    examples = {"frame": f"{clips[ex_key[0]].name}#{ex_key[1]}", "original": ex_orig,
                "original_dets": ref.dets.get(ref.ids[ex_key], []), "points": []}

    video = len(clips) == 1 and clips[0].n_frames > 1
    points = []
    for codec in codecs:
        for param in codec.params:
            bar.set_postfix_str(f"{codec.name} {codec.param_name}={param}: coding")
            runs = [codec.run(clip, param) for clip in clips]
            bar.set_postfix_str(f"{codec.name} {codec.param_name}={param}: scoring")
            scores, ex_rec, ex_dets = _score(clips, runs, ref, detector=det, classifier=cls, class_ids=class_ids,
                                             class_names=class_names, keep_example=ex_key, progress=bar)
            n_bytes, n_pix = sum(r.bytes for r in runs), sum(r.pixels for r in runs)
            coded = sum(r.frames_coded for r in runs)
            p_bpp = 8.0 * n_bytes / n_pix
            p = {"codec": codec.name, "param_name": codec.param_name,
                 "param": param.item() if hasattr(param, "item") else param,
                 "bpp": p_bpp, "bytes": n_bytes, "frames_coded": coded,
                 # what the codec's bitrate would be with every frame of the video coded at this bpp
                 "kbps": p_bpp * sum(c.width * c.height * c.fps for c in clips) / 1000 if video else None,
                 "encode_s_per_frame": sum(r.encode_seconds for r in runs) / max(coded, 1),
                 "decode_s_per_frame": sum(r.decode_seconds for r in runs) / max(coded, 1), **scores}
            points.append(p)
            examples["points"].append({"codec": codec.name, "param": p["param"], "param_name": codec.param_name,
                                       "bpp": p["bpp"], "map50": p.get("map50"), "recon": ex_rec, "dets": ex_dets})
            log.info("%s %s=%s: %.4f bpp, %s", codec.name, codec.param_name, param, p["bpp"],
                     ", ".join(f"{k} {p[k]:.3f}" for k in METRICS if p.get(k) is not None))
    bar.close()
    return {"points": points, "uncompressed": uncompressed, "ground_truth": ref.source,
            "gt_boxes": sum(len(v) for k, v in ref.gt.items()), "scored_frames": n_scored, "examples": examples}


def bd_tables(points: list[dict], metrics: list[str]) -> dict:
    """For every (metric, anchor, codec): BD-rate (%), the metric interval it was computed over, and
    the BD-metric (the average metric difference at equal rate, over the shared log-rate interval)."""
    from latentcast.tools.eval.metrics import bd_overlap, bd_quality, bd_rate

    curves: dict[str, list[dict]] = {}
    for p in points:
        curves.setdefault(p["codec"], []).append(p)
    out = {}
    for m in metrics:
        table = {}
        for anchor, ap in curves.items():
            a = [(p["bpp"], p[m]) for p in ap if p.get(m) is not None]
            row = {}
            for name, tp in curves.items():
                if name == anchor:
                    continue
                t = [(p["bpp"], p[m]) for p in tp if p.get(m) is not None]
                ov = bd_overlap(a, t)
                row[name] = {"bd_rate_percent": bd_rate(a, t), "over": list(ov) if ov else None,
                             "bd_quality": bd_quality(a, t)}
            table[anchor] = row
        out[m] = table
    return out


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    from latentcast.cloud.config import CodecConfig
    from latentcast.tools.options import EDGE_CONFIG_HELP, add_dataclass_options, add_encoder_options

    p.add_argument("--data", required=True, help="a video file, an image folder, or a COCO annotation .json")
    p.add_argument("--images", default=None, help="folder of the COCO file's images (default: the file's folder)")
    p.add_argument("--task", default="detection,classification",
                   help=f"comma-separated tasks to score: {', '.join(TASKS)} (default: both)")
    p.add_argument("--codecs", default=",".join(CODECS),
                   help=f"comma-separated codecs: {', '.join(CODECS)} (default: all)")
    p.add_argument("--labels", default="",
                   help="task labels (comma-separated) for latentcast's ROIs and the scored classes, or 'all' for "
                        "every detector class (general detection); default: the edge's default task labels "
                        "(grounding.labels in edge/edge.yaml)")
    p.add_argument("--every", type=int, default=8, help="score every N-th frame of a video (index %% N == 0)")
    p.add_argument("--max-frames", type=int, default=None, help="use only the first N video frames / images")
    p.add_argument("--gt-score", type=float, default=0.3,
                   help="without annotations: detector confidence for a box on the original to count as ground truth")
    p.add_argument("--anchor", default="x265", help="the codec every BD-rate in the table is measured against")
    p.add_argument("--grounding-every", type=int, default=5, help="latentcast edge: detector every N frames of a video")
    p.add_argument("--preset", default="medium", help="x264/x265 preset (tune is always zerolatency)")
    p.add_argument("--gop", type=int, default=None, help="x264/x265 keyframe interval in frames (default: encoder's)")
    p.add_argument("--weights", default=None, help="latentcast codec weights (default: the shipped elic-lite)")
    p.add_argument("--bundle", default=None, help="latentcast edge bundle (default: the shipped export)")
    add_dataclass_options(p, CodecConfig, include=("synthesis", "temporal_synthesis"),
                          help_extra={"synthesis": "(codec.synthesis)",
                                      "temporal_synthesis": "(codec.temporal_synthesis; latentcast-temporal)"})
    add_encoder_options(p)
    p.add_argument("--threads", type=int, default=2, help="torch threads for the latentcast decoder")
    p.add_argument(
        "--temporal-tables",
        default=None,
        help="latentcast-temporal: P-frame entropy tables (default models/weights/<codec>-temporal.safetensors)",
    )
    p.add_argument("--edge-config", default=None, help=f"latentcast-temporal: {EDGE_CONFIG_HELP}")
    p.add_argument("--temporal-levels", default=",".join(TEMPORAL_LEVELS),
                   help="latentcast-temporal: levels q<rate point>/t<threshold> to sweep "
                        f"(default {','.join(TEMPORAL_LEVELS)})")
    p.add_argument("--roibg-levels", default="",
                   help="latentcast-roibg: levels q<ROI rate point>/b<background rate point> to sweep (default: "
                        "each ROI rate point with the background one and two rate points coarser)")
    p.add_argument("--out", required=True, help="output folder: eval.json, eval.md, rate_accuracy.png, examples.png")
    p.set_defaults(func=main)


def _parse_list(text: str, valid: tuple[str, ...], what: str, *, check: bool = True) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise SystemExit(f"error: {what} is empty (valid: {', '.join(valid)})")
    for s in items:
        if check and s not in valid:
            raise SystemExit(f"error: {what} {s!r} is not one of {', '.join(valid)}")
    return items


def main(a: argparse.Namespace) -> int:
    import torch

    from latentcast.detector import YoloxDetector
    from latentcast.edge.grounding import map_labels
    from latentcast.shared import portable_path
    from latentcast.tools import provenance
    from latentcast.tools.eval.report import write_report

    tasks = tuple(_parse_list(a.task, TASKS, "--task"))
    names = _parse_list(a.codecs, CODECS, "--codecs")
    torch.set_num_threads(a.threads)
    detector = YoloxDetector(score_threshold=PRED_SCORE)
    if a.labels.strip().lower() == "all":
        labels = list(detector.labels)
    else:
        from latentcast.edge.config import GroundingConfig

        labels = [s.strip() for s in a.labels.split(",") if s.strip()] or list(GroundingConfig().labels)
    try:
        class_to_label = map_labels(labels, detector.labels)
    except ValueError as exc:
        raise SystemExit(f"error: --labels: {exc}") from None
    class_ids = sorted(class_to_label)
    clips = load_data(a.data, classes=detector.labels, every=a.every, max_frames=a.max_frames, images_dir=a.images)
    classifier = None
    if "classification" in tasks:
        from latentcast.tools.eval.metrics import Classifier

        classifier = Classifier()

    codecs = []
    from latentcast.tools.eval.learned import GroundingSettings
    from latentcast.tools.eval.task_aware import TASK_AWARE, make_task_aware

    # the edge's grounding, for latentcast's ROIs and the task-aware anchors' alike
    gdet = YoloxDetector(score_threshold=GroundingSettings.score_threshold)
    gs = GroundingSettings(labels=tuple(labels), every=a.grounding_every)
    if "latentcast" in names or "latentcast-roibg" in names or "latentcast-temporal" in names:
        from latentcast.edge.encoder import EdgeEncoder
        from latentcast.models.codec import LatentCodec
        from latentcast.tools.eval.learned import LatentcastCodec, TemporalLatentcastCodec

        enc = EdgeEncoder(bundle=a.bundle, analysis=a.analysis, rdoq=a.rdoq)
        dec = LatentCodec.load(a.weights or "elic-lite")
        dec.use_synthesis(a.synthesis)
        dec.use_synthesis(a.temporal_synthesis, temporal=True)
        if "latentcast" in names:
            codecs += [LatentcastCodec(mode=m, grounding=gs, encoder=enc, decoder=dec, detector=gdet)
                       for m in ("full", "roi")]
        if "latentcast-roibg" in names:
            levels = tuple(_parse_list(a.roibg_levels, (), "--roibg-levels", check=False)) if a.roibg_levels else ()
            try:
                codecs.append(LatentcastCodec(mode="roibg", grounding=gs, encoder=enc, decoder=dec, detector=gdet,
                                              levels=levels))
            except ValueError as exc:
                raise SystemExit(f"error: --roibg-levels: {exc}") from None
        if "latentcast-temporal" in names:
            from latentcast.models.temporal import default_tables_path
            from latentcast.proto.temporal import TemporalTables

            tables = TemporalTables.load(a.temporal_tables or default_tables_path(dec), weights_hash=dec.weights_hash)
            levels = tuple(_parse_list(a.temporal_levels, (), "--temporal-levels", check=False))
            from latentcast.tools.options import temporal_settings

            tcfg = temporal_settings(a.edge_config) if a.edge_config else None
            codecs.append(TemporalLatentcastCodec(grounding=gs, encoder=enc, decoder=dec, detector=gdet, tables=tables,
                                                  params=levels, config=tcfg))
    from latentcast.tools.eval.baselines import make_baselines

    # one encoder thread: x264 codes one slice per thread with zerolatency, so its size depends on the
    # thread count; one thread gives the same bytes on every machine
    codecs += make_baselines([n for n in names if not n.startswith("latentcast") and n not in TASK_AWARE],
                             preset=a.preset, gop=a.gop, threads=1)
    codecs += make_task_aware([n for n in names if n in TASK_AWARE], grounding=gs, detector=gdet, preset=a.preset,
                              gop=a.gop, threads=1)
    if a.anchor not in {c.name for c in codecs}:
        raise SystemExit(f"error: --anchor {a.anchor!r} is not among the codecs run "
                         f"({', '.join(c.name for c in codecs)})")

    t0 = time.time()
    res = evaluate(clips, codecs, tasks=tasks, detector=detector, classifier=classifier, class_ids=class_ids,
                   class_names=[detector.labels[i] for i in class_ids], gt_score=a.gt_score)
    metrics = [m for m, (_, need) in METRICS.items() if need is None or need in tasks]
    video = any(c.n_frames > 1 for c in clips)
    result = {
        "command": provenance.command(),
        "commit": provenance.commit(),
        "machine": provenance.machine(),
        "seconds": round(time.time() - t0, 1),
        "data": {"path": portable_path(a.data), "kind": "video" if video else "images", "clips": len(clips),
                 "frames": sum(c.n_frames for c in clips), "scored_frames": res["scored_frames"],
                 "every": a.every if video else None, "sizes": sorted({f"{c.width}x{c.height}" for c in clips}),
                 "fps": sorted({c.fps for c in clips}) if video else None},
        "tasks": list(tasks),
        "labels": "all detector classes (general detection)" if a.labels.strip().lower() == "all" else labels,
        "scored_classes": [detector.labels[i] for i in class_ids],
        "ground_truth": res["ground_truth"],
        "gt_score": a.gt_score,
        "gt_boxes": res["gt_boxes"],
        "detector": {"model": portable_path(detector.model_path), "score_threshold_for_map": PRED_SCORE},
        "classifier": {"model": portable_path(classifier.model_path)} if classifier is not None else None,
        "bpp": "8 x real coded bytes (headers included; video codecs: the whole clip's bitstream) / pixels coded",
        "codecs": {c.name: {"param_name": c.param_name, "params": [p.item() if hasattr(p, "item") else p
                                                                  for p in c.params], **c.describe()} for c in codecs},
        "anchor": a.anchor,
        "uncompressed": res["uncompressed"],
        "points": res["points"],
        "bd_rate": bd_tables(res["points"], metrics),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    files = write_report(result, res["examples"], out)
    print(json.dumps({"out": [portable_path(f) for f in files], "seconds": result["seconds"]}, indent=2))
    return 0
