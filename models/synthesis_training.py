"""Training of a cheaper synthesis transform g_s for the cloud, on the codec's exact decoder inputs.

::

    training image ──codec (frozen): g_a, ẑ, entropy model──► ŷ, ẑ per rate point   (once, cached .npz)
                                    (+ one draw with 0-50 % of the cells masked)    exactly what a packet
                                                                                     decodes to
    random crop (ŷ, mask, ẑ) ──student g_s──► ẑ_c          L = ||z_c - ẑ_c||² + w ||g_s(ŷ, mask, ẑ) - ẑ_c||²
                                                           z_c = latent space(x), g_s the codec's own (w:
                                                           teacher_weight, 0 by default)

The cloud spends most of a frame's decode in g_s (issue 17: 87 % of a temporal frame). A student with
narrower x2 stages (``up_widths``) costs a fraction of it; it starts from the codec's own g_s wherever
the shapes match (M(ẑ), the head and the 1/16 trunk) and trains on pixels; ``teacher_weight`` adds the
codec's own g_s output as a second target (on pixels alone the student's frames score higher PSNR but
lower detection accuracy than the codec's own: ``models/weights/elic-lite-fast-synthesis.md``).
``init`` starts from a released synthesis instead; residual blocks the start lacks begin as the identity, so
a student that only adds blocks begins exactly as its start (use a small ``lr``: Adam's first steps move a
trained g_s by about ``lr`` per weight).
g_a, the hyperprior and the entropy networks are untouched, so packets stay bit-identical and the edge
does not change: the released file (``models/synthesis.py``) names the codec weights hash it decodes,
and the cloud picks it with ``codec.synthesis``.

Data policy as :mod:`latentcast.models.training` (the same training images); Kodak is only evaluated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from latentcast.shared import shared_path

from .elic import ElicConfig, SynthesisToLatent, zero_new_blocks
from .training import _read_rgb, default_cache_dir, random_masks, scheduled_lr, training_sources

log = logging.getLogger(__name__)

__all__ = ["SynthesisTrainConfig", "student_config", "decoder_inputs", "train_synthesis", "evaluate_synthesis"]


@dataclass
class SynthesisTrainConfig:
    codec: str = "elic-lite"  # the codec whose packets the student decodes (a shipped name or a weight file)
    out: str = "checkpoints/elic-lite-fast"  # run folder (resumed from when it holds last.pt)
    init: str = ""  # start from this synthesis (a shipped name or file for the same codec) instead of the codec's
    #                 own g_s, wherever the shapes match ("" = the codec's own g_s)
    up_widths: str = "64,32"  # widths of the student's x2 stages after 1/16 ("" = the codec's own)
    blocks: int = 3  # residual blocks at 1/16 (the shipped g_s: 3)
    tail_blocks: int = 1  # residual blocks at the output resolution (the shipped g_s: 1)
    steps: int = 6000  # optimizer steps
    batch: int = 8  # crops per step
    crop: int = 192  # crop size in pixels, a multiple of 64
    lr: float = 2e-4  # Adam learning rate, halved for the last 20 % of the steps
    warmup_steps: int = 0  # linear lr warm-up when Adam starts afresh (not on resume): a fresh Adam moves every weight
    #                        by about lr at first, which costs a trained synthesis a few tenths of a dB
    mask_fraction: float = 0.25  # share of crops drawn from the masked (ROI-only) decoder inputs
    video_fraction: float = 0.5  # share of crops from video frames, the rest from photos (the codec's own: half)
    teacher_weight: float = 0.0  # weight of a second target, the codec's own g_s output (distillation; 0 = pixels only)
    task_weight: float = 0.0  # weight of the detector-feature loss (models/task_loss.py: YOLOX neck features of the
    #                           render against the original's, relative error; 0 = off)
    task_detector: str = ""  # ONNX detector of that loss ("" = the cloud's default, the shared YOLOX-nano)
    task_scale: float = 0.5  # crops are resized by this before the detector (the cloud's YOLOX sees 768x576 at 0.54)
    max_side: int = 1024  # training images are downscaled to at most this side before coding
    eval_every: int = 1000  # steps between Kodak evaluations (PSNR per rate point, in history.jsonl)
    checkpoint_every: int = 200  # steps between checkpoints (last.pt)
    seed: int = 0  # RNG seed for crops, rate points and masks
    threads: int = 1  # torch threads
    bf16: bool = False  # the student under bfloat16 autocast (loss and weights float32): ~2x faster on CPUs with
    #                     AVX-512 BF16 or AMX, many times slower without


def student_config(codec_cfg: ElicConfig, cfg: SynthesisTrainConfig) -> ElicConfig:
    """The codec's configuration with the student's synthesis fields."""
    widths: tuple[int, ...] = ()
    if cfg.up_widths.strip():
        try:
            widths = tuple(int(v) for v in cfg.up_widths.split(","))
        except ValueError:
            raise ValueError(f"up_widths {cfg.up_widths!r}: expected comma-separated integers, e.g. 64,32") from None
        if any(w < 8 for w in widths):
            raise ValueError(f"up_widths {cfg.up_widths!r}: every width must be at least 8")
    if cfg.blocks < 0 or cfg.tail_blocks < 0:
        raise ValueError(f"blocks {cfg.blocks} and tail_blocks {cfg.tail_blocks} must be >= 0")
    return dataclasses.replace(codec_cfg, gs_up_widths=widths, gs_blocks=cfg.blocks, gs_tail_blocks=cfg.tail_blocks)


def _fit64(img: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale to at most ``max_side`` and crop to multiples of 64."""
    import cv2

    h, w = img.shape[:2]
    s = min(1.0, max_side / max(h, w))
    if s < 1.0:
        img = cv2.resize(img, (int(w * s), int(h * s)), interpolation=cv2.INTER_AREA)
    h, w = img.shape[:2]
    return np.ascontiguousarray(img[: h // 64 * 64, : w // 64 * 64])


def decoder_inputs(codec, img: np.ndarray, rate_point: int, tx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ŷ (M,h,w) and ẑ (Nz,h/4,w/4) exactly as a packet of ``img`` at ``rate_point`` with mask ``tx`` decodes."""
    y, z = codec.analyze(img)
    zs = codec.z_symbols(z, rate_point)
    _, _, y_hat = codec.encode_symbols_y_hat(y, zs, rate_point=rate_point, tx_mask=tx)
    z_hat = zs * float(codec.model.rate_zdelta[rate_point])
    return np.asarray(y_hat, np.float32).reshape(y.shape), np.asarray(z_hat, np.float32)


def _prepare(codec, items: list, cache: Path, max_side: int, *, masked: bool, seed: int) -> list[dict]:
    """Per image: the pixels and the decoder inputs of every rate point (+ one masked draw); cached."""
    cache.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out, t0 = [], time.time()
    for i, (name, read) in enumerate(items):
        f = cache / f"{name}.npz"
        draw_q = int(rng.integers(codec.n_rates))  # drawn for every image, cached or not: reproducible
        draw_seed = int(rng.integers(2**31))
        if f.is_file():
            d = dict(np.load(f))
        else:
            img = _fit64(read(), max_side)
            rows, cols = img.shape[0] // 16, img.shape[1] // 16
            d = {"img": img}
            full = np.ones((rows, cols), dtype=bool)
            for q in range(codec.n_rates):
                d[f"y{q}"], d[f"z{q}"] = decoder_inputs(codec, img, q, full)
            if masked:
                m = random_masks(1, rows, cols, np.random.default_rng(draw_seed))[0, 0].numpy() > 0.5
                d["ym"], d["zm"] = decoder_inputs(codec, img, draw_q, m)
                d["mask"], d["qm"] = m, np.int64(draw_q)
            np.savez(f, **d)
        out.append(d)
        if (i + 1) % 25 == 0 or i + 1 == len(items):
            log.info("decoder inputs %d/%d (%.0f s)", i + 1, len(items), time.time() - t0)
    return out


def _batch(data: tuple[list[dict], list[dict]], rng: np.random.Generator, cfg: SynthesisTrainConfig, n_rates: int):
    """(x, ŷ, mask, ẑ) of ``cfg.batch`` random crops, each from a random photo or video frame (``data``:
    both lists; ``cfg.video_fraction`` of the crops from the frames), rate point or masked draw."""
    c = cfg.crop
    photos, frames = data
    xs, ys, ms, zs = [], [], [], []
    for _ in range(cfg.batch):
        pool = frames if (not photos or (frames and rng.random() < cfg.video_fraction)) else photos
        d = pool[rng.integers(len(pool))]
        if "mask" in d and rng.random() < cfg.mask_fraction:
            y, z, m = d["ym"], d["zm"], d["mask"]
        else:
            q = int(rng.integers(n_rates))
            y, z, m = d[f"y{q}"], d[f"z{q}"], np.ones(d[f"y{q}"].shape[1:], dtype=bool)
        h, w = d["img"].shape[:2]
        r0, c0 = int(rng.integers(0, (h - c) // 64 + 1)) * 64, int(rng.integers(0, (w - c) // 64 + 1)) * 64
        cells = np.s_[r0 // 16:(r0 + c) // 16, c0 // 16:(c0 + c) // 16]
        xs.append(d["img"][r0:r0 + c, c0:c0 + c])
        ys.append(y[(slice(None), *cells)])
        ms.append(m[cells].astype(np.float32)[None])
        zs.append(z[:, r0 // 64:(r0 + c) // 64, c0 // 64:(c0 + c) // 64])
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255
    return x, torch.from_numpy(np.stack(ys)), torch.from_numpy(np.stack(ms)), torch.from_numpy(np.stack(zs))


@torch.no_grad()
def evaluate_synthesis(gs: SynthesisToLatent, latent_space, images: list[dict], n_rates: int) -> list[float]:
    """Mean PSNR (dB) on the evaluation images per rate point, whole frames, 8-bit output."""
    was = gs.training
    gs.eval()
    res = []
    for q in range(n_rates):
        ps = []
        for d in images:
            y = torch.from_numpy(d[f"y{q}"])[None]
            out = latent_space.decode(gs(y, torch.ones_like(y[:, :1]), torch.from_numpy(d[f"z{q}"])[None]))
            rec = (out[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
            mse = np.mean((rec.astype(np.float64) - d["img"]) ** 2)
            ps.append(10 * np.log10(255**2 / max(mse, 1e-10)))
        res.append(round(float(np.mean(ps)), 3))
    gs.train(was)
    return res


def _kodak_items() -> list:
    d = shared_path("data", "images", "kodak")
    return [(f"kodak-{p.stem}", (lambda p=p: _read_rgb(p, None))) for p in sorted(d.glob("*.png"))]


def _vtest_items(every: int = 32) -> list:
    """Scored vtest frames (index divisible by 8; every ``every``-th), for evaluation only."""
    import cv2

    video = shared_path("data", "video", "vtest.avi")
    cap = cv2.VideoCapture(str(video))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()
    return [(f"vtest-{i:04d}", (lambda i=i: _read_rgb(video, i))) for i in range(0, n, every)]


def train_synthesis(cfg: SynthesisTrainConfig) -> Path:
    """Train (or resume) a student g_s for ``cfg.codec``; returns the run's ``last.pt``."""
    from .codec import LatentCodec

    torch.set_num_threads(cfg.threads)
    if cfg.crop % 64 or cfg.crop < 64:
        raise ValueError(f"crop {cfg.crop} must be a positive multiple of 64")
    codec = LatentCodec.load(cfg.codec)
    start_sd = codec.model.g_s.state_dict()
    if cfg.init:  # checked before the (long) decoder inputs: a wrong file fails at once
        from .synthesis import load_synthesis

        start_sd = load_synthesis(cfg.init, codec.cfg, codec.weights_hash).g_s.state_dict()
    scfg = student_config(codec.cfg, cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # the decoder inputs depend on the encoder's choice of symbols too (codec.rdoq): older caches are plainly rounded
    cache = default_cache_dir() / "synthesis" / f"{codec.weights_hash.hex()[:16]}-rdoq{codec.rdoq:g}"
    sources = training_sources()
    train_items = [(n, (lambda p=p, f=f: _read_rgb(p, f))) for n, p, f in sources]
    log.info("%d training images; decoder inputs cached in %s", len(train_items), cache)
    if not 0.0 <= cfg.video_fraction <= 1.0:
        raise ValueError(f"video_fraction {cfg.video_fraction} must be in [0, 1]")
    if not cfg.teacher_weight >= 0.0:
        raise ValueError(f"teacher_weight {cfg.teacher_weight} must be >= 0")
    if not cfg.task_weight >= 0.0:
        raise ValueError(f"task_weight {cfg.task_weight} must be >= 0")
    if cfg.warmup_steps < 0:
        raise ValueError(f"warmup_steps {cfg.warmup_steps} must be >= 0")
    task = None
    if cfg.task_weight > 0:  # loaded before the (long) decoder inputs: a wrong file fails at once
        from latentcast.detector import detector_model_path

        from .task_loss import DetectorFeatureLoss

        task = DetectorFeatureLoss(detector_model_path(cfg.task_detector), scale=cfg.task_scale)
    prepared = _prepare(codec, train_items, cache / "train", cfg.max_side, masked=cfg.mask_fraction > 0, seed=cfg.seed)
    big = [(item[2] is not None, d) for item, d in zip(sources, prepared, strict=True)
           if min(d["img"].shape[:2]) >= cfg.crop]
    data = ([d for video, d in big if not video], [d for video, d in big if video])
    if not big:
        raise ValueError(f"no training image is at least {cfg.crop} px on its shorter side: lower crop")
    evals = {"kodak": _prepare(codec, _kodak_items(), cache / "kodak", 10_000, masked=False, seed=cfg.seed),
             "vtest": _prepare(codec, _vtest_items(), cache / "vtest", 10_000, masked=False, seed=cfg.seed)}
    space = codec.latent_space()

    def evaluate(gs: SynthesisToLatent, prefix: str = "") -> dict:
        return {f"{prefix}{k}_psnr": evaluate_synthesis(gs, space, v, codec.n_rates) for k, v in evals.items() if v}

    torch.manual_seed(cfg.seed)
    student = SynthesisToLatent(scfg)
    own = student.state_dict()
    reused = {k: v for k, v in start_sd.items() if k in own and own[k].shape == v.shape}
    student.load_state_dict(reused, strict=False)
    grown = len(zero_new_blocks(student, reused))
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    rng = np.random.default_rng(cfg.seed)
    step, hist = 0, out / "history.jsonl"
    last = out / "last.pt"
    opt_start: int | None = 0  # where Adam started afresh (the warm-up counts from here); None: resumed
    if last.is_file():
        st = torch.load(last, map_location="cpu", weights_only=False)
        if st["codec_hash"] != codec.weights_hash.hex() or st["student"] != scfg.to_dict():
            raise ValueError(f"{last} is a run for another codec or student shape; choose another --out")
        student.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        rng.bit_generator.state = st["rng"]
        step = int(st["step"])
        opt_start = None
        log.info("resumed %s at step %d", last, step)
    else:
        log.info("student %s: %d of %d tensors from %s; %d new residual blocks start as the identity",
                 scfg.synthesis_up_widths, len(reused), len(own), cfg.init or "the codec's g_s", grown)
    with hist.open("a") as fh:  # the codec's own g_s on the evaluation sets, at every (re)start
        fh.write(json.dumps({"step": step, **evaluate(codec.model.g_s, "teacher_"), **evaluate(student)}) + "\n")

    def save() -> None:
        tmp = out / "last.pt.tmp"
        torch.save({"model": student.state_dict(), "opt": opt.state_dict(), "rng": rng.bit_generator.state,
                    "step": step, "student": scfg.to_dict(), "codec_hash": codec.weights_hash.hex(),
                    "codec": str(cfg.codec), "train": asdict(cfg)}, tmp)
        tmp.replace(last)

    student.train()
    t0, losses = time.time(), []
    while step < cfg.steps:
        lr = scheduled_lr(cfg.lr, step, start=0, length=cfg.steps, opt_start=opt_start, warmup=cfg.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y, m, z = _batch(data, rng, cfg, codec.n_rates)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            pred = student(y, m, z)
        pred = pred.float()
        loss = F.mse_loss(pred, space.encode(x))
        if cfg.teacher_weight > 0:
            with torch.no_grad():
                target = codec.model.g_s(y, m, z)
            loss = loss + cfg.teacher_weight * F.mse_loss(pred, target)
        if task is not None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                task_term = task(space.decode(pred).clamp(0, 1), x).float()
            loss = loss + cfg.task_weight * task_term
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.steps:
            rec = {"step": step, "loss": float(np.mean(losses)), "lr": lr, "sec": round(time.time() - t0, 1)}
            losses = []
            if step % cfg.eval_every == 0 or step == cfg.steps:
                rec.update(evaluate(student))
            with hist.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            log.info("step %d loss %.5f %s", step, rec["loss"],
                     " ".join(f"{k} {v}" for k, v in rec.items() if k.endswith("_psnr")))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save()
    return last
