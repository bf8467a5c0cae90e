"""Temporal coding on a video: does the edge meet a target bitrate, and how does the stream recover from loss?

::

    video ─► edge grounding (ROIs, every frame) ─► TemporalEncoder (fixed level, or rate control at --targets)
          ─► packets ─► [lose each with probability --loss] ─► TemporalDecoder (the cloud's, in order)
               refused (missing reference) ─► refresh request reaches the edge --rtt-frames later ─► keyframe
          ─► scored frames (every 8th): YOLOX-nano on what the cloud rendered vs on the original
             (a frame the cloud could not render counts with no detections)

Writes JSON (with the command, machine and commit) and a markdown table beside it: per run the achieved
kbit/s (whole clip and worst 1-second window), keyframes, frames lost/refused, the longest recovery (frames
from a loss to the next rendered frame), the levels rate control used, and mAP@0.5 / mAP@0.5:0.95.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["main", "add_arguments"]


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--video", default=None, help="video to code (default vtest.avi in the shared folder)")
    p.add_argument("--targets", default="60,100,200", help="rate-control targets in kbit/s, comma-separated")
    p.add_argument("--loss", type=float, default=0.01, help="packet loss probability of the lossy runs")
    p.add_argument("--rtt-frames", type=int, default=2, help="frames between a refused frame and the edge seeing "
                                                               "the refresh request")
    p.add_argument("--max-frames", type=int, default=None, help="code only the first N frames")
    p.add_argument("--labels", default="person,vehicle,bicycle", help="task labels (ROIs and scored classes)")
    p.add_argument("--bundle", default=None, help="edge bundle (default: the shipped export)")
    p.add_argument("--weights", default=None, help="codec weights (default: the shipped elic-lite)")
    p.add_argument(
        "--tables", default=None, help="P-frame tables (default: models/weights/<codec>-temporal.safetensors)"
    )
    p.add_argument("--threads", type=int, default=2, help="threads of the decoder (torch, ONNX Runtime)")
    from latentcast.cloud.config import CodecConfig
    from latentcast.edge.config import TemporalConfig
    from latentcast.tools.options import add_dataclass_options, add_encoder_options

    # the cloud's and the edge's settings, with their defaults and comments from the configs
    add_dataclass_options(p, CodecConfig,
                          include=("temporal_synthesis", "render_grow", "render_halo", "render_runtime"))
    add_encoder_options(p)
    add_dataclass_options(p, TemporalConfig, include=("change_threshold",),
                          help_extra={"change_threshold": "(the changed-cell edge runs)"})
    p.add_argument("--no-cost-levers", dest="cost_levers", action="store_false",
                   help="skip the runs that time the edge's and the cloud's changed-cell levers")
    p.add_argument("--out", default="results/temporal_bench.json", help="JSON file to write (and .md beside it)")
    return p


def _run(name: str, clip, rois, analysis, *, encoder, decoder_codec, tables, config, loss: float, rtt: int,
         detector, gt, class_ids, seed: int = 0, change: bool = False, tiled: bool = True,
         render_every: bool = False, reference: dict | None = None, render: dict | None = None,
         staged: bool = True) -> dict:
    """One pass over the clip. ``change``: the edge analyses only the changed cells (else the whole frame,
    ``analysis``: precomputed with its time), stage by stage (``staged``, bundles that have the stages) or
    on crops with the whole ``analysis_halo``; ``tiled``: the cloud renders only the changed cells;
    ``render_every``: render every frame (timed), not only the scored ones; ``reference``: rendered frames
    of another run to compare with (PSNR)."""
    from latentcast.edge.temporal import TemporalEncoder
    from latentcast.models.temporal import MissingReference, TemporalDecoder
    from latentcast.tools.eval.metrics import detection_map, psnr

    cfg = config if change else dataclasses.replace(config, change_threshold=0.0)
    enc = TemporalEncoder(compressor=encoder, tables=tables, config=cfg, fps=clip.fps)
    if change and not staged:  # g_a on halo crops, as bundles exported before the analysis stages do
        from latentcast.edge.change import ChangeAnalyzer

        enc.change = ChangeAnalyzer(encoder.analyze, halo=encoder.analysis_halo, threshold=cfg.change_threshold)
    dec = TemporalDecoder(codec=decoder_codec, tables=tables, tiled=tiled, **(render or {}))
    edge_ms, render_ms, frames = [], [], {}
    rng = np.random.default_rng(seed)
    keep = set(clip.scored)
    sizes, levels, preds = [], collections.Counter(), {}
    lost = refused = 0
    due: int | None = None  # frame index at which the edge sees the pending refresh request
    broken_since: int | None = None
    recoveries: list[int] = []
    t0 = time.perf_counter()
    for i, frame in clip.frames():
        if i >= clip.n_frames:
            break
        if due is not None and i >= due:
            enc.request_refresh()
            due = None
        levels[f"q{enc.level[0]}/t{enc.level[1]}"] += 1
        t_enc = time.perf_counter()
        data = enc.encode(frame, rois[i], analysis=None if change else analysis[i][0])
        edge_ms.append((time.perf_counter() - t_enc + (0.0 if change else analysis[i][1])) * 1e3)
        sizes.append(len(data))
        if loss > 0 and rng.random() < loss:
            lost += 1
            broken_since = i if broken_since is None else broken_since
            continue
        try:
            render = dec.prepare(data)
        except MissingReference:
            refused += 1
            broken_since = i if broken_since is None else broken_since
            if due is None:
                due = i + max(1, rtt)
            continue
        if broken_since is not None:
            recoveries.append(i - broken_since)
            broken_since = None
        if i in keep or render_every:
            t_render = time.perf_counter()
            img = render(True).frame
            render_ms.append((time.perf_counter() - t_render) * 1e3)
            if i in keep:
                preds[i] = detector.detect(img)
                frames[i] = img
    seconds = time.perf_counter() - t0
    fps = clip.fps
    per_s = [sum(sizes[k:k + int(round(fps))]) * 8 / 1000 for k in range(0, len(sizes), max(1, int(round(fps))))]
    m = detection_map(gt, preds, class_ids=class_ids)
    c = config
    originals = {}
    for i, f in clip.frames():  # the scored originals, reading no further than the last one
        if not frames or i > max(frames):
            break
        if i in frames:
            originals[i] = f
    edge = ("changed cells" if staged else "changed cells, halo crops") if change else "whole frame"
    cost = {"edge": edge, "cloud": "changed cells" if tiled else "whole frame",
            "edge_ms_p50": round(float(np.median(edge_ms)), 1), "render_ms_p50": round(float(np.median(render_ms)), 1)
            if render_ms else None, "rendered": len(render_ms),
            "psnr_db": round(float(np.mean([psnr(frames[i], originals[i]) for i in frames])), 3) if frames else None}
    if reference:
        both = [i for i in frames if i in reference]
        cost["psnr_vs_reference_db"] = {"min": round(min(psnr(frames[i], reference[i]) for i in both), 2),
                                        "mean": round(float(np.mean([psnr(frames[i], reference[i]) for i in both])),
                                                      2)} if both else None
    return {
        "cost": cost,
        "_frames": frames,
        "run": name,
        "target_kbps": c.target_kbps or None,
        "level": None if c.target_kbps else f"q{c.rate_point}/t{c.threshold}",
        "loss": loss,
        "frames": len(sizes),
        "kbps": sum(sizes) * 8 / 1000 / (len(sizes) / fps),
        "kbps_worst_1s": max(per_s),
        "bpp": 8 * sum(sizes) / (len(sizes) * clip.width * clip.height),
        "keyframes": enc.counts["key"],
        "keyframe_reasons": {k: v for k, v in enc.counts.items() if k not in ("key", "p")},
        "lost": lost,
        "refused": refused,
        "recoveries": len(recoveries),
        "longest_recovery_frames": max(recoveries) if recoveries else 0,
        "scored_rendered": len(preds),
        "scored": len(gt),
        "map50": m["map50"],
        "map": m["map"],
        "levels": dict(levels),
        "seconds": round(seconds, 1),
    }


def _markdown(res: dict) -> str:
    lines = [
        f"# Temporal coding: rate control and loss, `{res['data']['path']}`",
        "",
        f"- command: `{res['command']}`",
        f"- commit {res['commit']}, {res['machine'].get('cpu', '')}",
        f"- {res['data']['frames']} frames at {res['data']['fps']} fps, {res['data']['size']}; "
        f"{res['data']['scored']} scored (every 8th) against YOLOX-nano on the originals; refresh requests reach "
        f"the edge {res['rtt_frames']} frames after the refused frame",
        "- a scored frame the cloud could not render counts with no detections",
        "- frames render with the synthesis: " + res.get("synthesis", "the codec's own")
        + "; the edge's g_a runs in " + res.get("analysis", "float32"),
        "",
        "| run | target kbit/s | kbit/s | worst 1 s | bpp | keyframes | lost | refused | longest recovery (frames) "
        "| mAP@0.5 | mAP@0.5:0.95 | levels used |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        lv = ", ".join(f"{k} {v}" for k, v in sorted(r["levels"].items(), key=lambda kv: -kv[1]))
        lines.append(f"| {r['run']} | {r['target_kbps'] or '-'} | {r['kbps']:.1f} | {r['kbps_worst_1s']:.1f} | "
                     f"{r['bpp']:.4f} | {r['keyframes']} | {r['lost']} | {r['refused']} | "
                     f"{r['longest_recovery_frames']} | {r['map50']:.3f} | {r['map']:.3f} | {lv} |")
    if res.get("cost_runs"):
        lines += ["", "Cost follows change (level q0/t1, no loss, every frame rendered): the edge's g_a on the changed "
                  "cells only, the cloud's g_s on the changed cells only (render settings: "
                  f"{res.get('render')}); medians per frame on this machine, PSNR of "
                  "the scored frames against the originals and against the first run's renders.", "",
                  "| edge | cloud | edge ms (g_a + coding) | cloud render ms | kbit/s | mAP@0.5 | mAP@0.5:0.95 | "
                  "PSNR dB | PSNR vs whole/whole (min, mean) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in res["cost_runs"]:
            c = r["cost"]
            ref = c.get("psnr_vs_reference_db")
            lines.append(f"| {c['edge']} | {c['cloud']} | {c['edge_ms_p50']:.1f} | {c['render_ms_p50']:.1f} | "
                         f"{r['kbps']:.1f} | {r['map50']:.3f} | {r['map']:.3f} | {c['psnr_db']:.2f} | "
                         + (f"{ref['min']:.1f}, {ref['mean']:.1f}" if ref else "-") + " |")
    return "\n".join(lines) + "\n"


def main(a: argparse.Namespace) -> int:
    import torch

    from latentcast.detector import YoloxDetector
    from latentcast.edge.config import GroundingConfig, TemporalConfig
    from latentcast.edge.encoder import EdgeEncoder
    from latentcast.edge.grounding import map_labels
    from latentcast.models.codec import LatentCodec
    from latentcast.models.temporal import default_tables_path
    from latentcast.proto.temporal import TemporalTables
    from latentcast.shared import portable_path, shared_path
    from latentcast.tools import provenance
    from latentcast.tools.eval.data import GtBox, video_clip
    from latentcast.tools.eval.learned import GroundingSettings, grounding_rois

    torch.set_num_threads(a.threads)
    path = Path(a.video) if a.video else shared_path("data", "video", "vtest.avi")
    targets = [float(t) for t in str(a.targets).split(",") if t.strip()]
    if not 0.0 <= a.loss < 1.0:
        raise SystemExit(f"error: --loss {a.loss} must be in [0, 1)")
    labels = [s.strip() for s in a.labels.split(",") if s.strip()] or list(GroundingConfig().labels)
    clip = video_clip(path, every=8, max_frames=a.max_frames)
    encoder = EdgeEncoder(bundle=a.bundle, analysis=a.analysis, rdoq=a.rdoq)
    codec = LatentCodec.load(a.weights or "elic-lite")
    codec.use_synthesis(a.temporal_synthesis, temporal=True)
    tables = TemporalTables.load(
        getattr(a, "tables", None) or default_tables_path(codec), weights_hash=codec.weights_hash
    )
    detector = YoloxDetector(score_threshold=0.01)
    class_ids = sorted(map_labels(labels, detector.labels))
    gs = GroundingSettings(labels=tuple(labels))
    t0 = time.time()
    rois = grounding_rois(clip, gs, YoloxDetector(score_threshold=gs.score_threshold), {}, every_frame=True)
    analysis, gt = {}, {}
    for i, frame in clip.frames():
        if i >= clip.n_frames:
            break
        t_ana = time.perf_counter()
        analysis[i] = (encoder.analyze(frame), time.perf_counter() - t_ana)  # (y, z), seconds
        if i in set(clip.scored):
            gt[i] = [GtBox(x0=d.x0, y0=d.y0, x1=d.x1, y1=d.y1, class_id=d.class_id) for d in detector.detect(frame)
                     if d.score >= 0.3]
    base = TemporalConfig(mode="temporal", change_threshold=a.change_threshold)
    runs = [("fixed q0/t1", base, 0.0)]
    runs += [(f"target {t:g} kbit/s", dataclasses.replace(base, target_kbps=t), 0.0) for t in targets]
    runs += [(f"fixed q0/t1, {a.loss:.0%} loss", base, a.loss)]
    if targets:
        runs += [(f"target {targets[0]:g} kbit/s, {a.loss:.0%} loss",
                  dataclasses.replace(base, target_kbps=targets[0]), a.loss)]
    out_runs = []
    for name, cfg, loss in runs:
        r = _run(name, clip, rois, analysis, encoder=encoder, decoder_codec=codec, tables=tables, config=cfg,
                 loss=loss, rtt=a.rtt_frames, detector=detector, gt=gt, class_ids=class_ids)
        r.pop("_frames")
        log.info("%s: %.1f kbit/s, mAP@0.5 %.3f, refused %d", name, r["kbps"], r["map50"], r["refused"])
        out_runs.append(r)
    # cost follows change: each lever alone and both, on the fixed level, every frame rendered and timed
    cost_runs, reference = [], None
    from latentcast.models.synthesis_runtime import resolve_render_runtime

    render = {"grow": a.render_grow, "halo": a.render_halo, "runtime": resolve_render_runtime(a.render_runtime),
              "threads": a.threads}
    arms = [(False, False, True), (True, False, True), (False, True, True), (True, True, True)]
    if encoder.analysis_stages is not None:
        arms.append((True, True, False))  # the edge's g_a on halo crops instead of stage by stage
    for change, tiled, staged in arms:
        if not a.cost_levers:
            break
        where = {False: "whole frame", True: "changed cells"}
        name = f"edge {where[change]}{'' if staged else ' (halo crops)'}, cloud {where[tiled]}"
        r = _run(name, clip, rois, analysis, encoder=encoder, decoder_codec=codec, tables=tables, config=base,
                 loss=0.0, rtt=a.rtt_frames, detector=detector, gt=gt, class_ids=class_ids, change=change, tiled=tiled,
                 render_every=True, reference=reference, render=render, staged=staged)
        frames = r.pop("_frames")
        reference = reference or frames
        log.info("%s: edge %.1f ms, render %.1f ms, mAP@0.5 %.3f", name, r["cost"]["edge_ms_p50"],
                 r["cost"]["render_ms_p50"], r["map50"])
        cost_runs.append(r)
    res = {"command": provenance.command(), "commit": provenance.commit(), "machine": provenance.machine(),
           "seconds": round(time.time() - t0, 1),
           "data": {"path": portable_path(path), "frames": clip.n_frames, "fps": clip.fps,
                    "size": f"{clip.width}x{clip.height}", "scored": len(gt)},
           "labels": labels, "tables": dict(tables.meta), "temporal_defaults": dataclasses.asdict(base),
           "rtt_frames": a.rtt_frames, "runs": out_runs, "cost_runs": cost_runs,
           "render": render,
           "synthesis": codec.temporal_synthesis_name or "the codec's own", "analysis": encoder.analysis,
           "rdoq": encoder.rdoq}
    provenance.write_results(a.out, res, _markdown(res))
    print(_markdown(res))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise SystemExit(main(add_arguments(argparse.ArgumentParser(description=__doc__)).parse_args()))
