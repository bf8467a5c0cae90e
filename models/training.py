"""Training of the latent codec on a CPU (DISCOVER sec. 3.4, without the diffusion term).

::

    images ──latent space encoder (frozen, once)──► z_c cache (.npz per image)
                                                        │
    random crop (x, z_c) ──► ElicCodec(x, rate q, mask) ──► ẑ_c, bits
                                                        │
    stage I :  L = bpp + λ_q · ||z_c - ẑ_c||² / var(z_c)          all parameters
    stage II:  same on the transmitted part, 0-50 % of y masked   g_s only (encoder, hyperprior,
                                                                  entropy networks frozen)

The target latents are computed once (``prepare_cache``) so the training loop
never runs the latent-space encoder. One network covers all rate points: each
crop draws a rate point ``q`` and the loss weighs its distortion with
``λ_q = λ / Δ_q²`` (a fixed quantization step per rate point, as in
quantization-step variable-rate codecs).

Data policy (evaluation sets stay unseen): ``data/images/photos``,
``data/images/samples``, ``data/images/extra`` and the frames of ``vtest.avi``
whose index is not divisible by 8. Kodak and frames 0, 8, 16, ... are never
read here.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from latentcast.proto.symbols import check_rdoq
from latentcast.shared import cache_dir, shared_path

from .elic import CONFIGS, ElicCodec, ElicConfig, ResidualBottleneck, zero_new_blocks

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "RandomCrops", "WeightAverage", "training_sources", "prepare_cache", "train",
           "default_cache_dir", "load_init", "save_checkpoint", "init_linear_path", "extend_linear_path",
           "cell_components", "file_groups", "rate_lambdas", "AVERAGES", "checkpoint_weights",
           "calibrate_table_offsets", "calibration_images", "encoder_cost"]


def default_cache_dir() -> Path:
    """``$LATENTCAST_CACHE`` or ``~/.cache/latentcast``."""
    return cache_dir()


@dataclass
class TrainConfig:
    model: str = "lite"  # codec configuration: lite, lite-taef2 or paper (models.elic.CONFIGS)
    latent_space: str = "pixels:4"  # target space: pixels:4 for lite, taef2 for lite-taef2, sd-vae:<path> for paper
    out: str = "checkpoints/elic-lite"  # checkpoint folder (resumed from if it holds one)
    cache: str = ""  # latent cache folder ("" = <default cache>/train-<latent_space>)
    stage1_steps: int = 6000  # stage I iterations (all parameters)
    stage2_steps: int = 1000  # stage II iterations (g_s only, random masks)
    batch: int = 8  # crops per step
    crop: int = 192  # crop size in pixels, a multiple of 64 (the paper: 512)
    lr: float = 2e-4  # Adam learning rate (halved for the last 20 % of each stage); the shipped weights: 2e-4
    warmup_steps: int = 0  # linear lr warm-up whenever Adam starts afresh (a new run, --init, stage II): a fresh
    #                        Adam moves every weight by about lr at first, which costs a trained decoder ~1 dB
    lam: float = 64.0  # λ: weight of the normalized MSE at Δ = 1 (λ_q = λ / Δ_q²)
    vtest_stride: int = 5  # use vtest frames with index % stride == 0 (and index % 8 != 0)
    video_fraction: float = 0.5  # share of crops from the video frames (the rest from the photographs): the video
    #                              is one scene in many near-identical frames, so its share is set, not its count
    scale_min: float = 1.0  # crops are downscaled by a random factor in [scale_min, 1] (INTER_AREA; 1: never), so
    #                         a photograph also shows its content denser, as a wider or farther camera would
    checkpoint_every: int = 200  # steps between checkpoints
    seed: int = 0  # RNG seed for crops, rates, masks
    threads: int = 2  # torch threads (of each worker)
    workers: int = 1  # processes training one model, each on its own --batch crops, their gradients averaged every
    #                   step (gloo on loopback): on 2 cores 2 workers at 1 thread make ~30 % more crops a second
    #                   than 1 at 2 threads (small convolutions parallelize poorly within one process)
    overrides: dict = field(default_factory=dict)  # ElicConfig field overrides, e.g. {"N": 64}
    init: str = ""  # start a new run from a released codec weight file (e.g. to train the shipped weights longer)
    mask_fraction: float = 0.0  # stage I: share of crops with 0-50 % of y masked (g_s keeps learning ROI-only)
    stage2_mask_fraction: float = 1.0  # stage II: the same share (1.0: every crop, as the shipped v1/v2; lower
    #                                    keeps whole frames sharp when stage II finishes a run's decoder)
    channel_gains: bool = False  # learn per-rate-point channel offsets (gain units; ElicConfig.channel_gains)
    gain_lr: float = 5e-3  # Adam learning rate of the channel offsets (in table steps, so larger than lr)
    bf16: bool = False  # g_a, g_s in bfloat16 autocast: 1.8x a step with AVX-512 BF16, far slower without it
    ema: float = 0.0  # decay of a moving average of the weights kept beside them (0: off; 0.999 ≈ the last 1,000
    #                   steps): the checkpoint holds it, `release codec --ema` ships it
    ema_slow: float = 0.0  # decay of a second, slower average beside the first (0: off; 0.9995 ≈ the last 2,000
    #                        steps), to measure which pays: `release codec --ema-slow` ships it. Added to a running
    #                        run it starts at the first average (or the weights)
    rdoq: float = 0.0  # λ of the encoder's rate-distortion optimized quantization applied while training (0: plain
    #                    rounding): each symbol the floor or ceiling of (y - μ)/Δ with the smaller squared error +
    #                    λ · its Gaussian bits, straight-through, so g_s and the entropy model learn on the symbols
    #                    the shipped encoder sends (codec.rdoq, proto.symbols.RDOQ_LAMBDA)

    def codec_config(self) -> ElicConfig:
        import dataclasses

        base = CONFIGS.get(self.model)
        if base is None:
            raise ValueError(f"unknown model {self.model!r} (valid: {', '.join(CONFIGS)})")
        over = {k: tuple(v) if isinstance(v, list) else v for k, v in self.overrides.items()}  # JSON gives lists
        cfg = dataclasses.replace(base, **over)
        return dataclasses.replace(cfg, channel_gains=True) if self.channel_gains else cfg


TRAIN_IMAGE_DIRS = ("photos", "samples", "extra")  # folders of ../shared/data/images that training may read


def training_sources(*, vtest_stride: int = 5) -> list[tuple[str, Path, int | None]]:
    """(name, path, frame index or None) of every training image, evaluation sets excluded."""
    out: list[tuple[str, Path, int | None]] = []
    for sub in TRAIN_IMAGE_DIRS:
        d = shared_path("data", "images", sub)
        if not d.is_dir():
            log.warning("training images %s not found; skipped", d)
            continue
        for p in sorted(d.iterdir()):
            if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"):
                out.append((f"{sub}-{p.stem}", p, None))
    video = shared_path("data", "video", "vtest.avi")
    import cv2

    cap = cv2.VideoCapture(str(video))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()
    for i in range(n):
        if i % 8 != 0 and i % vtest_stride == 0:
            out.append((f"vtest-{i:04d}", video, i))
    return out


def _read_rgb(path: Path, frame: int | None) -> np.ndarray:
    import cv2

    if frame is None:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise FileNotFoundError(f"cannot read image {path}")
    else:
        cap = cv2.VideoCapture(str(path))
        cap.set(cv2.CAP_PROP_POS_FRAMES, frame)
        ok, img = cap.read()
        cap.release()
        if not ok:
            raise FileNotFoundError(f"cannot read frame {frame} of {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def prepare_cache(cfg: TrainConfig) -> Path:
    """Encode every training image into the target latent space once; resumable."""
    from tqdm import tqdm

    from .latent_spaces import load_latent_space

    pixels = cfg.latent_space.startswith("pixels")
    cache = (
        Path(cfg.cache)
        if cfg.cache
        else default_cache_dir() / ("train-images" if pixels else f"train-{cfg.latent_space}")
    )
    cache.mkdir(parents=True, exist_ok=True)
    sources = training_sources(vtest_stride=cfg.vtest_stride)
    todo = [s for s in sources if not (cache / f"{s[0]}.npz").exists()]
    if not todo:
        return cache
    torch.set_num_threads(cfg.threads)
    space = load_latent_space(cfg.latent_space)
    space.eval()
    f = 8 if pixels else space.factor
    for name, path, frame in tqdm(todo, desc="target latents", unit="img"):
        rgb = _read_rgb(path, frame)
        h, w = (rgb.shape[0] // f) * f, (rgb.shape[1] // f) * f
        rgb = np.ascontiguousarray(rgb[:h, :w])
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
        lat = np.zeros(0, np.float16)  # pixel targets are computed from the crop
        if not pixels:
            with torch.no_grad():
                lat = space.encode(x)[0].numpy().astype(np.float16)
        tmp = cache / f"{name}.tmp.npz"
        np.savez(tmp, image=rgb, latent=lat)
        tmp.rename(cache / f"{name}.npz")
    return cache


class RandomCrops:
    """Random aligned crops of (image, latent) pairs held in memory."""

    def __init__(self, cache: Path, crop: int, factor: int, rng: np.random.Generator, space=None, *,
                 video_fraction: float = 0.5, scale_min: float = 1.0):
        """``space``: a pixel latent space that computes targets from the crop (no cached latents).
        ``video_fraction``: share of crops from the video frames; ``scale_min``: the smallest random downscale
        of a crop (1: none; pixel targets only, as cached latents cannot be rescaled)."""
        if not 0.0 <= video_fraction <= 1.0:
            raise ValueError(f"video_fraction {video_fraction} is not in [0, 1]")
        if not 0.0 < scale_min <= 1.0:
            raise ValueError(f"scale_min {scale_min} is not in (0, 1]")
        if scale_min < 1.0 and space is None:
            raise ValueError(f"scale_min {scale_min} needs a pixel latent space (cached latents cannot be rescaled)")
        self.space = space
        self.video_fraction, self.scale_min = video_fraction, scale_min
        self.items = []
        video: list[int] = []
        for p in sorted(cache.glob("*.npz")):
            if p.name.endswith(".tmp.npz"):
                continue
            d = np.load(p)
            img, lat = d["image"], d["latent"]
            if img.shape[0] >= crop and img.shape[1] >= crop:
                if p.name.startswith("vtest-"):
                    video.append(len(self.items))
                self.items.append((img, lat))
        if not self.items:
            raise FileNotFoundError(f"no cached training latents of size >= {crop} in {cache}")
        # a set share of the crops from the video frames (video_fraction): the video has many near-identical
        # frames of one scene and would otherwise make up most of the data (build for cameras in general)
        in_video = set(video)
        self.photos = [i for i in range(len(self.items)) if i not in in_video]
        self.video = video
        self.crop, self.f, self.rng = crop, factor, rng
        if space is None:
            lat_all = np.concatenate([z.reshape(z.shape[0], -1).astype(np.float32) for _, z in self.items[:64]], axis=1)
        else:
            lat_all = np.concatenate([i.reshape(-1).astype(np.float32) / 255 for i, _ in self.items[:64]])
        self.latent_var = float(lat_all.var())

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ls = [], []
        c, f = self.crop, self.f
        for _ in range(n):
            from_video = self.rng.random() < self.video_fraction
            group = (self.video if from_video else self.photos) or self.photos or self.video
            img, lat = self.items[group[self.rng.integers(len(group))]]
            side = c  # the crop's side in the image, before the downscale
            if self.scale_min < 1.0:
                s = self.rng.uniform(max(self.scale_min, c / min(img.shape[:2])), 1.0)
                side = min(int(round(c / s)), *img.shape[:2])
            y0 = self.rng.integers(0, (img.shape[0] - side) // f + 1) * f
            x0 = self.rng.integers(0, (img.shape[1] - side) // f + 1) * f
            flip = bool(self.rng.integers(2))  # horizontal flip (latents flip with the image)
            crop_img = img[y0 : y0 + side, x0 : x0 + side]
            if side != c:
                import cv2

                crop_img = cv2.resize(crop_img, (c, c), interpolation=cv2.INTER_AREA)
            xs.append(crop_img[:, ::-1] if flip else crop_img)
            if self.space is None:
                crop_lat = lat[:, y0 // f : (y0 + c) // f, x0 // f : (x0 + c) // f]
                ls.append(crop_lat[:, :, ::-1] if flip else crop_lat)
        x = torch.from_numpy(np.ascontiguousarray(np.stack(xs))).permute(0, 3, 1, 2).float() / 255
        if self.space is not None:
            with torch.no_grad():
                return x, self.space.encode(x)
        return x, torch.from_numpy(np.ascontiguousarray(np.stack(ls)).astype(np.float32))


def random_masks(n: int, rows: int, cols: int, rng: np.random.Generator, max_masked: float = 0.5) -> torch.Tensor:
    """(n,1,rows,cols) masks, 1 = transmitted, with 0..max_masked of the cells off in random rectangles."""
    m = np.ones((n, 1, rows, cols), dtype=np.float32)
    for i in range(n):
        target = rng.uniform(0, max_masked) * rows * cols
        while (1 - m[i]).sum() < target:
            h = rng.integers(1, rows + 1)
            w = rng.integers(1, cols + 1)
            r, c = rng.integers(0, rows - h + 1), rng.integers(0, cols - w + 1)
            m[i, 0, r : r + h, c : c + w] = 0
            if (1 - m[i]).sum() > max_masked * rows * cols:
                break
    return torch.from_numpy(m)


_FROZEN_FORM = ("w_int", "mult", "bias_int", "shift", "frozen")  # QConv's integer form, rebuilt by freeze()


def init_linear_path(model: ElicCodec, crops: RandomCrops, *, batches: int = 60, scale: float = 8.0) -> None:
    """Start a fresh codec with a linear path (``ElicConfig.linear_path``) as a block-PCA transform coder.

    The linear paths get the first M principal components V of 16x16 cells of ``batches`` x 16 training
    crops (mean m): y = scale·Vᵀ(cell - m) and back, cell = V ŷ / scale + m, so y's channels come in
    decreasing variance (ELIC's small first groups get the strongest ones). ``scale``: PCA units per unit
    of y (at 8, rate point Δ = 1 quantizes a coefficient with step 1/8). The last convolutions of g_a and
    g_s start at zero: step 0 is that coder, and the nonlinear transforms learn what it lacks."""
    if model.a_lin is None or model.g_s.linear is None:
        raise ValueError("init_linear_path: the codec has no linear path (ElicConfig.linear_path is False)")
    V, mean, share = cell_components(crops, model.cfg.M, batches=batches)
    with torch.no_grad():
        model.a_lin.proj.weight.copy_((scale * V.T)[:, :, None, None])
        model.a_lin.proj.bias.copy_(-scale * V.T @ mean)
        model.g_s.linear.proj.weight.copy_((V / scale)[:, :, None, None])
        model.g_s.linear.proj.bias.copy_(mean)
        for last in (model.g_a[-1], model.g_s.out):
            last.weight.zero_()
            last.bias.zero_()
    log.info("linear path: the %d principal components of training cells (%.1f %% of their variance)",
             V.shape[1], 100 * share)


def _training_cells(crops: RandomCrops, batches: int) -> torch.Tensor:
    """The 16x16x3 cells of ``batches`` x 16 training crops, one per row in ``pixel_unshuffle`` order (float64)."""
    import torch.nn.functional as F

    from .elic import CELL

    return torch.cat([F.pixel_unshuffle(crops.batch(16)[0], CELL).permute(0, 2, 3, 1).reshape(-1, 3 * CELL * CELL)
                      for _ in range(batches)]).double()


def cell_components(crops: RandomCrops, M: int, *, batches: int = 60) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The first ``M`` principal components of 16x16x3 cells of ``batches`` x 16 training crops, in
    ``pixel_unshuffle`` order: (V (768, M) float64 orthonormal, in decreasing variance; the cells' mean (768,);
    the share of the cells' variance they hold)."""
    X = _training_cells(crops, batches)
    mean = X.mean(0)
    ev, vecs = torch.linalg.eigh(torch.cov((X - mean).T))
    order = torch.argsort(ev, descending=True)[:M]
    ev = ev.clamp_min(0)
    return vecs[:, order], mean, float(ev[order].sum() / ev.sum())


def load_init(model: ElicCodec, sd: dict[str, torch.Tensor]) -> list[str]:
    """Start ``model`` from another codec's parameters (a released weight file's state dict).

    Tensors of the same shape are copied. A tensor whose shape differs only by being larger in
    some dimensions (e.g. a file with more hyper-latent channels ``Nz``) gives its leading slice,
    so a narrower model starts from the first channels of a wider one. A wider analysis (``N`` above
    the file's) goes the other way: g_a's and h_a's convolutions keep the file's weights in their
    leading channels and the new channels start unread (:func:`_widened`), so y and z are the file's
    until training uses them; g_a with more residual blocks (``res_blocks``) likewise starts as the
    file's (:func:`_deepen_analysis`), and so does g_s with more residual blocks (``gs_blocks``,
    ``gs_tail_blocks``: each new block starts as the identity, ``elic.zero_new_blocks``). The probability tables
    and the frozen integer form are skipped (rebuilt at release), and the rate-point buffers come
    from the new configuration (a released file carries calibrated table offsets). Returns the
    names that were sliced; raises ``ValueError`` for a tensor that cannot fit or is missing.
    """
    own = model.state_dict()
    sd = _deepen_analysis(sd, model)
    sd = _widen_latent(sd, model)
    sliced, widened, missing = [], [], []
    n_file_priors = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("prior_z.")), default=-1)
    for name, dst in own.items():
        if (name.startswith("rate_") and name != "rate_gain") or name.rsplit(".", 1)[-1] in _FROZEN_FORM:
            continue
        src = sd.get(name)
        if src is None and name == "rate_gain":
            continue  # a file without channel gains: they start at 0 (every channel at the rate point's step)
        if src is None and name.startswith("prior_z.") and n_file_priors:
            # a rate point the file lacks (e.g. a finer one added for training) starts from the file's last z prior
            parts = name.split(".")
            src = sd.get(".".join([parts[0], str(min(int(parts[1]), n_file_priors - 1))] + parts[2:]))
        if src is None:
            missing.append(name)
            continue
        if src.shape != dst.shape:
            if _widens(name, src, dst):
                src = _widened(src, dst)
                widened.append(name)
            elif src.dim() != dst.dim() or any(s < d for s, d in zip(src.shape, dst.shape)):
                raise ValueError(f"init tensor {name!r} has shape {tuple(src.shape)}, cannot fit {tuple(dst.shape)}")
            else:
                src = src[tuple(slice(0, d) for d in dst.shape)]
                sliced.append(name)
        with torch.no_grad():
            dst.copy_(src.to(dst.dtype))
    dropped = [n for n in sd if n.startswith(("g_s.trunk.", "g_s.up.")) and n not in own]
    if dropped:  # a g_s with fewer blocks than the file's would compute something else: no start from it
        c = model.cfg
        raise ValueError(f"init file has {len(dropped)} g_s tensors the model lacks, e.g. {dropped[:2]}: its g_s has "
                         f"more layers than the model's (gs_blocks={c.gs_blocks}, gs_tail_blocks={c.gs_tail_blocks}, "
                         f"up widths {list(c.synthesis_up_widths)}; g_s can only be deepened)")
    if missing and any(n.startswith("g_s.") for n in missing):  # g_s with more residual blocks than the file's
        grown = zero_new_blocks(model.g_s, sd, prefix="g_s.")
        missing = [n for n in missing if not any(n.startswith(f"g_s.{b}.") for b in grown)]
        if grown:
            log.info("init: g_s deepened by %d residual blocks (%s; they start as the identity)", len(grown),
                     ", ".join(grown))
    if missing and all(n.startswith(("a_lin.", "g_s.linear.")) for n in missing):
        raise ValueError("init file has no linear path (ElicConfig.linear_path): start the linear-path run without "
                         "--init (it starts from the training cells' principal components) or from a file that has one")
    if missing:
        raise ValueError(f"init file lacks {len(missing)} tensors of the model, e.g. {missing[:3]}")
    model.reset_rate_points()
    if sliced:
        log.info("init: %d tensors sliced to the new shapes (%s, ...)", len(sliced), ", ".join(sliced[:4]))
    if widened:
        log.info("init: g_a and h_a widened (%d tensors; the new channels start unread by the old ones)", len(widened))
    return sliced


def _widens(name: str, src: torch.Tensor, dst: torch.Tensor) -> bool:
    """Whether ``dst`` is ``src`` of a wider analysis (``--set N=...`` above the file's): a convolution's weight
    or bias of g_a or h_a, no dimension smaller than the file's."""
    return (name.startswith(("g_a.", "h_a.")) and name.endswith((".weight", ".bias")) and src.dim() == dst.dim()
            and src.dim() in (1, 4) and all(s <= d for s, d in zip(src.shape, dst.shape)))


def _widened(src: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """``src`` in the leading block of the wider ``fresh`` (the new model's own random initialisation), with the
    old outputs' weights on the new inputs at zero: the old channels compute what the file's did, the new ones
    start random and are read by nothing old until training moves those zeros (Net2Net's widening, with the
    new units random on their input side and silent on their output side, instead of copies)."""
    out = fresh.detach().clone()
    out[tuple(slice(0, d) for d in src.shape)] = src
    if src.dim() == 4:
        out[: src.shape[0], src.shape[1]:] = 0
    return out


def file_groups(sd: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """The channel groups of y in a codec state dict (each group's spatial context reads its channels)."""
    out, k = [], 0
    while f"sp_ctx.{k}.0.conv.weight" in sd:
        out.append(int(sd[f"sp_ctx.{k}.0.conv.weight"].shape[1]))
        k += 1
    return tuple(out)


def _widen_latent(sd: dict[str, torch.Tensor], model: ElicCodec) -> dict[str, torch.Tensor]:
    """``sd`` completed for ``model`` when the model's y has the file's channel groups plus more after them
    (``--set M=192 --set groups=...``): the new channels start silent. g_a's last convolution and the linear
    path write 0 into them, h_a and g_s read them with zero weights (g_s's first convolution reads
    [ŷ, mask, M(ẑ)]: the new columns go between ŷ's and the mask's), their channel gains start at 0; the
    new groups' context and parameter networks keep the model's own initialisation. y, z and the frame are
    the file's; :func:`extend_linear_path` then gives the new channels something to carry."""
    old = file_groups(sd)
    new = tuple(model.cfg.groups)
    if not old or old == new or new[: len(old)] != old:
        return sd  # the same latent, or not a widening of it (load_init names what does not fit)
    m_old, m = sum(old), model.cfg.M
    own = model.state_dict()
    out = dict(sd)

    def grow(name: str, dim: int, at: int | None = None) -> None:
        src, dst = sd[name], torch.zeros_like(own[name])
        at = src.shape[dim] if at is None else at
        n_new = dst.shape[dim] - src.shape[dim]
        dst.narrow(dim, 0, at).copy_(src.narrow(dim, 0, at))
        dst.narrow(dim, at + n_new, src.shape[dim] - at).copy_(src.narrow(dim, at, src.shape[dim] - at))
        out[name] = dst

    last = max(int(k.split(".")[1]) for k in sd if k.startswith("g_a.") and k.endswith(".weight"))
    for name in (f"g_a.{last}.weight", f"g_a.{last}.bias", "a_lin.proj.weight", "a_lin.proj.bias"):
        if name in sd:
            grow(name, 0)
    for name in ("h_a.0.weight", "g_s.linear.proj.weight", "rate_gain"):
        if name in sd:
            grow(name, 1)
    grow("g_s.head.weight", 1, at=m_old)
    for k, v in own.items():  # the new groups' networks: the model's own (random) start
        idx = k.split(".")
        first_new = len(old) - 1 if idx[0] == "ch_ctx" else len(old)  # ch_ctx[k - 1] serves group k
        if idx[0] in ("sp_ctx", "ep", "ch_ctx") and int(idx[1]) >= first_new:
            out[k] = v.clone()
    log.info("init: y widened from %d to %d channels (groups %s -> %s; the new ones start silent)",
             m_old, m, old, new)
    return out


@torch.no_grad()
def extend_linear_path(model: ElicCodec, crops: RandomCrops, m_old: int, *, batches: int = 40,
                       scale: float = 8.0) -> float:
    """Give y's new channels (from ``m_old`` on, after :func:`_widen_latent`) something to carry: the linear
    path's analysis of the new channels takes the principal components V of the cells of x that its old
    channels do not see (x projected off the span of the old rows of the linear analysis, over ``batches``
    x 16 training crops): y_new = scale·Vᵀ(cell - m). These are what a wider block transform would add (on
    Kodak, block PCA with 192 components instead of 160 reconstructs at 36.9 dB instead of 34.8). The
    decoder still reads them with zero weights, so the frame is the file's at first (a linear read-out would
    count again whatever g_s already draws in those directions); training learns to read them, and what they
    cost. Draws its crops from its own generator (the run's crops stay what they were). Returns the share of
    the cells' variance along V."""
    if model.a_lin is None:
        raise ValueError("extend_linear_path: the codec has no linear path (ElicConfig.linear_path is False)")
    n_new = model.cfg.M - m_old
    own_rng, crops.rng = crops.rng, np.random.default_rng(12345)
    try:
        X = _training_cells(crops, batches)
    finally:
        crops.rng = own_rng
    mean_x = X.mean(0)
    seen, _ = torch.linalg.qr(model.a_lin.proj.weight[:m_old, :, 0, 0].double().T)  # (768, m_old) orthonormal
    Xc = X - mean_x
    unseen = Xc - (Xc @ seen) @ seen.T
    ev, vecs = torch.linalg.eigh(torch.cov(unseen.T))
    order = torch.argsort(ev, descending=True)[:n_new]
    V = vecs[:, order]
    share = float(ev.clamp_min(0)[order].sum() / torch.cov(Xc.T).trace())
    w_in = model.a_lin.proj.weight
    w_in[m_old:] = (scale * V.T)[:, :, None, None].to(w_in.dtype)
    model.a_lin.proj.bias[m_old:] = (-scale * V.T @ mean_x).to(w_in.dtype)
    log.info("linear path extended: %d new channels along %.2f %% of the cells' variance, unseen by the old ones",
             n_new, 100 * share)
    # the new groups' entropy parameters start as a zero-mean Gaussian of each new channel's own spread (their
    # networks' last layer at zero weights): scale index ln(σ/σ_min)/δ, which every rate point's offset then
    # shifts to its step, instead of a random guess that would charge several bits a symbol at first
    sigma = (scale * (Xc @ V).std(0)).clamp_min(model.cfg.scale_min)
    first = 0
    for k, c in enumerate(model.cfg.groups):
        if first >= m_old:
            head = model.ep[k][-1].conv
            head.weight.zero_()
            head.bias[:c] = 0.0
            head.bias[c:] = (torch.log(sigma[first - m_old: first - m_old + c] / model.cfg.scale_min)
                             / model.cfg.log_step).to(head.bias.dtype)
        first += c
    return share


def _analysis_stages(kinds: list[str]) -> list[list[int]]:
    """Module indices of g_a's residual blocks per stage, from its module kinds in order ("conv" / "block")."""
    stages: list[list[int]] = []
    for i, kind in enumerate(kinds):
        if kind == "conv":
            stages.append([])
        elif not stages:
            raise ValueError("g_a starts with a block")
        else:
            stages[-1].append(i)
    return stages


def _deepen_analysis(sd: dict[str, torch.Tensor], model: ElicCodec) -> dict[str, torch.Tensor]:
    """``sd`` with its g_a renamed onto ``model``'s, when the model has more residual blocks per stage
    (``res_blocks``): the file's blocks keep their order and each extra block starts as the identity (its
    last convolution zero), so the deeper g_a computes what the file's did (function-preserving, as in
    Net2Net's deepening). ``sd`` as it is when the layouts already agree."""
    n_file = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("g_a.")), default=-1)
    file_kinds = ["block" if f"g_a.{i}.body.0.weight" in sd else "conv" for i in range(n_file)]
    kinds = ["block" if isinstance(m, ResidualBottleneck) else "conv" if isinstance(m, torch.nn.Conv2d) else "other"
             for m in model.g_a]
    if file_kinds == kinds or "other" in kinds:
        return sd
    old, new = _analysis_stages(file_kinds), _analysis_stages(kinds)
    if len(old) != len(new) or any(len(a) > len(b) for a, b in zip(old, new)):
        return sd  # not a deepening: load_init names what does not fit
    rename = {}
    for (i_old, i_new) in zip([i for i, k in enumerate(file_kinds) if k == "conv"],
                              [i for i, k in enumerate(kinds) if k == "conv"]):
        rename[i_old] = i_new
    out = {k: v for k, v in sd.items() if not k.startswith("g_a.")}
    own = model.state_dict()
    for a, b in zip(old, new):
        rename.update(zip(a, b))
        for extra in b[len(a):]:
            for k, v in own.items():
                if k.startswith(f"g_a.{extra}."):
                    out[k] = torch.zeros_like(v) if k.startswith(f"g_a.{extra}.body.4.") else v.clone()
    for k, v in sd.items():
        if k.startswith("g_a."):
            _, i, rest = k.split(".", 2)
            out[f"g_a.{rename[int(i)]}.{rest}"] = v
    log.info("init: g_a deepened from %d to %d residual blocks (the new ones start as the identity)",
             sum(map(len, old)), sum(map(len, new)))
    return out


def rate_lambdas(model: ElicCodec, lam: float) -> torch.Tensor:
    """The trainer's distortion weight of each rate point: λ_q = λ / Δ_q² with the rate point's own step (channel
    gains only move bits between channels), float32 (n_rates,)."""
    base_delta = model.rate_delta if model.rate_delta.dim() == 1 else model.rate_delta.new_tensor(
        [math.exp(k * model.cfg.log_step) for k in model.cfg.rate_steps])
    return torch.tensor([lam], dtype=torch.float32) / base_delta.float() ** 2


def scheduled_lr(lr: float, step: int, *, start: int, length: int, opt_start: int | None, warmup: int) -> float:
    """The trainers' learning rate at ``step``: ``lr``, halved for the last 20 % of the stage of ``length`` steps
    from ``start``, times a linear warm-up over ``warmup`` steps from ``opt_start`` (the step where Adam started
    afresh; None when its state was resumed: no warm-up)."""
    out = lr * (0.5 if step - start >= 0.8 * length else 1.0)
    if opt_start is not None and warmup:
        out *= min(1.0, (step - opt_start + 1) / warmup)
    return out


class WeightAverage:
    """An exponential moving average of a model's parameters (Polyak averaging), kept beside the training: at a
    low learning rate the weights wander around a valley the average sits nearer the bottom of. Buffers are
    the model's own. Resumes from a checkpoint's ``ema`` (a state dict); starts at the model's weights."""

    def __init__(self, model: torch.nn.Module, decay: float, saved: dict[str, torch.Tensor] | None = None) -> None:
        self.decay = float(decay)
        self.names = [n for n, p in model.named_parameters()]
        params = dict(model.named_parameters())
        self.avg = [(saved[n] if saved is not None and n in saved and saved[n].shape == params[n].shape
                     else params[n]).detach().clone() for n in self.names]
        self._params = [params[n].detach() for n in self.names]  # views of the model's own (updated in place)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One step of the average towards ``model``'s current parameters (the model it was made for)."""
        torch._foreach_mul_(self.avg, self.decay)
        torch._foreach_add_(self.avg, self._params, alpha=1.0 - self.decay)

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with the averaged parameters in place of its own."""
        out = dict(model.state_dict())
        out.update(zip(self.names, (a.clone() for a in self.avg)))
        return out


#: a training checkpoint's moving averages: its key -> the `train codec` option that keeps it
AVERAGES = {"ema": "--ema", "ema_slow": "--ema-slow"}


def checkpoint_weights(state: dict, average: str | None = None, *, source: str | Path = "the checkpoint"
                       ) -> dict[str, torch.Tensor]:
    """The state dict a training checkpoint (``last.pt``) holds: its weights (``average`` None) or one of its
    moving averages (``"ema"``, ``"ema_slow"``). Raises ValueError naming ``source`` when the run kept no such
    average."""
    if average is None:
        return state["model"]
    if average not in AVERAGES:
        raise ValueError(f"unknown average {average!r} (valid: {', '.join(AVERAGES)})")
    if average not in state:
        raise ValueError(f"{source} holds no {'slower ' if average == 'ema_slow' else ''}moving average of its "
                         f"weights: the run was trained without {AVERAGES[average]}")
    return state[average]


def save_checkpoint(path: Path, state: dict) -> None:
    """Write a training checkpoint atomically (a temporary file, then a rename): a run killed while saving keeps
    its previous checkpoint. Used by every trainer (codec, composer)."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) stage I then stage II; returns the final checkpoint path. With ``cfg.workers`` > 1 the
    workers run in processes of their own (worker 0 writes the checkpoints and the history) and this process
    waits for them."""
    _check_config(cfg)
    if cfg.workers == 1:
        return _train_worker(0, cfg)
    import os
    import socket

    import torch.multiprocessing as mp

    cache = prepare_cache(cfg)  # once, before the workers read it
    with socket.socket() as sock:  # a free loopback port for the workers' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_train_worker, args=(cfg, port, os.getpid(), cache), nprocs=cfg.workers, join=True)
    return Path(cfg.out) / "last.pt"


def _check_config(cfg: TrainConfig) -> None:
    if cfg.workers < 1 or cfg.threads < 1:
        raise ValueError(f"workers {cfg.workers} and threads {cfg.threads} must be >= 1")
    if cfg.crop % 64:
        raise ValueError(f"crop {cfg.crop} must be a multiple of 64")
    if cfg.warmup_steps < 0:
        raise ValueError(f"warmup_steps {cfg.warmup_steps} must be >= 0")
    for name in ("mask_fraction", "stage2_mask_fraction"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"{name} {getattr(cfg, name)} must be within [0, 1]")
    check_rdoq(cfg.rdoq, default=TrainConfig.rdoq)
    for name, example in (("ema", "0.999"), ("ema_slow", "0.9995")):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ValueError(f"{name} {getattr(cfg, name)} must be within [0, 1) (0: off; e.g. {example})")


def _average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Every worker's gradients replaced by their mean over the workers (one all-reduce of a flat copy); a
    parameter one worker's batch did not reach counts as zero there."""
    import torch.distributed as dist

    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    at = 0
    for g in grads:
        g.copy_(flat[at:at + g.numel()].view(g.shape))
        at += g.numel()


def _check_in_step(model: torch.nn.Module, step: int) -> None:
    """Raise unless every worker holds the same weights (they start equal and apply the same averaged update)."""
    import torch.distributed as dist

    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    lo, hi = total.clone(), total.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if lo.item() != hi.item():
        raise RuntimeError(f"training workers drifted apart at step {step} "
                           f"(weight sums {lo.item()!r} to {hi.item()!r})")


def _train_worker(rank: int, cfg: TrainConfig, port: int | None = None, parent: int | None = None,
                  cache: Path | None = None) -> Path:
    """One worker of :func:`train` (the only one when ``cfg.workers`` is 1); ``cache``: the prepared latent
    cache (None: prepare it here)."""
    import os

    from tqdm import tqdm

    torch.set_num_threads(cfg.threads)
    world = cfg.workers
    lead = rank == 0
    if world > 1:
        import torch.distributed as dist

        if lead and not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "last.pt"
    ccfg = cfg.codec_config()
    torch.manual_seed(cfg.seed)  # a fresh run's initial weights
    model = ElicCodec(ccfg)
    step = 0
    state = None
    m_init = 0  # y channels of the --init file (fewer than the model's: the new ones get the linear path's help)
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        step = int(state["step"])
        log.info("resumed from %s at step %d", ckpt, step)
    elif cfg.init:
        from safetensors.torch import load_file

        init_sd = load_file(cfg.init)
        load_init(model, init_sd)
        m_init = sum(file_groups(init_sd))
        log.info("initialised from %s", cfg.init)
    cache = prepare_cache(cfg) if cache is None else cache
    rng = np.random.default_rng(cfg.seed + step if lead else (cfg.seed + step, rank))  # each worker its own crops
    torch.manual_seed(cfg.seed + step + 7919 * rank)
    space = None
    if cfg.latent_space.startswith("pixels"):
        from .latent_spaces import load_latent_space

        space = load_latent_space(cfg.latent_space)
    if space is not None and (space.channels, space.factor) != (ccfg.latent_channels, ccfg.latent_factor):
        raise ValueError(f"latent space {cfg.latent_space!r} ({space.channels} ch at 1/{space.factor}) does not match "
                         f"codec {ccfg.name!r} ({ccfg.latent_channels} ch at 1/{ccfg.latent_factor})")
    crops = RandomCrops(cache, cfg.crop, ccfg.latent_factor, rng, space, video_fraction=cfg.video_fraction,
                        scale_min=cfg.scale_min)
    if state is None and not cfg.init and ccfg.linear_path:
        init_linear_path(model, crops)
    if state is None and 0 < m_init < ccfg.M and ccfg.linear_path:
        extend_linear_path(model, crops, m_init)
    from .synthesis_runtime import cpu_has_bf16

    if cfg.bf16 and not cpu_has_bf16():
        log.warning("--bf16 on a CPU without AVX-512 BF16 or AMX: a step is many times slower than in float32")
    model.to(memory_format=torch.channels_last)  # the convolutions' fastest layout on CPU (as fast or faster)
    if world > 1:  # worker 0's start everywhere (a fresh linear path is fitted on each worker's own crops)
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
    total = cfg.stage1_steps + cfg.stage2_steps
    if lead:
        (out / "train_config.json").write_text(json.dumps({"train": asdict(cfg), "codec": ccfg.to_dict(),
                                                            "latent_var": crops.latent_var}, indent=2))
    hist_path = out / "history.jsonl"

    def make_opt(stage: int):
        # stage II trains the decoder only: freeze everything else (autograd then skips it)
        for p in model.parameters():
            p.requires_grad_(stage == 1)
        for p in model.g_s.parameters():
            p.requires_grad_(True)
        gains = [model.rate_gain] if model.rate_gain is not None and stage == 1 else []
        rest = [p for p in model.parameters() if p.requires_grad and all(p is not g for g in gains)]
        groups = [{"params": rest, "lr_scale": 1.0}]
        if gains:
            groups.append({"params": gains, "lr_scale": cfg.gain_lr / cfg.lr})
        return torch.optim.Adam(groups, lr=cfg.lr)

    ema = WeightAverage(model, cfg.ema, state.get("ema") if state else None) if cfg.ema > 0 and lead else None
    ema_slow = None
    if cfg.ema_slow > 0 and lead:  # resumed, or started at the first average where the run kept one
        ema_slow = WeightAverage(model, cfg.ema_slow, (state.get("ema_slow") or state.get("ema")) if state else None)
    stage = 1 if step < cfg.stage1_steps else 2
    opt = make_opt(stage)
    opt_start: int | None = step  # where Adam started afresh (the warm-up counts from here); None: resumed
    if state is not None and state.get("stage") == stage:
        opt.load_state_dict(state["opt"])
        opt_start = None
    pbar = tqdm(total=total, initial=step, desc=f"stage {stage}", unit="step", mininterval=10, disable=not lead)
    trained = [p for p in model.parameters() if p.requires_grad]
    lam = rate_lambdas(model, cfg.lam)
    n_r = model.n_rates
    run = {"bpp": np.zeros(n_r), "mse": np.zeros(n_r), "n": np.zeros(n_r)}
    t0 = time.time()
    while step < total:
        if step == cfg.stage1_steps and stage == 1:
            stage = 2
            opt = make_opt(2)
            trained = [p for p in model.parameters() if p.requires_grad]
            opt_start = step
            pbar.set_description("stage 2")
        lr = scheduled_lr(cfg.lr, step, start=0 if stage == 1 else cfg.stage1_steps,
                          length=cfg.stage1_steps if stage == 1 else cfg.stage2_steps, opt_start=opt_start,
                          warmup=cfg.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        x, target = crops.batch(cfg.batch)
        rate = torch.from_numpy(rng.integers(0, model.n_rates, cfg.batch))
        mask = None
        fraction = cfg.mask_fraction if stage == 1 else cfg.stage2_mask_fraction
        if fraction > 0:
            mask = random_masks(cfg.batch, cfg.crop // 16, cfg.crop // 16, rng)
            if fraction < 1:
                keep_full = torch.from_numpy(rng.random(cfg.batch) >= fraction)
                mask[keep_full] = 1.0
        model.train()
        res = model(x.contiguous(memory_format=torch.channels_last), rate=rate, mask=mask, bf16=cfg.bf16,
                    rdoq=cfg.rdoq)
        npix = x.shape[2] * x.shape[3]
        bpp = (res["bits_y"] + res["bits_z"]) / npix
        mse = ((res["latent"] - target) ** 2).mean(dim=(1, 2, 3)) / crops.latent_var
        loss = (bpp + lam[rate] * mse).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            if parent is not None and os.getppid() != parent:
                raise SystemExit(f"training worker {rank}: the launching process {parent} is gone; stopping")
            _average_gradients(trained, world)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for average in (ema, ema_slow):
            if average is not None:
                average.update(model)
        step += 1
        r_np = rate.numpy()
        np.add.at(run["bpp"], r_np, bpp.detach().numpy())
        np.add.at(run["mse"], r_np, mse.detach().numpy())
        np.add.at(run["n"], r_np, 1)
        pbar.update(1)
        if step % 50 == 0:
            if world > 1:  # the history counts every worker's crops
                sums = torch.from_numpy(np.stack([run["bpp"], run["mse"], run["n"]]))
                dist.all_reduce(sums)
                run = dict(zip(("bpp", "mse", "n"), sums.numpy()))
            n = np.maximum(run["n"], 1)
            bpp_q, nmse_q = run["bpp"] / n, run["mse"] / n
            pbar.set_postfix(bpp=" ".join(f"{v:.3f}" for v in bpp_q), nmse=" ".join(f"{v:.3f}" for v in nmse_q))
            if lead:
                with hist_path.open("a") as fh:
                    fh.write(json.dumps({"step": step, "stage": stage, "bpp": bpp_q.round(5).tolist(),
                                         "nmse": nmse_q.round(5).tolist(), "sec": round(time.time() - t0, 1)}) + "\n")
            run = {"bpp": np.zeros(n_r), "mse": np.zeros(n_r), "n": np.zeros(n_r)}
        if step % cfg.checkpoint_every == 0 or step == total or step == cfg.stage1_steps:
            if world > 1:
                _check_in_step(model, step)
            if not lead:
                continue
            save_checkpoint(ckpt, {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "stage": stage,
                         "train": asdict(cfg), "codec": ccfg.to_dict(), "latent_var": crops.latent_var,
                         **({"ema": ema.state_dict(model)} if ema is not None else {}),
                         **({"ema_slow": ema_slow.state_dict(model)} if ema_slow is not None else {})})
    pbar.close()
    if world > 1:
        dist.destroy_process_group()
    return ckpt


@torch.no_grad()
def calibrate_table_offsets(codec, images: list[np.ndarray], *, search: int | None = None,
                            rdoq: float = 0.0) -> list[int]:
    """Shift each rate point's table offsets k_q (``table = clip(l - k_q)``; with channel gains, all of
    the rate point's channels together) for the encoder's lowest cost on training images. Returns the
    shifts applied (0 = the trained offsets were best); the model's offsets are updated.

    ``rdoq`` = 0 (plain rounding): symbols and reconstructions do not depend on k_q, so the cost is the
    real code length, searched over ±``search`` (default 48) at once. ``rdoq`` = λ > 0: the encoder's
    choice of symbols (``proto.symbols.quantize_y``) depends on the tables, so each candidate is coded as
    the encoder codes it and costs what that choice minimizes, summed: bits + Σ((y - ŷ)/Δ)²/λ; the shift
    moves one step at a time while the cost falls, at most ``search`` (default 3) steps."""
    rdoq = check_rdoq(rdoq, default=0.0)
    m = codec.model
    analyzed = [codec.analyze(img) for img in images]
    z_sym = [[codec.z_symbols(z, q) for _y, z in analyzed] for q in range(m.n_rates)]
    if rdoq > 0:
        return _calibrate_under_rdoq(codec, analyzed, z_sym, rdoq, 3 if search is None else search)
    search = 48 if search is None else search
    L = m.cfg.n_scales
    shifts = []
    new_k = m.rate_k.clone()
    for q in range(m.n_rates):
        k0 = m.rate_k[q].numpy().reshape(-1, 1, 1)  # (1,1,1) or (M,1,1)
        pairs = []  # (idx_raw - k0, sym) at every coded position
        for (y, _z), zs in zip(analyzed, z_sym[q], strict=True):
            sym, raw = codec.encode_symbols(y, zs, rate_point=q, tx_mask=np.ones(y.shape[1:], dtype=bool),
                                            raw_index=True)
            pairs.append(np.stack([np.broadcast_to(raw - k0, sym.shape).ravel(), sym.ravel()]))
        (d, sym), count = np.unique(np.concatenate(pairs, axis=1), axis=1, return_counts=True)
        cost = {shift: float(codec.y_tables.symbol_bits(sym, np.clip(d - shift, 0, L - 1)) @ count)
                for shift in range(-search, search + 1)}
        best = min(cost, key=lambda v: (cost[v], abs(v)))
        log.info("rate point %d: table offsets shifted by %+d", q, best)
        shifts.append(best)
        new_k[q] += best
    m.rate_k.copy_(new_k)
    return shifts


def encoder_cost(codec, analyzed: list[tuple[np.ndarray, np.ndarray]], z_sym: list[np.ndarray], *, rate_point: int,
                 rdoq: float) -> float:
    """What the encoder's choice of symbols with RDOQ λ ``rdoq`` minimizes, summed over whole frames at
    ``rate_point``: real bits of y + Σ((y - ŷ)/Δ)²/λ; ``analyzed``: ``codec.analyze`` of each frame,
    ``z_sym``: its z symbols at the rate point."""
    lam = check_rdoq(rdoq, default=0.0)
    if lam == 0:
        raise ValueError("encoder_cost needs an RDOQ λ > 0 (with plain rounding the cost is the code length)")
    m = codec.model
    delta = m.per_rate(m.rate_delta, torch.tensor([rate_point]))[0].numpy()  # (1|M,1,1)
    total = 0.0
    for (y, _z), zs in zip(analyzed, z_sym, strict=True):
        sym, tab, y_hat = codec.encode_symbols_y_hat(y, zs, rate_point=rate_point, rdoq=lam,
                                                     tx_mask=np.ones(y.shape[1:], dtype=bool))
        total += float(codec.y_tables.symbol_bits(sym, tab).sum()) + float((((y - y_hat) / delta) ** 2).sum()) / lam
    return total


def _calibrate_under_rdoq(codec, analyzed, z_sym, lam: float, search: int) -> list[int]:
    """:func:`calibrate_table_offsets` for an encoder that codes with RDOQ λ ``lam``."""
    m = codec.model
    shifts = []
    for q in range(m.n_rates):
        k0 = m.rate_k[q].clone()

        def cost(shift: int, q: int = q, k0: torch.Tensor = k0) -> float:
            m.rate_k[q] = k0 + shift
            return encoder_cost(codec, analyzed, z_sym[q], rate_point=q, rdoq=lam)

        costs = {0: cost(0)}
        for direction in (1, -1):
            shift = direction
            while abs(shift) <= search:
                costs[shift] = cost(shift)
                if costs[shift] >= costs[shift - direction]:
                    break
                shift += direction
        best = min(costs, key=lambda v: (costs[v], abs(v)))
        m.rate_k[q] = k0 + best
        log.info("rate point %d: table offsets shifted by %+d (RDOQ λ %g: cost %+.2f %%)", q, best, lam,
                 100 * (costs[best] / costs[0] - 1))
        shifts.append(best)
    return shifts


def calibration_images(n: int = 8, size: int = 512) -> list[np.ndarray]:
    """Center crops of training images (photos and vtest frames not divisible by 8)."""
    srcs = training_sources()
    if not srcs:
        return []
    pick = [srcs[i] for i in np.linspace(0, len(srcs) - 1, n).astype(int)]
    out = []
    for _name, path, frame in pick:
        rgb = _read_rgb(path, frame)
        h, w = rgb.shape[:2]
        s = min(size, h, w) // 64 * 64
        y0, x0 = (h - s) // 2, (w - s) // 2
        out.append(np.ascontiguousarray(rgb[y0 : y0 + s, x0 : x0 + s]))
    return out
