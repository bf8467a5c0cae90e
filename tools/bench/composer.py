"""Composer benchmark: seconds per 768x576 frame for ``none`` vs ``controlnet``, and what the
sampling options do to quality.

::

    vtest frame ─► YOLOX persons (or a centred box) ─► ROI-only packet (elic-lite, PyTorch reference)
        ─► decode_latent ─► ẑ_c ─► composer ─► frame ─► PSNR (frame / inside / outside the
                                                          transmitted cells), YOLOX recall vs the original

Composers timed (median of ``--repeats`` after one warm-up per composer):

- ``none``: the codec latent space's decoder (``elic-lite``: ``pixels:4``, a pixel shuffle);
- ``controlnet`` with tiny random components (``tiny_components``: the code path, not the paper's
  quality or cost), at each of ``--steps`` (default 8 and 50), from pure noise and from the
  partially-noised decoded latent (``--strength``, default 0.5), and a batch of ``--batch`` streams;
- the same with Stable Diffusion 2.1-base (+ a trained ControlNet) when ``--sd`` is given.

The JSON records the command, commit, machine, device, dtype and each composer's ``describe()``,
so the same command measures a GPU elsewhere (``--device cuda --dtype float16``)::

    latentcast bench composer --out results/composer_bench.json
    latentcast bench composer --sd /models/sd-2-1-base --controlnet /models/discover-cn \\
        --device cuda --dtype float16 --out results/composer_bench_gpu.json
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np

from latentcast.boxes import greedy_match
from latentcast.tools.eval.metrics import psnr

log = logging.getLogger(__name__)

PROG = "python -m latentcast.tools.bench.composer"  # how this module runs on its own (or: latentcast bench composer)

W, H = 768, 576


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """This benchmark's options (``latentcast bench composer`` and ``python -m latentcast.tools.bench.composer``)."""
    opts: list[tuple[str, dict]] = [
        (
            "--out",
            dict(default="results/composer_bench.json", help="JSON result path; a .md table is written beside it"),
        ),
        ("--weights", dict(default="elic-lite", help="codec weights (default: the shipped elic-lite)")),
        ("--frame", dict(type=int, default=0, help="vtest frame index (default 0)")),
        ("--rate", dict(type=int, default=1, help="codec rate point (default 1)")),
        (
            "--steps",
            dict(default="8,50", help="sampling steps to time, comma-separated (default 8,50: machines, people)"),
        ),
        (
            "--strength",
            dict(
                type=float,
                default=0.5,
                help="partial-noise start to time as well (fraction of the schedule run; 1 = off; default 0.5)",
            ),
        ),
        (
            "--batch",
            dict(
                type=int, default=2, help="streams composed in one batch for the batched timing (default 2; 1 = skip)"
            ),
        ),
        ("--repeats", dict(type=int, default=3, help="timed runs per configuration (default 3)")),
        ("--threads", dict(type=int, default=2, help="torch intra-op threads (default 2)")),
        ("--device", dict(default=None, help="torch device (default: cuda when available, else cpu)")),
        ("--dtype", dict(default="float32", choices=("float32", "float16", "bfloat16"), help="diffusion dtype")),
        (
            "--sd",
            dict(default=None, help="Stable Diffusion 2.1-base folder or hub id (cached): time the real models too"),
        ),
        ("--controlnet", dict(default=None, help="trained ControlNet + adapter folder (with --sd)")),
        ("--no-tiny", dict(action="store_true", help="skip the tiny random components")),
        ("--no-detector", dict(action="store_true", help="centred ROI instead of YOLOX boxes; no recall")),
    ]
    for name, kw in opts:
        p.add_argument(name, **kw)
    return p


def _psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR (dB) of a region; None for an empty one."""
    return psnr(a, b) if a.size else None


def _recall(reference: list, found: list, thr: float = 0.5) -> float | None:
    """Share of the original frame's detections found again (same class, IoU >= thr) on the reconstruction."""
    if not reference:
        return None
    pairs = greedy_match([(r.x0, r.y0, r.x1, r.y1) for r in reference], [(d.x0, d.y0, d.x1, d.y1) for d in found],
                         iou=thr, compatible=lambda i, j: found[j].class_id == reference[i].class_id)
    return len(pairs) / len(reference)


def _quality(frame: np.ndarray, original: np.ndarray, inside: np.ndarray, detector, ref_dets) -> dict:
    q = {"psnr": _psnr(frame, original), "psnr_inside_roi": _psnr(frame[inside], original[inside]),
         "psnr_outside_roi": _psnr(frame[~inside], original[~inside])}
    if detector is not None:
        q["detection_recall"] = _recall(ref_dets, detector.detect(frame))
    return q


def _time(fn, repeats: int) -> tuple[float, list[float], object]:
    out, ts = None, []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), ts, out


def markdown(result: dict) -> str:
    fr = result["frame"]
    lines = [
        f"Composer benchmark, {W}x{H} vtest frame {fr['index']} ({fr['rois']} ROIs, {fr['bpp']:.3f} bpp, "
        f'caption "{fr["caption"]}"), device {result["device"]} ({result["dtype"]}), '
        f"{result['machine'].get('torch_threads')} torch threads, commit {str(result['commit'])[:10]}",
        "",
        f"decode_latent (entropy decoding + g_s): {result['decode_latent_seconds']:.3f} s",
        "",
        "| composer | weights | steps | strength | UNet evals | batch | s / frame | PSNR | PSNR in ROI | PSNR outside "
        "| recall |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v, fmt=".2f"):
        return "n/a" if v is None else format(v, fmt)

    for r in result["runs"]:
        lines.append(f"| {r['composer']} | {r['weights']} | {r.get('steps', '-')} | {r.get('strength', '-')} | "
                     f"{r.get('unet_evals', 0)} | {r['batch']} | {r['seconds_per_frame']:.3f} | {f(r['psnr'])} | "
                     f"{f(r['psnr_inside_roi'])} | {f(r['psnr_outside_roi'])} | {f(r.get('detection_recall'))} |")
    lines += ["", result["note"]]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    import cv2
    import torch

    from latentcast.models.codec import LatentCodec
    from latentcast.models.composer import (
        ComposeRequest,
        ControlNetComposer,
        LatentDecoderComposer,
        caption_for,
        load_components,
        tiny_components,
    )
    from latentcast.proto.bitstream import Roi
    from latentcast.shared import portable_path, shared_path
    from latentcast.tools.provenance import command, commit, machine, write_results

    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    steps_list = [int(s) for s in str(args.steps).split(",") if s.strip()]
    strengths = [1.0] + ([args.strength] if args.strength < 1.0 else [])

    video = shared_path("data", "video", "vtest.avi")
    cap = cv2.VideoCapture(str(video))
    cap.set(cv2.CAP_PROP_POS_FRAMES, args.frame)
    ok, bgr = cap.read()
    cap.release()
    if not ok:
        raise SystemExit(f"error: cannot read frame {args.frame} of {video}")
    frame = np.ascontiguousarray(bgr[:, :, ::-1])
    if frame.shape[:2] != (H, W):
        frame = cv2.resize(frame, (W, H), interpolation=cv2.INTER_AREA)

    detector, ref_dets = None, []
    if not args.no_detector:
        try:
            from latentcast.detector import YoloxDetector

            detector = YoloxDetector(threads=args.threads)
            ref_dets = [d for d in detector.detect(frame) if d.label == "person"]
        except (FileNotFoundError, ImportError) as e:
            log.warning("no YOLOX detector (%s): centred ROI, no recall", e)
            detector = None
    if ref_dets:
        rois = [Roi(x0=int(d.x0), y0=int(d.y0), x1=max(int(d.x0) + 1, int(np.ceil(d.x1))),
                    y1=max(int(d.y0) + 1, int(np.ceil(d.y1))), label_id=0, score=d.score) for d in ref_dets]
        labels = ["person"] * len(rois)
    else:
        bw, bh = W // 3, H // 3
        rois = [Roi(x0=(W - bw) // 2, y0=(H - bh) // 2, x1=(W + bw) // 2, y1=(H + bh) // 2, label_id=0)]
        labels = ["person"]

    codec = LatentCodec.load(args.weights)
    data = codec.compress(frame, rois, rate_point=args.rate)
    codec.decompress(data, decode_frame=False)  # warm-up
    t_dec, _, rec = _time(lambda: codec.decompress(data, decode_frame=False), args.repeats)
    inside = np.repeat(np.repeat(rec.mask, 16, axis=0), 16, axis=1)[:H, :W]

    def request(stream: str, steps: int = 8, strength: float = 1.0) -> ComposeRequest:
        return ComposeRequest.from_reconstruction(rec, labels=labels, stream_id=stream, steps=steps, strength=strength)

    runs: list[dict] = []
    described: dict[str, dict] = {}

    none = LatentDecoderComposer(codec)
    none.compose([request("cam-0")])
    t, ts, frames = _time(lambda: none.compose([request("cam-0")]), args.repeats)
    described["none"] = none.describe()
    runs.append({"composer": "none", "weights": codec.latent_space_spec, "batch": 1, "seconds_per_frame": t,
                 "seconds": ts, **_quality(frames[0], frame, inside, detector, ref_dets)})
    log.info("none: %.3f s/frame", t)

    setups = []
    if not args.no_tiny:
        setups.append(("tiny-random", lambda: tiny_components(0, codec_channels=codec.latent_space().channels)))
    if args.sd:
        setups.append(
            (
                f"sd={portable_path(args.sd)}"
                + (f", controlnet={portable_path(args.controlnet)}" if args.controlnet else ", controlnet=untrained"),
                lambda: load_components(
                    args.sd, args.controlnet, torch_dtype=dtype, codec_channels=codec.latent_space().channels
                ),
            )
        )
    for name, build in setups:
        comp = ControlNetComposer(**build(), codec_space=codec.latent_space(), device=device, dtype=dtype)
        described[f"controlnet[{name}]"] = comp.describe()
        comp.compose([request("cam-0", steps=min(steps_list))])  # warm-up (allocations, caption cache)
        for steps in steps_list:
            for strength in strengths:
                t, ts, out = _time(lambda comp=comp, steps=steps, strength=strength: comp.compose(
                    [request("cam-0", steps, strength)], return_latents=True),
                                   args.repeats)
                res = out[0]
                runs.append({"composer": "controlnet", "weights": name, "steps": steps, "strength": strength,
                             "unet_evals": res.steps, "keep_roi": comp.keep_roi, "batch": 1,
                             "seconds_per_frame": t, "seconds": ts,
                             **_quality(res.frame, frame, inside, detector, ref_dets)})
                log.info("controlnet[%s] steps %d strength %.2f: %.3f s/frame", name, steps, strength, t)
        if args.batch > 1:
            steps = min(steps_list)
            reqs = [request(f"cam-{i}", steps) for i in range(args.batch)]
            t, ts, out = _time(lambda comp=comp, reqs=reqs: comp.compose(reqs), args.repeats)
            runs.append({"composer": "controlnet", "weights": name, "steps": steps, "strength": 1.0,
                         "unet_evals": steps, "keep_roi": comp.keep_roi, "batch": args.batch,
                         "seconds_per_frame": t / args.batch, "seconds": ts,
                         **_quality(out[0], frame, inside, detector, ref_dets)})
        comp = None  # free the models before the next setup

    result = {
        "command": command(getattr(args, "prog", PROG)),
        "commit": commit(),
        "machine": machine(),
        "device": device,
        "dtype": args.dtype,
        "codec": {
            "name": codec.codec_name,
            "weights_hash": codec.weights_hash.hex(),
            "latent_space": codec.latent_space_spec,
        },
        "frame": {
            "video": portable_path(video),
            "index": args.frame,
            "width": W,
            "height": H,
            "rois": len(rois),
            "labels": labels,
            "caption": caption_for(labels),
            "packet_bytes": len(data),
            "bpp": len(data) * 8 / (W * H),
            "rate_point": args.rate,
            "transmitted_cells": float(rec.mask.mean()),
            "roi_source": "yolox persons" if ref_dets else "centred box",
        },
        "decode_latent_seconds": t_dec,
        "composers": described,
        "repeats": args.repeats,
        "runs": runs,
        "note": (
            "seconds_per_frame: median of the timed runs of the composer alone (add decode_latent_seconds for the "
            "cloud's decode); batch > 1: one compose call over that many streams, divided by the batch. "
            "tiny-random = tiny_components(0): random weights, so its timings measure the code path and its "
            "quality numbers are not the paper's (keep_roi keeps the transmitted cells exact; outside them a "
            "random UNet paints noise). PSNR in/outside ROI: pixels of transmitted / other 16-pixel cells. "
            "recall: YOLOX persons of the original found again (IoU >= 0.5)."
        ),
    }
    write_results(args.out, result, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
