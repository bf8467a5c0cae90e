"""Grounding cost on the edge: seconds per 768x576 frame for YOLOX-nano (the embedded profile), the
exported tiny random Grounding DINO (graph structure at toy widths: a floor, not a quality model) and,
when a local folder is given, the real Grounding DINO exported the same way. ONNX Runtime throughout.

``main(args)`` reads: ``out`` (JSON path), ``frames`` (timed frames per detector, after one warm-up),
``threads`` (ONNX Runtime intra-op threads, and torch threads for the export), and optionally ``model``
(a local Grounding DINO folder, e.g. from ``huggingface-cli download IDEA-Research/grounding-dino-tiny``),
``image_size`` ("HxW" of the exported graph, default 576x768), ``labels`` (comma-separated),
``provider`` ("cpu" | "cuda" | "tensorrt"), ``full_random`` (also time the released architecture with
random weights: the cost does not depend on the weights), ``full_frames`` (timed frames for the full-size
models, default 5). :func:`add_arguments` declares them on an argparse parser.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["main", "add_arguments", "DEFAULT_LABELS"]

DEFAULT_LABELS = "person,car,bicycle,bag"
FRAME_SIZE = (576, 768)  # (height, width) of the vtest frames


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--out", default="results/grounding_bench.json", help="JSON file to write")
    p.add_argument("--frames", type=int, default=20, help="timed frames per detector (after one warm-up)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime / torch threads")
    p.add_argument("--grounding-model", "--model", dest="model", default=None,
                   help="local Grounding DINO folder (e.g. huggingface-cli download IDEA-Research/grounding-dino-tiny "
                        "--local-dir PATH); without it the real model is skipped")
    p.add_argument("--full-random", dest="full_random", action="store_true",
                   help="also time the released architecture (Swin-T + BERT-base) with random weights: its cost "
                        "without the weights")
    p.add_argument("--full-frames", dest="full_frames", type=int, default=5,
                   help="timed frames for the full-size models (seconds each on a CPU)")
    p.add_argument("--image-size", dest="image_size", default="576x768", help="exported graph input HxW")
    p.add_argument("--labels", default=DEFAULT_LABELS, help="comma-separated task labels")
    p.add_argument("--provider", default="cpu", choices=("cpu", "cuda", "tensorrt"),
                   help="ONNX Runtime execution provider for the Grounding DINO graphs")
    return p


def _frames(n: int) -> tuple[list[np.ndarray], str]:
    import cv2

    from latentcast.shared import shared_path

    try:
        cap = cv2.VideoCapture(str(shared_path("data", "video", "vtest.avi")))
        frames = []
        while len(frames) < n:
            ok, bgr = cap.read()
            if not ok:
                break
            frames.append(np.ascontiguousarray(bgr[:, :, ::-1]))
        cap.release()
        if frames:
            while len(frames) < n:
                frames.append(frames[len(frames) % max(1, len(frames))])
            return frames, "vtest.avi"
    except FileNotFoundError as exc:
        log.warning("%s; timing on random frames", exc)
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (*FRAME_SIZE, 3), dtype=np.uint8) for _ in range(n)], "random"


def _time(detector, frames: list[np.ndarray]) -> dict:
    detector.detect(frames[0])  # warm-up (session initialisation, allocations)
    t, n = [], []
    for f in frames:
        t0 = time.perf_counter()
        dets = detector.detect(f)
        t.append(time.perf_counter() - t0)
        n.append(len(dets))
    return {"seconds_per_frame_median": float(np.median(t)), "seconds_per_frame_mean": float(np.mean(t)),
            "seconds_per_frame_min": float(np.min(t)), "detections_per_frame_mean": float(np.mean(n)),
            "frames": len(t)}


def _grounding(model, tok, labels, size, threads, provider, workdir: Path) -> dict:
    from latentcast.edge.open_vocab import OpenVocabDetector
    from latentcast.models.grounding_dino import export_grounding

    t0 = time.perf_counter()
    export_grounding(model, tok, labels, workdir, image_size=size)
    t_export = time.perf_counter() - t0
    det = OpenVocabDetector(bundle=workdir, threads=threads, provider=provider)
    cfg = model.config
    return {
        "model": det.manifest["model"],
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "config": {"d_model": cfg.d_model, "num_queries": cfg.num_queries, "max_text_len": cfg.max_text_len,
                   "encoder_layers": cfg.encoder_layers, "decoder_layers": cfg.decoder_layers,
                   "num_feature_levels": cfg.num_feature_levels,
                   "backbone": getattr(cfg.backbone_config, "model_type", None),
                   "text": getattr(cfg.text_config, "model_type", None)},
        "image_size": list(size),
        "text_chunks": len(det.manifest["chunks"]),
        "onnx_megabytes": round((workdir / "image.onnx").stat().st_size / 2 ** 20, 2),
        "export_seconds": round(t_export, 2),
        "provider": det._sess.get_providers()[0],
        "detector": det,
    }


def main(args) -> int:
    import torch

    from latentcast.detector import YoloxDetector
    from latentcast.models.grounding_dino import load_grounding_dino, random_grounding_dino, tiny_grounding_dino
    from latentcast.tools.provenance import command, commit, machine

    n = int(getattr(args, "frames", 20))
    threads = int(getattr(args, "threads", 2))
    provider = getattr(args, "provider", "cpu") or "cpu"
    labels = [s.strip() for s in (getattr(args, "labels", None) or DEFAULT_LABELS).split(",") if s.strip()]
    hw = str(getattr(args, "image_size", None) or "576x768").lower().split("x")
    if len(hw) != 2 or not all(v.isdigit() for v in hw):
        raise SystemExit(f"error: --image-size {getattr(args, 'image_size', None)!r} must be HxW, e.g. 576x768")
    size = (int(hw[0]), int(hw[1]))
    n_heavy = max(1, min(n, int(getattr(args, "full_frames", 5) or 5)))
    torch.set_num_threads(max(1, threads))
    frames, source = _frames(n)

    results: dict[str, dict] = {}
    results["yolox_nano"] = {"model": "yolox_nano.onnx (shared), COCO 80 classes, input 416x416",
                             "provider": "CPUExecutionProvider",
                             **_time(YoloxDetector(threads=threads), frames)}
    log.info("yolox-nano: %.4f s/frame", results["yolox_nano"]["seconds_per_frame_median"])

    with tempfile.TemporaryDirectory(prefix="bench_grounding_") as tmp:
        tmp = Path(tmp)
        model, tok = tiny_grounding_dino(seed=0, max_text_len=32, vocab_dir=tmp / "vocab")
        r = _grounding(model, tok, labels, size, threads, provider, tmp / "tiny")
        det = r.pop("detector")
        results["grounding_dino_tiny_random"] = r | _time(det, frames) | {
            "note": "random weights at toy widths: the graph's structure and overheads, not a usable detector"}
        log.info("tiny Grounding DINO: %.4f s/frame", results["grounding_dino_tiny_random"]["seconds_per_frame_median"])

        heavy = frames[:n_heavy]
        if getattr(args, "full_random", False):
            model, tok = random_grounding_dino(seed=0, vocab_dir=tmp / "vocab")
            r = _grounding(model, tok, labels, size, threads, provider, tmp / "full_random")
            det = r.pop("detector")
            del model
            results["grounding_dino_swin_t_random"] = r | _time(det, heavy) | {
                "note": "the released grounding-dino-tiny architecture with random weights: its cost, not its output"}
            del det
            log.info("Swin-T Grounding DINO (random weights): %.3f s/frame",
                     results["grounding_dino_swin_t_random"]["seconds_per_frame_median"])
        model_dir = getattr(args, "model", None)
        if model_dir:
            model, proc = load_grounding_dino(model_dir)
            r = _grounding(model, proc, labels, size, threads, provider, tmp / "full")
            det = r.pop("detector")
            results["grounding_dino"] = r | _time(det, heavy)
            log.info("Grounding DINO %s: %.3f s/frame", model_dir,
                     results["grounding_dino"]["seconds_per_frame_median"])
        else:
            results["grounding_dino"] = {"skipped": "no --model folder given (huggingface-cli download "
                                                    "IDEA-Research/grounding-dino-tiny --local-dir PATH)"}

    out = {
        "command": command(),
        "commit": commit(),
        "machine": machine(),
        "device": "cpu" if provider == "cpu" else provider,
        "config": {"frames": n, "frame_source": source, "frame_size": [FRAME_SIZE[1], FRAME_SIZE[0]],
                   "threads": threads, "labels": labels, "full_size_frames": n_heavy,
                   "grounding_image_size": list(size),
                   "box_threshold": 0.35, "text_threshold": 0.25,
                   "timing": "detect() wall time per frame incl. pre/post-processing, after one warm-up frame"},
        "results": results,
    }
    path = Path(getattr(args, "out", None) or "results/grounding_bench.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps({k: {kk: v.get(kk) for kk in ("seconds_per_frame_median", "skipped") if kk in v}
                      for k, v in results.items()}, indent=2))
    return 0


if __name__ == "__main__":  # python -m latentcast.tools.bench.grounding
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(main(add_arguments(argparse.ArgumentParser(description=__doc__)).parse_args()))
