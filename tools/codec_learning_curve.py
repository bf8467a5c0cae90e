"""The codec's learning curve: Kodak bpp and PSNR of training checkpoints against training hours.

::

    checkpoint (.pt, from `latentcast train codec`) or released weights (.safetensors)
        ─► ElicCodec.forward on each Kodak image, every rate point, whole frame
        ─► bpp = ideal code length of the rounded symbols under the model's own Gaussian and z tables
           (``--rdoq λ``: the symbols the encoder's rate-distortion optimized quantization picks, with the
           Gaussian's bits; default 0, plain rounding, as the committed curves)
           (what training minimizes; within about 1 % of the range coder's bytes, headers excluded)
        ─► PSNR of the reconstruction (the latent decoder of the codec's target space)
        ─► the transform's ceiling: PSNR of g_s(g_a(x)) with y and z not quantized at all
           (when the finest rate point is near it, more bits cannot buy quality: the transforms limit it)

With ``--anchors`` (default ``results/kodak/eval.json``, the classical codecs' Kodak points of
``latentcast eval``), each checkpoint's PSNR BD-rate against each classical codec there (WebP, JPEG,
x264, x265) is reported beside it: issue 14's measure, on ideal code lengths.

``--data`` measures another image folder or a video's scored frames (every 8th, as ``latentcast eval``) instead
of Kodak, e.g. the scored vtest frames, for a second view of the same checkpoints (no anchors unless given).
``--ema`` measures a training checkpoint's moving average of the weights (``train codec --ema``), ``--ema-slow``
its slower one (``--ema-slow``).

Hours come from the checkpoint's ``history.jsonl`` (wall-clock seconds of the run up to the
checkpoint's step) plus ``--hours-offset`` for the training the run started from. Real packet
bytes of released weights come from ``latentcast bench codec``; this tool is for following a run::

    python -m latentcast.tools.codec_learning_curve RUN/snapshots/*.pt --history RUN/history.jsonl \\
        --hours-offset 1.25 --out results/codec_learning_curve

writes ``learning_curve.json`` and ``learning_curve.png`` (PSNR and bpp per rate point over hours).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["evaluate_checkpoint", "main"]


def _load(path: Path, average: str | None = None):
    import torch

    from latentcast.models.codec import LatentCodec
    from latentcast.models.elic import ElicCodec, ElicConfig
    from latentcast.models.training import checkpoint_weights

    if not path.is_file():
        raise SystemExit(f"error: no such checkpoint: {path}")
    if path.suffix == ".safetensors":
        c = LatentCodec.from_file(path)
        return c.model, c.latent_space_spec, c.meta.get("step"), None
    state = torch.load(path, map_location="cpu", weights_only=False)
    try:
        weights = checkpoint_weights(state, average, source=path)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    cd = dict(state["codec"])
    model = ElicCodec(ElicConfig.from_dict(cd))
    model.load_state_dict(weights)
    return model, state["train"]["latent_space"], int(state["step"]), state["train"]


def evaluate_checkpoint(path: Path, images: list[np.ndarray], *, average: str | None = None,
                        rdoq: float = 0.0) -> dict:
    """bpp (ideal code length) and PSNR per rate point over ``images`` (full frames); ``average``: one of a
    training checkpoint's moving averages of the weights (``"ema"``, ``"ema_slow"``) instead of its weights;
    ``rdoq``: λ of the encoder's choice of symbols (``ElicCodec.forward``; 0: plain rounding)."""
    import torch

    from latentcast.models.codec import image_to_tensor, pad_image
    from latentcast.models.latent_spaces import load_latent_space
    from latentcast.tools.eval.metrics import psnr
    from latentcast.tools.provenance import portable_arg

    average = average if path.suffix == ".pt" else None  # a released file is measured as it is
    model, space_spec, step, _ = _load(path, average)
    model.eval()
    space = load_latent_space(space_spec).eval()
    out = {"checkpoint": portable_arg(str(path)), "step": step, "ema": average is not None, "average": average,
           "rate_steps": list(model.cfg.rate_steps), "rdoq": rdoq, "bpp": [], "psnr": []}

    def to_rgb(latent, h, w):
        rec = space.decode(latent)[0, :, :h, :w].clamp(0, 1)
        return (rec.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)

    with torch.no_grad():
        ceil = []
        for img in images:
            x = pad_image(image_to_tensor(img))
            y = model.analyze(x)
            ceil.append(psnr(img, to_rgb(model.g_s(y, torch.ones_like(y[:, :1]), model.h_a(y)), *img.shape[:2])))
        out["psnr_unquantized"] = round(float(np.mean(ceil)), 3)
        for q in range(model.n_rates):
            bits, mse_db = 0.0, []
            npix = 0
            for img in images:
                h, w = img.shape[:2]
                x = pad_image(image_to_tensor(img))
                r = model(x, rate=torch.tensor([q]), rdoq=rdoq)
                bits += float(r["bits_y"][0] + r["bits_z"][0])
                npix += h * w
                mse_db.append(psnr(img, to_rgb(r["latent"], h, w)))
            out["bpp"].append(round(bits / npix, 5))
            out["psnr"].append(round(float(np.mean(mse_db)), 3))
    return out


def _kodak_images(n: int) -> list[np.ndarray]:
    """The first ``n`` Kodak images of the shared folder, RGB."""
    from latentcast.shared import shared_path

    return _data_frames(str(shared_path("data", "images", "kodak")), n)


def _data_frames(path: str, n: int) -> list[np.ndarray]:
    """The first ``n`` scored frames of an image folder or a video, as ``latentcast eval`` scores them (a video's
    every 8th frame), RGB."""
    from latentcast.tools.eval.data import load_data

    try:
        clips = load_data(path, classes=[])
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    out: list[np.ndarray] = []
    for clip in clips:
        for _, frame in clip.scored_frames():
            if len(out) == n:
                return out
            out.append(frame)
    return out


_CLASSICAL = ("webp", "jpeg", "x264", "x265")


def _anchors(path: Path) -> tuple[dict[str, list[tuple[float, float]]], int | None]:
    """(bpp, PSNR) points of each classical codec in a Kodak ``latentcast eval`` eval.json, and how many images
    they were scored on (None when the file does not say)."""
    try:
        doc = json.loads(path.read_text())
        points = doc["points"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"error: --anchors {path}: not a `latentcast eval` eval.json ({exc})") from None
    out: dict[str, list[tuple[float, float]]] = {}
    for q in points:
        if q.get("codec") in _CLASSICAL and q.get("psnr") is not None:
            out.setdefault(q["codec"], []).append((float(q["bpp"]), float(q["psnr"])))
    if not out:
        raise SystemExit(f"error: --anchors {path} has no points of {', '.join(_CLASSICAL)}")
    return out, doc.get("data", {}).get("scored_frames")


def _hours(step: int | None, history: Path | None) -> float | None:
    """Wall-clock hours of the run until it logged ``step``. Each resume restarts the log's clock ("sec"), so the
    segments add up; steps a resume did again count again (they were spent)."""
    if step is None or history is None or not history.is_file():
        return None
    sec, offset, prev = None, 0.0, 0.0
    for line in history.read_text().splitlines():
        d = json.loads(line)
        if d["sec"] < prev:  # a resumed process: its clock started again
            offset += prev
        prev = d["sec"]
        if d["step"] <= step:
            sec = offset + d["sec"]
    return None if sec is None else sec / 3600


def main(argv: list[str] | None = None) -> int:
    import torch

    from latentcast.proto.symbols import check_rdoq
    from latentcast.tools import provenance
    from latentcast.tools.options import add_average_options, chosen_average

    p = argparse.ArgumentParser(
        prog="python -m latentcast.tools.codec_learning_curve", description=__doc__.split("\n")[0]
    )
    p.add_argument("checkpoints", nargs="+", help="training checkpoints (.pt) and/or released weights (.safetensors)")
    p.add_argument("--history", default=None, help="the run's history.jsonl (training seconds per step)")
    p.add_argument("--hours-offset", type=float, default=0.0, help="hours of training before this run (its --init)")
    p.add_argument("--images", type=int, default=24, help="first N Kodak images or --data frames (default 24)")
    p.add_argument("--data", default="", help="an image folder or a video instead of Kodak (a video: its scored "
                                              "frames, every 8th, as `latentcast eval`)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rdoq", type=float, default=0.0,
                   help="λ of the encoder's rate-distortion optimized quantization (codec.rdoq; the encoder's default "
                        "is proto.symbols.RDOQ_LAMBDA) with the Gaussian's bits (default 0: plain rounding, as the "
                        "committed curves)")
    add_average_options(p, "measure", " (released files are measured as they are)")
    p.add_argument("--out", default="results/codec_learning_curve")
    p.add_argument("--anchors", default=None,
                   help="a `latentcast eval` eval.json of the same frames: PSNR BD-rate against its classical "
                        "codecs ('' for none; default results/kodak/eval.json for Kodak, none with --data)")
    a = p.parse_args(argv)
    anchors_file = a.anchors if a.anchors is not None else ("" if a.data else "results/kodak/eval.json")
    anchors, n_anchor = _anchors(Path(anchors_file)) if anchors_file else ({}, None)
    try:
        check_rdoq(a.rdoq, default=0.0)
    except ValueError as exc:
        raise SystemExit(f"error: --rdoq: {exc}") from None
    images = _data_frames(a.data, a.images) if a.data else _kodak_images(a.images)
    if n_anchor is not None and n_anchor != len(images):
        log.warning("the --anchors points are over %d images, these over %d: their BD-rates compare different "
                    "images (use --images %d)", n_anchor, len(images), n_anchor)
    torch.set_num_threads(a.threads)
    hist = Path(a.history) if a.history else None
    points = []
    t0 = time.time()
    for c in a.checkpoints:
        r = evaluate_checkpoint(Path(c), images, average=chosen_average(a), rdoq=a.rdoq)
        h = _hours(r["step"], hist) if Path(c).suffix == ".pt" else None
        r["hours"] = None if h is None else round(h + a.hours_offset, 3)
        if anchors:
            from latentcast.tools.eval.metrics import bd_rate

            bd = {k: bd_rate(v, list(zip(r["bpp"], r["psnr"]))) for k, v in anchors.items()}
            r["bd_rate_psnr"] = {k: None if v is None else round(v, 1) for k, v in bd.items()}
        points.append(r)
        print(f"{c}: step {r['step']}, hours {r['hours']}, bpp {r['bpp']}, PSNR {r['psnr']}, "
              f"unquantized {r['psnr_unquantized']}, BD-rate on PSNR {r.get('bd_rate_psnr')}", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"command": provenance.command("python -m latentcast.tools.codec_learning_curve"),
           "commit": provenance.commit(), "machine": provenance.machine(), "data": a.data or "kodak",
           "images": len(images),
           "bpp": "ideal code length of the symbols under the model's tables (headers excluded)", "rdoq": a.rdoq,
           "seconds": round(time.time() - t0, 1), "points": points}
    if anchors:
        res["anchors"] = {"file": anchors_file, "bd_rate_psnr": "per checkpoint, % bytes against each codec for the "
                                                             "same PSNR (negative: fewer)"}
    (out / "learning_curve.json").write_text(json.dumps(res, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted((q for q in points if q["hours"] is not None), key=lambda q: q["hours"])
    if pts:
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        n = max(len(q["psnr"]) for q in pts)
        for i in range(n):
            xs = [q["hours"] for q in pts if i < len(q["psnr"])]
            ax[0].plot(xs, [q["psnr"][i] for q in pts if i < len(q["psnr"])], "o-", label=f"rate point {i}")
            ax[1].plot(xs, [q["bpp"][i] for q in pts if i < len(q["bpp"])], "o-", label=f"rate point {i}")
        ax[0].plot([q["hours"] for q in pts], [q["psnr_unquantized"] for q in pts], "k--", label="y, z unquantized")
        ax[0].set(xlabel="training hours (2-core CPU)", ylabel=f"{res['data']} PSNR dB", title="quality")
        ax[1].set(xlabel="training hours (2-core CPU)", ylabel=f"{res['data']} bpp (ideal code length)", title="rate",
                  yscale="log")
        for x in ax:
            x.grid(alpha=0.3)
            x.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "learning_curve.png", dpi=110)
    print(f"{out / 'learning_curve.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
