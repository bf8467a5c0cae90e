"""Training of the ControlNet composer (DISCOVER sec. 3.4, stages I and II, eq. 4).

::

    training images (models.training: photos, samples, vtest frames with index % 8 != 0)
        │  prepare_cache (decoded once) ─► random aligned crops x, flips (models.training.RandomCrops)
        ▼
    x ──► frozen codec, exactly as the cloud decodes it (no entropy coding: it is lossless):
          g_a, h_a, ẑ = Δz·floor(z/Δz + ½), integer entropy networks (μ), ŷ = μ + Δ·s with the edge's
          choice of s (proto.symbols.quantize_y: RDOQ, or floor((y-μ)/Δ + ½) at λ = 0)
          inside the transmit mask, μ outside ──► g_s([ŷ, mask, M(ẑ)]) ──► ẑ_c
    x ──► frozen SD VAE encoder (× scaling_factor, as the composer's latent space) ──► z_c^SD (diffusion target)
    x ──► the codec's latent space encoder ──► z_c (the codec's own target, eq. 4's last term)

    L = λ_diff · || ε - ε_θ(z_t, t, C([ẑ_c, mask])) ||²   ControlNetComposer.diffusion_loss (same code the cloud runs)
      + λ_lat  · || z_c - ẑ_c ||² / var(z_c)             only when g_s trains (stage II, ``train_gs``)

    stage I : the full frame transmitted (mask = 1)      ControlNet + adapter
    stage II: a fraction r ~ U(0, 0.5) of the y cells     ControlNet + adapter (+ g_s and M when train_gs)
              dropped in random rectangles

What eq. 4 has and where it is trained here: the rate terms ``λ_R (R(ŷ) + R(ẑ))`` (stage II: ``R(ỹ)``)
depend only on g_a, h_a and the entropy networks, which the paper freezes in stage II and which this
project trains separately (``latentcast train codec``: rate + ``|| z_c - ẑ_c ||²``); with them frozen the
rate terms are constants and are left out. The diffusion term is the one this module adds. The latent term
only reaches g_s; it is logged always and trained only with ``train_gs`` (stage II, as the paper updates
"only the decoder" there). ``train_gs`` is off by default for the embedded codec: the shipped g_s also
serves the ``none`` composer and every packet names the weights hash, so a retrained g_s is a new codec
release (``out/codec.safetensors``, new hash; the edge bundle must be re-exported with it).

Outputs in ``out``: ``last.pt`` (resumable: ControlNet incl. adapter, optional g_s, optimizer, AMP scaler,
step, stage, RNG states, config), ``history.jsonl``, at the end ``controlnet/`` (a diffusers ControlNet +
``adapter.safetensors``: what ``load_components(sd, controlnet=...)`` and the cloud's
``composer.controlnet`` read), ``model_card.md``; with ``sd="tiny"`` also ``sd/`` (the tiny random SD the
ControlNet was trained against, as a pipeline folder: ``composer.sd``), with ``train_gs`` also
``codec.safetensors``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from latentcast.proto.symbols import RDOQ_LAMBDA, RDOQ_RADIUS, quantize_y

from . import training as codec_training
from .codec import gaussian_y_tables
from .elic import channel_slice

log = logging.getLogger(__name__)

__all__ = ["ComposerTrainConfig", "train_composer", "codec_latent", "drop_masks", "cli_command", "PRECISIONS"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
Y_STRIDE = 16  # pixels per y cell: the transmit mask's grid
MAX_BAD_STEPS = 20  # non-finite losses in a row before training stops
# fields that must not change when resuming (they change what the checkpoint's weights mean)
_RESUME_FIXED = ("sd", "controlnet", "codec", "train_gs", "seed")


@dataclass
class ComposerTrainConfig:
    sd: str = "stabilityai/stable-diffusion-2-1-base"  # Stable Diffusion: local pipeline folder, hub id (cache only
    #                                                     unless local_files_only=False), or "tiny" (random test model)
    controlnet: str = ""  # start from a trained ControlNet + adapter folder ("" = UNet encoder copy + zero adapter)
    codec: str = "elic-lite"  # the codec whose ẑ_c conditions the composer (shipped name or .safetensors)
    out: str = "checkpoints/composer"  # run folder: last.pt, history.jsonl, controlnet/, model_card.md
    resume: bool = False  # continue out/last.pt (same sd/controlnet/codec/train_gs/seed); False and a last.pt = error
    cache: str = ""  # training-image cache ("" = <LATENTCAST_CACHE>/train-images, the one `train codec` fills)
    stage1_steps: int = 2000  # stage I steps, the full frame transmitted (paper: 300k at 512 px on GPUs)
    stage2_steps: int = 500  # stage II steps, random masks (paper: 50k)
    batch: int = 1  # crops per step
    crop: int = 128  # crop size in pixels: multiple of 64 (codec) and of 8 x the UNet's factor (SD: 64); paper: 512
    lr: float = 1e-5  # AdamW learning rate of the ControlNet (a copy of the pretrained UNet encoder)
    adapter_lr: float = 1e-4  # ... of the adapter (new, from zero): faster
    gs_lr: float = 1e-5  # ... of the codec's g_s (incl. M) when train_gs
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # gradient-norm clip over the trained parameters (0 = off)
    lam_diff: float = 2.0  # λ_diff of eq. 4 (paper: 2 in both stages)
    lam_latent: float = 1.0  # weight of eq. 4's || z_c - ẑ_c ||² / var(z_c) (paper: 1 on ~unit-var SD latents)
    train_gs: bool = False  # stage II also trains the codec's synthesis g_s (paper: yes; off for the shipped codec)
    mask_min: float = 0.0  # stage II: smallest fraction of y cells dropped (paper: 0)
    mask_max: float = 0.5  # stage II: largest fraction dropped (paper: 0.5)
    caption: str = "a photo"  # caption of every crop (no labels in the data; = the cloud's caption_for(()))
    vtest_stride: int = 5  # vtest frames with index % stride == 0 (and % 8 != 0), as `train codec`
    seed: int = 0  # RNG seed: crops, flips, rate points, masks, diffusion noise and timesteps
    checkpoint_every: int = 200  # steps between writes of out/last.pt (and one at the end of each stage)
    log_every: int = 10  # steps between history.jsonl lines and progress-bar updates of the mean losses
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...
    precision: str = "auto"  # CUDA: "auto" (bf16 if supported, else fp16), "bf16", "fp16", "fp32"; CPU: fp32
    gradient_checkpointing: bool = False  # recompute UNet/ControlNet activations in backward (GPU memory for 512 crops)
    local_files_only: bool = True  # hub ids: read the local Hugging Face cache only, never download
    threads: int = 2  # torch CPU threads
    num_workers: int = 0  # crops come from the in-memory image cache in the main process; only 0 is supported

    def check(self) -> None:
        if self.crop < 64 or self.crop % 64:
            raise ValueError(f"crop {self.crop} must be a positive multiple of 64")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.stage1_steps < 0 or self.stage2_steps < 0 or self.stage1_steps + self.stage2_steps < 1:
            raise ValueError(f"steps must be >= 0 with at least one in total, "
                             f"got {self.stage1_steps} + {self.stage2_steps}")
        if not 0.0 <= self.mask_min <= self.mask_max <= 1.0:
            raise ValueError(f"mask range must satisfy 0 <= min <= max <= 1, got ({self.mask_min}, {self.mask_max})")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.num_workers != 0:
            raise ValueError("num_workers must be 0: crops are cut from the in-memory image cache in this process")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("checkpoint_every and log_every must be >= 1")


# --------------------------------------------------------------------------- codec and masks


@torch.no_grad()
def _codec_symbols(model, x: torch.Tensor, rate: torch.Tensor, mask: torch.Tensor,
                   rdoq: float = RDOQ_LAMBDA) -> tuple[torch.Tensor, torch.Tensor]:
    """ŷ and ẑ as the cloud decodes them (exact integer entropy networks), without entropy coding; the symbols
    chosen as the edge chooses them (``proto.symbols.quantize_y`` with λ ``rdoq``)."""
    y = model.analyze(x)
    z = model.h_a(y)
    dz = model.rate_zdelta[rate].view(-1, 1, 1, 1)  # float64, as LatentCodec.z_symbols / decode_latent
    z_hat = torch.floor(z.double() / dz + 0.5) * dz
    H = model.hyper_features(z_hat, exact=True)
    delta = model.per_rate(model.rate_delta, rate)  # (B,1|M,1,1)
    tx = mask > 0.5
    y64 = y.double()
    slices = model.group_slices()

    lengths = gaussian_y_tables(model).code_lengths(RDOQ_RADIUS) if rdoq else None

    def step(k, _is_anchor, _cells, mu, idx):
        d = channel_slice(delta, slices[k])
        r = (y64[:, slices[k]] - mu) / d
        if rdoq:
            t = model.table_index(idx, rate, slices[k])
            s = torch.from_numpy(quantize_y(r.numpy(), t.numpy(), lengths, rdoq))
        else:
            s = torch.floor(r + 0.5)
        return torch.where(tx, mu + d * s, mu)

    y_hat = model.entropy_params_loop(H, step, exact=True)
    return y_hat.float(), z_hat.float()


def codec_latent(model, x: torch.Tensor, rate: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ẑ_c of a batch as the cloud gets it from the packet (``LatentCodec.decode_latent``), without the
    (lossless) entropy coding: ``x`` (B, 3, H, W) in [0, 1], H and W multiples of 64; ``rate`` (B,) rate
    points; ``mask`` (B, 1, H/16, W/16), 1 = transmitted (None: everything). The analysis and entropy
    networks run without gradients; ``g_s`` runs with the current grad mode, so it can be trained."""
    if mask is None:
        mask = torch.ones(x.shape[0], 1, x.shape[2] // Y_STRIDE, x.shape[3] // Y_STRIDE, device=x.device)
    y_hat, z_hat = _codec_symbols(model, x, rate, mask)
    return model.g_s(y_hat, mask.to(y_hat.dtype), z_hat)


def drop_masks(n: int, rows: int, cols: int, rng: np.random.Generator, lo: float = 0.0,
               hi: float = 0.5) -> torch.Tensor:
    """(n, 1, rows, cols) float masks, 1 = transmitted. For each, a fraction r ~ U(lo, hi) of the cells
    (rounded to whole cells) is dropped, in random rectangles; the last rectangle is cut short (raster
    order inside it) so exactly ``round(r * rows * cols)`` cells are dropped (DISCOVER sec. 4.1.1:
    "randomly set 0~50 % of the region in ŷ to zero")."""
    m = np.ones((n, 1, rows, cols), dtype=np.float32)
    total = rows * cols
    for i in range(n):
        k = int(round(rng.uniform(lo, hi) * total))
        dropped = 0
        while dropped < k:
            h, w = int(rng.integers(1, rows + 1)), int(rng.integers(1, cols + 1))
            r0, c0 = int(rng.integers(0, rows - h + 1)), int(rng.integers(0, cols - w + 1))
            rr, cc = np.nonzero(m[i, 0, r0:r0 + h, c0:c0 + w] > 0)  # still transmitted, raster order
            rr, cc = rr[: k - dropped], cc[: k - dropped]
            m[i, 0, r0 + rr, c0 + cc] = 0
            dropped += rr.size
    return torch.from_numpy(m)


# --------------------------------------------------------------------------- setup


def _device(cfg: ComposerTrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {cfg.device!r} asked for, but CUDA is not available")
    return dev


def _amp_dtype(cfg: ComposerTrainConfig, dev: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. CPU always trains in fp32."""
    if dev.type != "cuda":
        if cfg.precision in ("bf16", "fp16"):
            log.info("precision %s asked for on %s: the CPU trains in fp32", cfg.precision, dev)
        return None
    if cfg.precision == "fp32":
        return None
    if cfg.precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float16


def _components(cfg: ComposerTrainConfig, codec_channels: int) -> dict:
    """SD (frozen) + the ControlNet and adapter to train, as composer components."""
    from .composer import ADAPTER_FILE, LatentAdapter, load_components, tiny_components

    if cfg.sd != "tiny":
        return load_components(cfg.sd, cfg.controlnet or None, local_files_only=cfg.local_files_only,
                               codec_channels=codec_channels)
    # seed 0: the same random model the cloud builds for composer.sd = "tiny"; written to out/sd at the end
    comps = tiny_components(0, codec_channels=codec_channels)
    if cfg.controlnet:
        import diffusers

        p = Path(cfg.controlnet)
        comps["controlnet"] = diffusers.ControlNetModel.from_pretrained(str(p))
        comps["adapter"] = LatentAdapter.load(p / ADAPTER_FILE)
    return comps


def _state(cfg, step, stage, composer, codec_model, opt, scaler, rng, gen, latent_var, history_tail) -> dict:
    return {
        "format": "latentcast-composer-train-1",
        "model": {"controlnet": composer.controlnet.state_dict(),  # includes the adapter (its cond. embedding)
                  "g_s": codec_model.g_s.state_dict() if cfg.train_gs else None},
        "adapter_config": dict(composer.adapter.config),
        "opt": opt.state_dict(), "scaler": scaler.state_dict(), "step": step, "stage": stage,
        "rng": {"numpy": rng.bit_generator.state, "torch": gen.get_state(), "torch_global": torch.get_rng_state()},
        "config": asdict(cfg), "latent_var": latent_var, "final_losses": history_tail,
    }


def cli_command(cfg: ComposerTrainConfig) -> str:
    """The ``latentcast train composer`` line for a configuration (model card)."""
    d = ComposerTrainConfig()
    parts = ["latentcast train composer"]
    flags = {"sd": "--sd", "controlnet": "--controlnet", "codec": "--codec", "stage1_steps": "--steps-1",
             "stage2_steps": "--steps-2", "batch": "--batch", "crop": "--crop", "lr": "--lr", "seed": "--seed",
             "lam_diff": "--lam-diff", "lam_latent": "--lam-latent", "caption": "--caption", "device": "--device",
             "precision": "--precision"}
    for name, flag in flags.items():
        v = getattr(cfg, name)
        if v != getattr(d, name):
            parts.append(f"{flag} {json.dumps(v) if isinstance(v, str) and (' ' in v or not v) else v}")
    if (cfg.mask_min, cfg.mask_max) != (d.mask_min, d.mask_max):
        parts.append(f"--mask-range {cfg.mask_min},{cfg.mask_max}")
    if cfg.train_gs:
        parts.append("--train-gs")
    if cfg.gradient_checkpointing:
        parts.append("--gradient-checkpointing")
    parts.append(f"--out {cfg.out}")
    return " ".join(parts)


# --------------------------------------------------------------------------- training


def train_composer(cfg: ComposerTrainConfig) -> Path:
    """Run (or, with ``cfg.resume``, continue) stage I then stage II; returns the ``out/controlnet``
    folder the cloud loads (``composer.controlnet``)."""
    from tqdm import tqdm

    from .codec import LatentCodec
    from .composer import ControlNetComposer
    from .latent_spaces import PixelSpace

    cfg.check()
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    ckpt = out / "last.pt"
    state = None
    if ckpt.exists():
        if not cfg.resume:
            raise FileExistsError(f"{ckpt} exists: resume it (--resume) or choose another --out")
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        old = state.get("config", {})
        changed = [k for k in _RESUME_FIXED if old.get(k) != getattr(cfg, k)]
        if changed:
            diff = ", ".join(f"{k} {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in changed)
            raise ValueError(f"cannot resume {ckpt}: {diff}")
        other = [k for k, v in asdict(cfg).items() if k not in _RESUME_FIXED and old.get(k) != v
                 and k not in ("resume", "stage1_steps", "stage2_steps", "out")]
        if other:
            log.warning("resuming with changed settings: %s", ", ".join(f"{k} {old.get(k)!r} -> {getattr(cfg, k)!r}"
                                                                         for k in other))
    out.mkdir(parents=True, exist_ok=True)
    dev = _device(cfg)
    amp_dtype = _amp_dtype(cfg, dev)

    # ---- models: frozen codec (its g_s optionally trained), frozen SD, trained ControlNet + adapter
    codec = LatentCodec.load(cfg.codec)
    cmodel = codec.model.to(dev).eval().requires_grad_(False)
    codec_space = codec.latent_space().to(dev)
    comps = _components(cfg, int(codec_space.channels))
    composer = ControlNetComposer(**comps, codec_space=codec_space, device=dev)
    cn, adapter = composer.controlnet, composer.adapter
    unet_mult = composer.space.factor * composer.unet_factor
    if cfg.crop % unet_mult:
        raise ValueError(f"crop {cfg.crop} must be a multiple of {unet_mult} (VAE factor x UNet downsampling)")
    if amp_dtype is not None:  # frozen parts in half precision; trained parameters stay fp32 (autocast computes)
        for m in (composer.unet, composer.space, composer.text_encoder):
            m.to(dtype=amp_dtype)
    if cfg.gradient_checkpointing:
        composer.unet.enable_gradient_checkpointing()
        cn.enable_gradient_checkpointing()
    cn.requires_grad_(True).train()  # adapter included: it is the ControlNet's conditioning embedding now
    step = int(state["step"]) if state else 0
    if state:
        cn.load_state_dict(state["model"]["controlnet"])
        if state["model"].get("g_s") is not None:
            cmodel.g_s.load_state_dict(state["model"]["g_s"])
        log.info("resumed from %s at step %d (stage %d)", ckpt, step, state["stage"])

    adapter_ids = {id(p) for p in adapter.parameters()}

    def make_opt(stage: int) -> torch.optim.Optimizer:
        cn_params = [p for p in cn.parameters() if id(p) not in adapter_ids]
        groups = [{"params": cn_params, "lr": cfg.lr, "name": "controlnet"},
                  {"params": list(adapter.parameters()), "lr": cfg.adapter_lr, "name": "adapter"}]
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if stage == 2:
            enter_stage2(opt)
        return opt

    def enter_stage2(opt: torch.optim.Optimizer) -> None:
        if cfg.train_gs:
            cmodel.g_s.requires_grad_(True).train()
            opt.add_param_group({"params": list(cmodel.g_s.parameters()), "lr": cfg.gs_lr, "name": "g_s"})

    total = cfg.stage1_steps + cfg.stage2_steps
    stage = 1 if step < cfg.stage1_steps else 2
    if state:
        stage = max(stage, int(state["stage"]))  # never back to stage I (e.g. resumed with fewer stage I steps)
        opt = make_opt(int(state["stage"]))
        opt.load_state_dict(state["opt"])
        if stage == 2 and int(state["stage"]) == 1:
            enter_stage2(opt)
    else:
        opt = make_opt(stage)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)
    if state and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])

    # ---- data: the codec training's sources and image cache, random aligned crops
    cache = codec_training.prepare_cache(codec_training.TrainConfig(
        latent_space="pixels", cache=cfg.cache, vtest_stride=cfg.vtest_stride, threads=cfg.threads))
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    crops = codec_training.RandomCrops(cache, cfg.crop, 8, rng, PixelSpace())  # (x, x): z_c is computed on `dev`

    def encode_targets(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The diffusion target (SD VAE latent, scaled) and the codec's target z_c of a batch."""
        with torch.no_grad(), torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            target = composer.space.encode(x)
            z_c = target if composer.same_space else codec_space.encode(x)
        return target, z_c.float()

    if state:
        rng.bit_generator.state = state["rng"]["numpy"]
        gen.set_state(state["rng"]["torch"])
        torch.set_rng_state(state["rng"]["torch_global"])
        latent_var = float(state["latent_var"])
    else:  # var(z_c) over a few crops, drawn from a separate stream so the run's data order does not depend on it
        crops.rng = np.random.default_rng([cfg.seed, 1])
        z_cs = [encode_targets(crops.batch(4)[0].to(dev))[1].flatten() for _ in range(4)]
        latent_var = float(torch.cat(z_cs).var().clamp_min(1e-8))
        crops.rng = rng
    meta = {"codec": codec.codec_name, "codec_weights_hash": codec.weights_hash.hex(),
            "codec_space": codec.latent_space_spec, "images": len(crops.items), "latent_var": latent_var,
            "device": str(dev), "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32"}
    (out / "train_config.json").write_text(json.dumps({"train": asdict(cfg), **meta}, indent=2))
    log.info("composer training: %s, codec %s (%s), %d images, %s, %d -> %d steps", cfg.sd, codec.codec_name,
             meta["codec_weights_hash"], len(crops.items), meta["amp"], step, total)

    hist_path = out / "history.jsonl"
    trained = [p for g in opt.param_groups for p in g["params"]]
    captions = [cfg.caption] * cfg.batch
    rows = cols = cfg.crop // Y_STRIDE
    run = {"diff": 0.0, "latent": 0.0, "n": 0, "skipped": 0}
    bad = 0
    tail: dict[str, dict] = dict(state.get("final_losses") or {}) if state else {}
    pbar = tqdm(total=total, initial=step, desc=f"stage {stage}", unit="step", mininterval=5)
    t0, steps_here = time.time(), 0

    def checkpoint() -> None:
        state = _state(cfg, step, stage, composer, cmodel, opt, scaler, rng, gen, latent_var, tail)
        codec_training.save_checkpoint(ckpt, state)

    while step < total:
        if stage == 1 and step >= cfg.stage1_steps:
            stage = 2
            enter_stage2(opt)
            trained = [p for g in opt.param_groups for p in g["params"]]
            pbar.set_description("stage 2")
        x = crops.batch(cfg.batch)[0].to(dev)
        target, z_c = encode_targets(x)
        rate = torch.from_numpy(rng.integers(0, cmodel.n_rates, cfg.batch)).to(dev)
        if stage == 1:
            mask = torch.ones(cfg.batch, 1, rows, cols)
        else:
            mask = drop_masks(cfg.batch, rows, cols, rng, cfg.mask_min, cfg.mask_max)
        mask = mask.to(dev)
        train_gs = cfg.train_gs and stage == 2
        with torch.set_grad_enabled(train_gs):
            z_hat = codec_latent(cmodel, x, rate, mask)
        with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            l_diff = composer.diffusion_loss(target, z_hat, mask[:, 0], captions, mask_stride=Y_STRIDE, generator=gen)
        l_lat = F.mse_loss(z_hat.float(), z_c.float()) / latent_var
        loss = cfg.lam_diff * l_diff + (cfg.lam_latent * l_lat if train_gs else 0.0)
        opt.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            bad = 0
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
            scaler.step(opt)  # skipped by the fp16 scaler when a gradient overflowed
            scaler.update()
            run["diff"] += float(l_diff.detach())
            run["latent"] += float(l_lat.detach())
            run["n"] += 1
        else:  # an fp16 overflow in the forward pass: skip the update; give up when it keeps happening
            bad += 1
            run["skipped"] += 1
            log.warning("step %d: loss %s, update skipped (%d in a row)", step + 1, float(loss), bad)
            if bad >= MAX_BAD_STEPS:
                raise FloatingPointError(f"{bad} non-finite losses in a row at step {step + 1} (stage {stage}); "
                                         "lower the learning rate or use bf16/fp32")
        step += 1
        steps_here += 1
        pbar.update(1)
        stage_end = step == cfg.stage1_steps or step == total
        if step % cfg.log_every == 0 or stage_end:
            n = max(run["n"], 1)
            rec = {"step": step, "stage": stage, "loss_diff": round(run["diff"] / n, 6),
                   "nmse_latent": round(run["latent"] / n, 6),
                   "sec_per_step": round((time.time() - t0) / steps_here, 3)}
            if run["skipped"]:
                rec["skipped"] = run["skipped"]
            tail[f"stage{stage}"] = rec
            pbar.set_postfix(diff=f"{rec['loss_diff']:.4f}", nmse=f"{rec['nmse_latent']:.4f}")
            with hist_path.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            run = {"diff": 0.0, "latent": 0.0, "n": 0, "skipped": 0}
        if step % cfg.checkpoint_every == 0 or stage_end:
            checkpoint()
    pbar.close()
    sec_per_step = (time.time() - t0) / steps_here if steps_here else None
    return _finish(cfg, out, composer, cmodel, codec, meta, tail, sec_per_step)


def _finish(cfg, out: Path, composer, cmodel, codec, meta: dict, tail: dict, sec_per_step) -> Path:
    """Write controlnet/ (+ sd/ for the tiny model, + codec.safetensors with train_gs) and the model card."""
    from .codec import LatentCodec
    from .composer import save_components

    cn_dir = out / "controlnet"
    comps = {"unet": composer.unet, "vae": composer.space, "text_encoder": composer.text_encoder,
             "tokenizer": composer.tokenizer, "scheduler": composer.scheduler, "controlnet": composer.controlnet,
             "adapter": composer.adapter}
    composer.controlnet.eval()
    save_components(comps, sd_dir=(out / "sd") if cfg.sd == "tiny" else None, controlnet_dir=cn_dir)
    (cn_dir / "latentcast_training.json").write_text(json.dumps({"train": asdict(cfg), **meta, "losses": tail},
                                                                indent=2))
    codec_file = None
    if cfg.train_gs and cfg.stage2_steps > 0:
        codec_file = out / "codec.safetensors"
        h = LatentCodec.save(cmodel.cpu(), codec_file, latent_space=codec.latent_space_spec,
                             meta={**codec.meta, "composer_training": {"g_s_from": meta["codec_weights_hash"],
                                                                       "stage2_steps": cfg.stage2_steps}})
        log.info("codec with the retrained g_s: %s (weights hash %s)", codec_file, h.hex())
    _model_card(cfg, out, meta, tail, sec_per_step, codec_file)
    log.info("composer written to %s", cn_dir)
    return cn_dir


def _model_card(cfg, out: Path, meta: dict, tail: dict, sec_per_step, codec_file) -> None:
    sd_arg = str(out / "sd") if cfg.sd == "tiny" else cfg.sd
    codec_arg = str(codec_file) if codec_file else cfg.codec

    def losses(stage: str) -> str:
        r = tail.get(stage)
        if not r:
            return "not run"
        return (f"diffusion MSE {r['loss_diff']:.4f}, latent NMSE {r['nmse_latent']:.4f} "
                f"(mean of the last logged steps up to step {r['step']})")

    latent_term = f" + {cfg.lam_latent} x ||z_c - ẑ_c||² / var(z_c) (stage II)" if cfg.train_gs else ""
    gs_lr = f", {cfg.gs_lr} (g_s)" if cfg.train_gs else ""
    text = f"""# Composer: ControlNet + adapter (`latentcast train composer`)

DISCOVER sec. 3.4: the control module C of Stable Diffusion, conditioned on the codec's decoded
latent ẑ_c and its transmit mask (`models/composer/adapter.py`: LatentAdapter replaces the ControlNet's
conditioning embedding). UNet, VAE and text encoder frozen.

- Stable Diffusion: `{cfg.sd}`{" (random tiny test model, saved in `sd/`)" if cfg.sd == "tiny" else ""}
- Codec: `{cfg.codec}` = {meta['codec']} (weights hash `{meta['codec_weights_hash']}`), ẑ_c in
  `{meta['codec_space']}`; g_s {"retrained in stage II: `codec.safetensors` (new hash)" if codec_file else "frozen"}
- Data: {meta['images']} training images (models/training.py sources: shared photos and samples, vtest
  frames with index % {cfg.vtest_stride} == 0 and % 8 != 0), random {cfg.crop}x{cfg.crop} crops with flips,
  caption "{cfg.caption}"
- Steps: stage I {cfg.stage1_steps} (full frame transmitted), stage II {cfg.stage2_steps} (a fraction
  U({cfg.mask_min}, {cfg.mask_max}) of the y cells dropped in random rectangles), batch {cfg.batch}
- Loss: {cfg.lam_diff} x diffusion MSE (eq. 4){latent_term};
  rate terms constant (codec encoder and entropy model frozen)
- Optimizer: AdamW, lr {cfg.lr} (ControlNet), {cfg.adapter_lr} (adapter){gs_lr};
  device {meta['device']}, precision {meta['amp']}
- Final losses: stage I: {losses('stage1')}; stage II: {losses('stage2')}
- Speed: {f"{sec_per_step:.2f} s/step" if sec_per_step else "n/a"} (last session, checkpoint writes included)

Command:

```
{cli_command(cfg)}
```

Use (cloud config: `composer.kind: controlnet`, `composer.sd: {sd_arg}`, `composer.controlnet: {out / 'controlnet'}`):

```python
make_composer("controlnet", sd="{sd_arg}", controlnet="{out / 'controlnet'}", codec=LatentCodec.load("{codec_arg}"))
```
"""
    (out / "model_card.md").write_text(text)

