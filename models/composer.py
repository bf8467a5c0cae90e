"""Semantic composition in the cloud: the codec's decoded latent ẑ_c becomes a frame.

Two composers behind one interface (:class:`Composer`), picked by :func:`make_composer`:

- ``none`` (:class:`LatentDecoderComposer`, the embedded default): the codec latent space's own decoder,
  frame for frame what ``LatentCodec.latent_to_frame`` gives.
- ``controlnet`` (:class:`ControlNetComposer`, the paper profile, DISCOVER §3.3): ẑ_c conditions a
  ControlNet on Stable Diffusion 2.1-base, which composes the whole frame from the transmitted ROIs
  and the coarse prior, guided by a caption built from the frame's transmitted labels (SLIM).

::

    packet ─► LatentCodec.decode_latent ─► ẑ_c (C_c, h_c, w_c), mask (rows, cols) on the y grid
                                            │
       none ────────────────────────────────┼─► codec latent space decoder ─► frame (H, W, 3) uint8
                                            │
       controlnet                           ▼
        labels ─► caption_for ─► "a photo of a car, two persons" ─► CLIP text encoder ─► c_text
                                            │                         (cached per caption)
        [ẑ_c, mask] ─► regrid to the diffusion latent grid (area down / bilinear up, mask nearest)
                    ─► adapter (3x3 convs, zero-initialised output) ─► replaces the ControlNet's
                       controlnet_cond_embedding: added to conv_in(z_t) ─► ControlNet residuals
                                            │
        z_T: noise from torch.Generator(seed_for(stream_id))          (start_strength = 1), or
             ẑ_c in the diffusion space, noised to timestep t_s      (start_strength = s < 1)
                                            ▼
        for t in the scheduler's steps (DPM-Solver++ 2M, 8 for machines / 50 for people):
            z_{t-1} = step(UNet(z_t, t, c_text, + ControlNet residuals))      one call per batch
                                            ▼
        z_0 ─► keep_roi: m * ẑ_c + (1 - m) * z_0  (same latent space; else pasted in pixels)
            ─► SD VAE decoder ─► crop ─► frame (H, W, 3) uint8

Design choices:

- **Adapter.** The ControlNet adds ``controlnet_cond_embedding(cond)`` to ``conv_in(z_t)``, so the
  embedding must produce ``block_out_channels[0]`` channels on the diffusion latent grid. The stock
  embedding downsamples a pixel image by 8; ẑ_c is already a latent, on the codec's grid (``pixels:4``
  = 48 channels at 1/4 for ``elic-lite``, 4 channels at 1/8 for the paper's SD-VAE target). The
  composer resamples ``[ẑ_c, mask]`` to the diffusion grid (no parameters: ``area`` when the codec grid
  is finer, ``bilinear`` when coarser, the mask ``nearest``/``area``), and :class:`LatentAdapter`
  (conv3x3-SiLU-conv3x3-SiLU-zero conv3x3) maps its ``C_c + 1`` channels to the ControlNet's. It is
  installed in place of ``controlnet.controlnet_cond_embedding``, so diffusers' ``forward`` runs
  unchanged; it is saved beside the ControlNet as ``adapter.safetensors``.
- **Scheduler.** DPM-Solver++ (2M, diffusers ``DPMSolverMultistepScheduler``): at 8-20 steps it gets
  the quality DDIM needs 2-3x the steps for, it is deterministic (no noise is injected per step, so
  the seed fixes the output), and it supports starting mid-schedule. DDIM is available
  (``load_components(..., scheduler="ddim")``). Each group of requests gets a fresh copy of the
  scheduler (multistep state), so concurrent ``compose`` calls do not share state.
- **Seeds.** ``seed_for(stream_id)`` is a stable hash (SHA-256): every frame of a stream starts from
  the same noise, so consecutive frames do not flicker; each request draws its noise from its own
  CPU generator, so a batch gives the same noise as the requests one by one.
- **Partial noise** (``start_strength`` / ``ComposeRequest.strength`` s < 1, img2img): the schedule of
  ``steps`` steps is set, and only its last ``max(1, round(s * steps))`` are run, starting from ẑ_c
  (in the diffusion space) noised to that step's level: s = 0.5 halves the UNet calls. ẑ_c in the
  diffusion space: when the codec's latent space *is* the diffusion VAE's (the paper profile:
  ``codec_space=None``, or an ``SDVAE`` with the same weights) ẑ_c is used directly; otherwise the
  codec's decoded frame is encoded with the diffusion VAE's encoder (one extra decode + encode).
- **keep_roi** (default on): after sampling, the transmitted cells are pasted back so analytics see
  exactly what the codec decoded in the ROIs: in latent space (``m * ẑ_c + (1 - m) * z_0``, m the
  mask on the diffusion grid, fractional on boundary cells) when the spaces are the same, else in
  pixels (the codec's decoded frame inside the mask). The VAE decoder's receptive field smooths the
  seam. Off, the output relies on the trained ControlNet alone (the paper's setting).
- **Batching.** Requests are grouped by (steps, strength, diffusion grid size, keep_roi) and each
  group runs one ControlNet + one UNet call per step (``max_batch`` per call).

Training (DISCOVER eq. 4, middle term): :meth:`ControlNetComposer.diffusion_loss` is
``|| eps - eps_theta(z_t, t, C(ẑ_c)) ||^2`` through the same conditioning path (adapter and ControlNet
trainable, UNet and VAE frozen by the caller), so the codec's decoder and the control module can be
trained with what the cloud runs.

torch, diffusers and transformers are imported on first use; the module itself (``caption_for``,
``seed_for``, ``ComposeRequest``, ``COMPOSER_KINDS``, ``make_composer``'s validation) needs numpy only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "COMPOSER_KINDS",
    "DEFAULT_SD",
    "ADAPTER_FILE",
    "MACHINE_STEPS",
    "HUMAN_STEPS",
    "ComposeRequest",
    "Composition",
    "Composer",
    "LatentDecoderComposer",
    "ControlNetComposer",
    "caption_for",
    "seed_for",
    "tiny_clip_tokenizer",
    "tiny_components",
    "load_components",
    "save_components",
    "make_composer",
]  # and LatentAdapter, an nn.Module built on first access (module __getattr__), so importing needs no torch

COMPOSER_KINDS: tuple[str, ...] = ("none", "controlnet")
DEFAULT_SD = "stabilityai/stable-diffusion-2-1-base"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_FORMAT = "latentcast-adapter-1"
MACHINE_STEPS = 8  # DISCOVER: sampling steps for machine vision consumers
HUMAN_STEPS = 50  # ... and for human perception
MASK_STRIDE = 16  # pixels per transmitted-mask cell: the codec's y grid (latentcast.proto.grid)
SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

_TORCH_HINT = 'the composer needs PyTorch: pip install "latentcast[cloud]"'
_SD_HINT = 'the controlnet composer needs diffusers and transformers: pip install "latentcast[sd]" transformers'
_SD_GET = ("download it beforehand, e.g. `hf download stabilityai/stable-diffusion-2-1-base --local-dir DIR "
           "--include 'unet/*' 'vae/*' 'text_encoder/*' 'tokenizer/*' 'scheduler/*'`, and pass DIR (composer.sd)")
_CN_GET = ("train the ControlNet and its adapter (DISCOVER eq. 4: ControlNetComposer.diffusion_loss) and save them "
           "with save_components(..., controlnet_dir=DIR), or copy a trained folder (config.json, "
           f"diffusion_pytorch_model.safetensors, {ADAPTER_FILE}) and pass DIR (composer.controlnet)")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is installed wherever models/ runs
        raise ImportError(_TORCH_HINT) from e
    return torch


def _diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(_SD_HINT) from e
    return diffusers


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(_SD_HINT) from e
    return transformers


# --------------------------------------------------------------------------- captions and seeds

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve")
_IRREGULAR = {"man": "men", "woman": "women", "child": "children", "person": "persons", "mouse": "mice",
              "goose": "geese", "foot": "feet", "tooth": "teeth", "knife": "knives", "leaf": "leaves",
              "shelf": "shelves", "wife": "wives", "life": "lives", "wolf": "wolves", "sheep": "sheep",
              "deer": "deer", "fish": "fish", "aircraft": "aircraft", "people": "people", "glasses": "glasses",
              "scissors": "scissors", "skis": "skis"}


def _plural(noun: str) -> str:
    """Simple English plural of the last word of ``noun`` ("traffic light" -> "traffic lights")."""
    head, _, last = noun.rpartition(" ")
    if last in _IRREGULAR:
        p = _IRREGULAR[last]
    elif re.search(r"(s|x|z|ch|sh)$", last):
        p = last + "es"
    elif re.search(r"[^aeiou]y$", last):
        p = last[:-1] + "ies"
    else:
        p = last + "s"
    return f"{head} {p}" if head else p


def _count_phrase(label: str, n: int) -> str:
    if n == 1:
        return f"{'an' if label[0] in 'aeiou' else 'a'} {label}"
    count = _NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else str(n)
    return f"{count} {_plural(label)}"


def caption_for(labels: Sequence[str], *, prefix: str = "a photo of", empty: str = "a photo") -> str:
    """The ROI-focused caption of a frame from its transmitted labels (one entry per ROI).

    Labels are normalised (lower case, ``_`` to space, blanks dropped), counted, and listed in
    alphabetical order, so the caption does not change when the ROI order does:
    ``["person", "car", "person"]`` -> ``"a photo of a car, two persons"``. No labels -> ``empty``.
    """
    norm = [re.sub(r"\s+", " ", str(x).replace("_", " ")).strip().lower() for x in labels]
    counts = Counter(x for x in norm if x)
    if not counts:
        return empty
    return f"{prefix} " + ", ".join(_count_phrase(lab, counts[lab]) for lab in sorted(counts))


def seed_for(stream_id: str, base: int = 0) -> int:
    """A stable 63-bit seed for a stream (SHA-256 of ``base`` and the id): the same on every machine
    and run, so every frame of a stream starts from the same noise."""
    digest = hashlib.sha256(f"latentcast-composer\0{int(base)}\0{stream_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------- requests and results


@dataclass
class ComposeRequest:
    """One frame to compose.

    ``latent``: ẑ_c, (C, h, w) float (torch tensor or numpy) in the codec's latent space
    (``Reconstruction.latent``). ``mask``: the transmitted cells, bool (rows, cols), either on the
    latent grid or on the codec's y grid (``Reconstruction.mask``, ``mask_stride`` pixels per cell,
    default 16); None = everything transmitted. ``labels``: the frame's transmitted ROI labels
    (caption). ``stream_id``: the per-stream seed (use the camera id, stable across reconnects).
    ``steps``, ``strength``, ``keep_roi``: None = the composer's defaults. ``seed`` / ``caption``
    override ``seed_for(stream_id)`` / ``caption_for(labels)``.
    """

    latent: Any
    mask: Any
    width: int
    height: int
    labels: Sequence[str] = ()
    stream_id: str = ""
    steps: int | None = None
    strength: float | None = None
    keep_roi: bool | None = None
    mask_stride: int | None = None
    seed: int | None = None
    caption: str | None = None

    @classmethod
    def from_reconstruction(cls, rec: Any, **kw: Any) -> ComposeRequest:
        """From a ``models.codec.Reconstruction`` (latent, mask, the header's frame size); ``kw`` sets the rest."""
        hd = rec.packet.header
        kw.setdefault("mask_stride", MASK_STRIDE)  # Reconstruction.mask is on the codec's y grid
        return cls(latent=rec.latent, mask=rec.mask, width=int(hd.width), height=int(hd.height), **kw)


@dataclass
class Composition:
    """A composed frame with what made it (``compose(..., return_latents=True)``)."""

    frame: np.ndarray  # (H, W, 3) uint8 RGB
    latent: Any  # torch (C, h, w) float32 on the CPU: the output latent (diffusion space; none: ẑ_c itself)
    caption: str | None = None  # controlnet: the caption used
    seed: int | None = None  # controlnet: the noise seed used
    steps: int = 0  # UNet evaluations actually run (0 for none)
    meta: dict = field(default_factory=dict)


def _as_latent(x: Any, i: int):
    torch = _torch()
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"compose request {i}: latent must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3 or min(x.shape) < 1:
        raise ValueError(f"compose request {i}: latent must be (C, h, w), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"compose request {i}: latent must be floating point, got {x.dtype}")
    return x


def _check_size(r: ComposeRequest, i: int) -> None:
    for name in ("width", "height"):
        v = getattr(r, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"compose request {i}: {name} must be an integer >= 1, got {v!r}")


class Composer(ABC):
    """ẑ_c -> frames. ``compose`` takes a batch (any mix of streams and sizes) and returns one
    (H, W, 3) uint8 RGB frame per request, in order (or :class:`Composition` objects with
    ``return_latents=True``); ``describe`` says what runs (for logs, health and results files)."""

    kind: str = ""

    @abstractmethod
    def compose(self, requests: Sequence[ComposeRequest], *, return_latents: bool = False) -> list:
        ...

    @abstractmethod
    def describe(self) -> dict:
        ...

    def compose_one(self, request: ComposeRequest) -> np.ndarray:
        return self.compose([request])[0]


def _to_uint8(img) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8, rounding as ``LatentCodec.latent_to_frame``."""
    return (img.clamp(0, 1).permute(1, 2, 0).float().cpu().numpy() * 255 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------- none


class LatentDecoderComposer(Composer):
    """Direct latent decode: the codec latent space's decoder, as ``LatentCodec.latent_to_frame``.

    ``latent_space``: a ``LatentSpace`` or anything with a ``latent_space()`` method (a ``LatentCodec``).
    Requests of the same latent shape are decoded as one batch (``batch=False``: one by one, for
    decoders whose batched float results must match single-frame ones bit for bit; pixel spaces are
    exact either way).
    """

    kind = "none"

    def __init__(self, latent_space: Any, *, batch: bool = True) -> None:
        if hasattr(latent_space, "latent_space") and callable(latent_space.latent_space):
            latent_space = latent_space.latent_space()
        for attr in ("decode", "channels", "factor"):
            if not hasattr(latent_space, attr):
                raise TypeError(
                    f"LatentDecoderComposer needs a LatentSpace (or a LatentCodec), got {type(latent_space).__name__}"
                )
        self.space = latent_space
        self.batch = bool(batch)

    def describe(self) -> dict:
        return {"kind": self.kind, "latent_space": getattr(self.space, "name", type(self.space).__name__),
                "channels": int(self.space.channels), "factor": int(self.space.factor), "batch": self.batch}

    def compose(self, requests: Sequence[ComposeRequest], *, return_latents: bool = False) -> list:
        torch = _torch()
        lats = []
        for i, r in enumerate(requests):
            _check_size(r, i)
            x = _as_latent(r.latent, i)
            if x.shape[0] != self.space.channels:
                raise ValueError(f"compose request {i}: latent has {x.shape[0]} channels, the latent space "
                                 f"{getattr(self.space, 'name', '?')} has {self.space.channels}")
            lats.append(x.to(torch.float32))
        groups: dict[tuple, list[int]] = {}
        for i, x in enumerate(lats):
            groups.setdefault(tuple(x.shape) if self.batch else (i,), []).append(i)
        frames: list[np.ndarray | None] = [None] * len(lats)
        with torch.no_grad():
            for idx in groups.values():
                img = self.space.decode(torch.stack([lats[i] for i in idx]))
                for j, i in enumerate(idx):
                    r = requests[i]
                    frames[i] = _to_uint8(img[j, :, : r.height, : r.width])
        if return_latents:
            return [Composition(frame=f, latent=lats[i].detach().cpu()) for i, f in enumerate(frames)]
        return frames


# --------------------------------------------------------------------------- adapter

_ADAPTER_CLS = None


def _adapter_cls():
    """Build the :class:`LatentAdapter` class on first use (torch imported lazily)."""
    global _ADAPTER_CLS
    if _ADAPTER_CLS is not None:
        return _ADAPTER_CLS
    torch = _torch()
    nn = torch.nn

    class LatentAdapter(nn.Module):
        """``[ẑ_c, mask]`` on the diffusion latent grid (``in_channels`` = C_c + 1) -> the ControlNet's
        conditioning embedding (``out_channels`` = its ``block_out_channels[0]``).

        conv3x3 -> SiLU -> ``depth`` x (conv3x3 -> SiLU) -> conv3x3, the last one zero-initialised
        (``zero_init``) like ControlNet's zero convolutions, so an untrained adapter adds nothing.
        """

        def __init__(self, in_channels: int, out_channels: int, *, hidden: int = 64, depth: int = 1,
                     zero_init: bool = True) -> None:
            super().__init__()
            if min(in_channels, out_channels, hidden) < 1 or depth < 0:
                raise ValueError(f"bad adapter shape: in {in_channels}, out {out_channels}, hidden {hidden}, "
                                 f"depth {depth}")
            self.in_channels, self.out_channels, self.hidden, self.depth = in_channels, out_channels, hidden, depth
            self.conv_in = nn.Conv2d(in_channels, hidden, 3, padding=1)
            self.blocks = nn.ModuleList(nn.Conv2d(hidden, hidden, 3, padding=1) for _ in range(depth))
            self.conv_out = nn.Conv2d(hidden, out_channels, 3, padding=1)
            if zero_init:
                nn.init.zeros_(self.conv_out.weight)
                nn.init.zeros_(self.conv_out.bias)

        @property
        def config(self) -> dict:
            return {"in_channels": self.in_channels, "out_channels": self.out_channels, "hidden": self.hidden,
                    "depth": self.depth}

        def forward(self, cond):
            x = nn.functional.silu(self.conv_in(cond))
            for b in self.blocks:
                x = nn.functional.silu(b(x))
            return self.conv_out(x)

        def save(self, path: str | Path) -> None:
            from safetensors.torch import save_file

            sd = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
            md = {"format": ADAPTER_FORMAT, "config": json.dumps(self.config),
                  "input": "codec latent channels, then the transmitted mask (1 = transmitted)"}
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            save_file(sd, str(path), metadata=md)

        @classmethod
        def load(cls, path: str | Path) -> LatentAdapter:
            from safetensors import safe_open

            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"ControlNet adapter {path} not found: {_CN_GET}")
            with safe_open(str(path), framework="pt") as f:
                md = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
            if md.get("format") != ADAPTER_FORMAT:
                raise ValueError(f"{path} is not a latentcast adapter file (format {md.get('format')!r})")
            model = cls(**json.loads(md["config"]), zero_init=False)
            model.load_state_dict(sd)
            return model.eval()

    LatentAdapter.__qualname__ = "LatentAdapter"
    LatentAdapter.__module__ = __name__
    _ADAPTER_CLS = LatentAdapter
    return LatentAdapter


def __getattr__(name: str):  # PEP 562: ``from latentcast.models.composer import LatentAdapter``
    if name == "LatentAdapter":
        return _adapter_cls()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- grids


def _regrid(x, src_px: float, dst_px: float, out_hw: tuple[int, int], *, mask: bool = False):
    """Resample (N, C, h, w) from a grid of ``src_px`` pixels per cell to one of ``dst_px``, both
    anchored at the frame's top-left corner, to exactly ``out_hw`` cells (replicate-padded or cropped).
    Finer -> coarser: ``area`` (averages; a mask becomes the fraction of transmitted pixels);
    coarser -> finer: ``bilinear`` (latents) or ``nearest`` (masks)."""
    F = _torch().nn.functional
    oh, ow = out_hw
    need_h, need_w = math.ceil(oh * dst_px / src_px), math.ceil(ow * dst_px / src_px)
    x = x[..., :need_h, :need_w]
    ph, pw = need_h - x.shape[-2], need_w - x.shape[-1]
    if ph > 0 or pw > 0:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    if src_px != dst_px:
        size = (max(oh, round(need_h * src_px / dst_px)), max(ow, round(need_w * src_px / dst_px)))
        if src_px < dst_px:
            x = F.interpolate(x, size=size, mode="area")
        elif mask:
            x = F.interpolate(x, size=size, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x[..., :oh, :ow]


# --------------------------------------------------------------------------- controlnet


def _module_device(m: Any):
    """The device of a module's first parameter (CPU for parameterless modules such as PixelSpace)."""
    torch = _torch()
    for p in m.parameters():
        return p.device
    return torch.device("cpu")


def _same_space(codec_space: Any, space: Any) -> bool:
    """True when ẑ_c already is a latent of the diffusion VAE (``codec_space`` None, the same object,
    or an ``SDVAE`` with the same configuration and identical first encoder/decoder convolutions)."""
    if codec_space is None or codec_space is space:
        return True
    a, b = getattr(codec_space, "vae", None), getattr(space, "vae", None)
    if a is None or b is None:
        return False
    if a is b:
        return True
    keys = ("channels", "factor", "scaling_factor", "shift_factor")
    if any(getattr(codec_space, k, None) != getattr(space, k, None) for k in keys):
        return False
    try:
        pairs = (
            (a.encoder.conv_in.weight, b.encoder.conv_in.weight),
            (a.decoder.conv_in.weight, b.decoder.conv_in.weight),
        )
        torch = _torch()
        return all(p.shape == q.shape and torch.equal(p.detach().float().cpu(), q.detach().float().cpu())
                   for p, q in pairs)
    except AttributeError:
        return False


class ControlNetComposer(Composer):
    """ControlNet diffusion decoding of partial latents (DISCOVER §3.3), batched across streams.

    Components (as :func:`tiny_components` / :func:`load_components` return them): ``unet``
    (``UNet2DConditionModel``), ``controlnet`` (``ControlNetModel``; its conditioning embedding is
    replaced by ``adapter`` in place), ``scheduler``, ``vae`` (``AutoencoderKL`` or an ``SDVAE``: the
    diffusion latent space), ``text_encoder`` + ``tokenizer`` (CLIP), ``adapter`` (:class:`LatentAdapter`;
    None = a fresh, zero-initialised one: the control then adds nothing until trained).

    ``codec_space``: the codec's latent space (``LatentCodec.latent_space()``); None means ẑ_c is in
    the diffusion VAE's space (the paper profile). Defaults: ``default_steps`` (8, machines),
    ``start_strength`` (1 = pure noise), ``keep_roi`` (True), ``guidance_scale`` (1 = no
    classifier-free guidance, one UNet pass per step), ``conditioning_scale`` (ControlNet residual
    weight), ``seed`` (mixed into every stream's seed), ``use_caption`` (False: the generic caption).
    """

    kind = "controlnet"

    def __init__(self, *, unet: Any, controlnet: Any, scheduler: Any, vae: Any, text_encoder: Any, tokenizer: Any,
                 adapter: Any = None, codec_space: Any = None, default_steps: int = MACHINE_STEPS,
                 start_strength: float = 1.0, keep_roi: bool = True, guidance_scale: float = 1.0,
                 conditioning_scale: float = 1.0, seed: int = 0, use_caption: bool = True,
                 caption_prefix: str = "a photo of", negative_caption: str = "", max_batch: int = 8,
                 caption_cache: int = 256, device: Any = None, dtype: Any = None) -> None:
        torch = _torch()
        from .latent_spaces import SDVAE, LatentSpace

        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype if dtype is not None else torch.float32
        self.space = vae if isinstance(vae, LatentSpace) else SDVAE(vae, name="sd-vae")
        self.codec_space = codec_space
        self.same_space = _same_space(codec_space, self.space)
        if not self.same_space and codec_space is None:  # pragma: no cover - same_space is True then
            raise ValueError("codec_space is needed when ẑ_c is not in the diffusion space")
        codec_channels = self.space.channels if codec_space is None else int(codec_space.channels)
        self.codec_factor = self.space.factor if codec_space is None else int(codec_space.factor)
        self.unet, self.controlnet, self.scheduler = unet, controlnet, scheduler
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.unet_factor = 2 ** (len(unet.config.block_out_channels) - 1)
        emb_channels = int(controlnet.config.block_out_channels[0])
        if adapter is None:
            log.warning("controlnet composer: no trained adapter; a zero-initialised one adds no control")
            adapter = _adapter_cls()(codec_channels + 1, emb_channels)
        if (
            getattr(adapter, "in_channels", None) != codec_channels + 1
            or getattr(adapter, "out_channels", None) != emb_channels
        ):
            raise ValueError(
                f"adapter maps {getattr(adapter, 'in_channels', '?')} -> {getattr(adapter, 'out_channels', '?')} "
                f"channels; this composer needs {codec_channels + 1} (codec latent {codec_channels} + mask) -> "
                f"{emb_channels} (the ControlNet's block_out_channels[0]): the adapter was trained for another codec")
        self.adapter = adapter
        controlnet.controlnet_cond_embedding = adapter  # diffusers' forward now embeds [ẑ_c, mask] with it
        for m in (unet, controlnet, self.space, text_encoder):
            first = next(m.parameters(), None)
            if first is not None and (first.device != self.device or first.dtype != self.dtype):
                m.to(device=self.device, dtype=self.dtype)
            m.eval().requires_grad_(False)
        self._check_defaults(default_steps, start_strength)
        self.default_steps, self.start_strength = int(default_steps), float(start_strength)
        self.keep_roi, self.guidance_scale = bool(keep_roi), float(guidance_scale)
        self.conditioning_scale, self.seed = float(conditioning_scale), int(seed)
        self.use_caption, self.caption_prefix, self.negative_caption = (
            bool(use_caption),
            caption_prefix,
            negative_caption,
        )
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch, self.caption_cache = int(max_batch), int(caption_cache)
        self._embeds: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _check_defaults(steps: Any, strength: Any, where: str = "composer") -> None:
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"{where}: steps must be an integer >= 1, got {steps!r}")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
            raise ValueError(f"{where}: strength must be in (0, 1] (1 = start from pure noise), got {strength!r}")

    # ------------------------------------------------------------------ description
    def describe(self) -> dict:
        def params(m: Any) -> int:
            return int(sum(p.numel() for p in m.parameters()))

        return {
            "kind": self.kind,
            "scheduler": type(self.scheduler).__name__,
            "prediction_type": self.scheduler.config.get("prediction_type", "epsilon"),
            "default_steps": self.default_steps,
            "start_strength": self.start_strength,
            "keep_roi": self.keep_roi,
            "guidance_scale": self.guidance_scale,
            "conditioning_scale": self.conditioning_scale,
            "use_caption": self.use_caption,
            "same_space": self.same_space,
            "codec_space": getattr(self.codec_space, "name", None) if self.codec_space is not None else self.space.name,
            "diffusion_space": {"name": self.space.name, "channels": self.space.channels, "factor": self.space.factor},
            "unet": {"block_out_channels": list(self.unet.config.block_out_channels), "params": params(self.unet)},
            "controlnet_params": params(self.controlnet),
            "adapter": dict(self.adapter.config),
            "text_encoder_params": params(self.text_encoder),
            "vae_params": params(self.space),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "max_batch": self.max_batch,
        }

    # ------------------------------------------------------------------ pieces
    def caption(self, r: ComposeRequest) -> str:
        if r.caption is not None:
            return r.caption
        return caption_for(r.labels if self.use_caption else (), prefix=self.caption_prefix)

    def text_embeds(self, caption: str):
        """CLIP embeddings (1, L, D) of a caption, cached (LRU, ``caption_cache`` entries)."""
        torch = _torch()
        with self._lock:
            hit = self._embeds.get(caption)
            if hit is not None:
                self._embeds.move_to_end(caption)
                return hit
        tok = self.tokenizer(caption, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        with torch.no_grad():
            emb = self.text_encoder(tok.input_ids.to(self.device))[0].to(self.dtype)
        with self._lock:
            self._embeds[caption] = emb
            while len(self._embeds) > self.caption_cache:
                self._embeds.popitem(last=False)
        return emb

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """Diffusion latent grid (h, w) for a frame: ceil(H / f_vae) rounded up to the UNet's multiple."""
        f, m = self.space.factor, self.unet_factor
        return math.ceil(math.ceil(height / f) / m) * m, math.ceil(math.ceil(width / f) / m) * m

    def _mask_stride(self, r: ComposeRequest, mask_hw: tuple[int, int], lat_hw: tuple[int, int], i: int) -> int:
        """Pixels per mask cell: ``mask_stride`` if given, else 16 when the mask has the shape of the
        codec's y grid for the frame (``Reconstruction.mask``), the codec latent factor when it has
        the latent's shape; any other shape is an error."""
        from latentcast.proto.grid import grid_shape

        if r.mask_stride is not None:
            if isinstance(r.mask_stride, bool) or not isinstance(r.mask_stride, (int, np.integer)) or r.mask_stride < 1:
                raise ValueError(f"compose request {i}: mask_stride must be an integer >= 1, got {r.mask_stride!r}")
            return int(r.mask_stride)
        y_grid = grid_shape(int(r.width), int(r.height), stride=MASK_STRIDE)
        if tuple(mask_hw) == tuple(y_grid):
            return MASK_STRIDE
        if tuple(mask_hw) == tuple(lat_hw):
            return self.codec_factor
        raise ValueError(f"compose request {i}: mask shape {tuple(mask_hw)} is neither the codec's y grid "
                         f"{tuple(y_grid)} ({MASK_STRIDE}-pixel cells) nor the latent grid {tuple(lat_hw)}; "
                         "pass mask_stride")

    def _mask(self, r: ComposeRequest, lat, i: int):
        """The request's mask as (1, 1, rows, cols) float and its stride in pixels."""
        torch = _torch()
        if r.mask is None:
            return torch.ones(1, 1, *lat.shape[-2:]), self.codec_factor
        m = r.mask
        m = torch.from_numpy(np.ascontiguousarray(m)) if isinstance(m, np.ndarray) else torch.as_tensor(m)
        if m.dim() != 2:
            raise ValueError(f"compose request {i}: mask must be (rows, cols), got shape {tuple(m.shape)}")
        stride = self._mask_stride(r, tuple(m.shape), tuple(lat.shape[-2:]), i)
        return m.to(torch.float32)[None, None], stride

    def _condition(self, lat, mask, stride: int, hw: tuple[int, int]):
        """[ẑ_c, mask] on the diffusion grid: (N, C_c + 1, h, w) (differentiable in ``lat``)."""
        f = self.space.factor
        lat_d = _regrid(lat, self.codec_factor, f, hw)
        m_d = _regrid(mask.to(lat.dtype), stride, f, hw, mask=True)
        return _torch().cat([lat_d, m_d], dim=1)

    def _resolve(self, requests: Sequence[ComposeRequest]) -> list[dict]:
        jobs = []
        for i, r in enumerate(requests):
            _check_size(r, i)
            lat = _as_latent(r.latent, i).to(_torch().float32)
            want = self.space.channels if self.codec_space is None else self.codec_space.channels
            if lat.shape[0] != want:
                raise ValueError(f"compose request {i}: latent has {lat.shape[0]} channels, the codec latent space "
                                 f"has {want}")
            steps = self.default_steps if r.steps is None else r.steps
            strength = self.start_strength if r.strength is None else r.strength
            self._check_defaults(steps, strength, f"compose request {i}")
            mask, stride = self._mask(r, lat, i)
            seed = seed_for(r.stream_id, self.seed) if r.seed is None else int(r.seed)
            jobs.append({"i": i, "r": r, "lat": lat[None], "mask": mask, "stride": stride, "steps": int(steps),
                         "strength": float(strength), "seed": seed, "caption": self.caption(r),
                         "keep_roi": self.keep_roi if r.keep_roi is None else bool(r.keep_roi),
                         "hw": self.grid(int(r.width), int(r.height))})
        return jobs

    def _codec_frames(self, group: list[dict]):
        """The codec's decoded frames (N, 3, H_pad, W_pad) in [0, 1] at the diffusion grid's pixel size."""
        torch = _torch()
        out = []
        cdev = _module_device(self.codec_space)
        with torch.no_grad():
            for j in group:
                img = self.codec_space.decode(j["lat"].to(cdev)).to(self.device, torch.float32)
                hh, ww = j["hw"][0] * self.space.factor, j["hw"][1] * self.space.factor
                out.append(_regrid(img[:, :, : j["r"].height, : j["r"].width], 1, 1, (hh, ww)))
        return torch.cat(out)

    # ------------------------------------------------------------------ sampling
    def _run_group(self, group: list[dict]) -> list[Composition]:
        torch = _torch()
        dev, dt = self.device, self.dtype
        steps, strength, hw, keep_roi = group[0]["steps"], group[0]["strength"], group[0]["hw"], group[0]["keep_roi"]
        n = len(group)
        f = self.space.factor
        cond = torch.cat([self._condition(j["lat"], j["mask"], j["stride"], hw) for j in group]).to(dev, dt)
        emb = torch.cat([self.text_embeds(j["caption"]) for j in group])
        cfg = self.guidance_scale > 1.0
        if cfg:
            emb = torch.cat([self.text_embeds(self.negative_caption).expand(n, -1, -1), emb])
            cond = torch.cat([cond, cond])
        shape = (1, self.unet.config.in_channels, *hw)
        noise = torch.cat([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(j["seed"]),
                                       dtype=torch.float32) for j in group]).to(dev, dt)
        sched = type(self.scheduler).from_config(self.scheduler.config)
        sched.set_timesteps(steps, device=dev)
        timesteps = sched.timesteps
        need_codec_frames = (not self.same_space) and (strength < 1.0 or keep_roi)
        codec_frames = self._codec_frames(group) if need_codec_frames else None
        z_c = None
        if self.same_space and (strength < 1.0 or keep_roi):
            z_c = torch.cat([_regrid(j["lat"], f, f, hw) for j in group]).to(dev, dt)
        if strength < 1.0:
            run = min(steps, max(1, round(steps * strength)))
            t_start = (steps - run) * sched.order
            timesteps = timesteps[t_start:]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(t_start)
            init = z_c if self.same_space else self.space.encode(codec_frames.to(dev, dt))
            latents = sched.add_noise(init, noise, timesteps[:1].repeat(n))
        else:
            latents = noise * sched.init_noise_sigma
        for t in timesteps:
            x = torch.cat([latents, latents]) if cfg else latents
            x = sched.scale_model_input(x, t)
            down, mid = self.controlnet(x, t, encoder_hidden_states=emb, controlnet_cond=cond,
                                        conditioning_scale=self.conditioning_scale, return_dict=False)
            eps = self.unet(x, t, encoder_hidden_states=emb, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid, return_dict=False)[0]
            if cfg:
                u, c = eps.chunk(2)
                eps = u + self.guidance_scale * (c - u)
            latents = sched.step(eps, t, latents, return_dict=False)[0]
        if keep_roi and self.same_space:
            m = torch.cat([_regrid(j["mask"], j["stride"], f, hw, mask=True) for j in group]).to(dev, dt)
            latents = m * z_c + (1 - m) * latents
        images = self.space.decode(latents)
        out = []
        for k, j in enumerate(group):
            r = j["r"]
            img = images[k, :, : r.height, : r.width]
            if keep_roi and not self.same_space:
                m = _regrid(j["mask"], j["stride"], 1, (r.height, r.width), mask=True)[0].to(dev, dt)
                img = m * codec_frames[k, :, : r.height, : r.width].to(dev, dt) + (1 - m) * img.clamp(0, 1)
            lat_out = latents[k, :, : math.ceil(r.height / f), : math.ceil(r.width / f)].float().cpu()
            out.append(Composition(frame=_to_uint8(img), latent=lat_out, caption=j["caption"], seed=j["seed"],
                                   steps=len(timesteps),
                                   meta={"strength": strength, "keep_roi": keep_roi, "schedule_steps": steps}))
        return out

    def compose(self, requests: Sequence[ComposeRequest], *, return_latents: bool = False) -> list:
        torch = _torch()
        jobs = self._resolve(requests)
        groups: dict[tuple, list[dict]] = {}
        for j in jobs:
            groups.setdefault((j["steps"], j["strength"], j["hw"], j["keep_roi"]), []).append(j)
        results: list[Composition | None] = [None] * len(jobs)
        with torch.inference_mode():
            for group in groups.values():
                for s in range(0, len(group), self.max_batch):
                    chunk = group[s: s + self.max_batch]
                    for j, res in zip(chunk, self._run_group(chunk)):
                        results[j["i"]] = res
        if return_latents:
            return results
        return [c.frame for c in results]  # type: ignore[union-attr]

    # ------------------------------------------------------------------ training (eq. 4)
    def diffusion_loss(self, target, latent, mask=None, captions: Sequence[str] | None = None, *,
                       mask_stride: int | None = None, generator: Any = None):
        """DISCOVER eq. 4's diffusion term ``|| eps - eps_theta(z_t, t, C(ẑ_c)) ||^2``, averaged.

        ``target``: z_c = the diffusion VAE's latent of the original images, (N, C, h, w) with h, w
        multiples of the UNet's factor. ``latent``: ẑ_c (N, C_c, h_c, w_c) from the codec's decoder
        (gradients flow into it). ``mask``: (N, rows, cols) transmitted cells (None = all).
        Gradients reach the adapter and the ControlNet if they require grad; freeze the UNet, the VAE
        and the text encoder yourself (the composer loads them frozen). The caller adds the rate terms
        and ``|| z_c - ẑ_c ||^2``.
        """
        torch = _torch()
        F = torch.nn.functional
        diffusers = _diffusers()
        n, hw = target.shape[0], tuple(target.shape[-2:])
        if latent.shape[0] != n:
            raise ValueError(f"target has {n} items, latent {latent.shape[0]}")
        captions = list(captions) if captions is not None else [caption_for(())] * n
        ddpm = diffusers.DDPMScheduler.from_config(self.scheduler.config)
        t = torch.randint(0, ddpm.config.num_train_timesteps, (n,), generator=generator).to(self.device)
        noise = torch.randn(target.shape, generator=generator, dtype=torch.float32).to(self.device, target.dtype)
        z_t = ddpm.add_noise(target, noise, t)
        if mask is None:
            m, stride = torch.ones(n, 1, *latent.shape[-2:], device=latent.device), self.codec_factor
        else:
            m = torch.as_tensor(mask, device=latent.device).to(latent.dtype)[:, None]
            stride = mask_stride or (
                self.codec_factor if tuple(m.shape[-2:]) == tuple(latent.shape[-2:]) else MASK_STRIDE
            )
        cond = self._condition(latent, m, stride, hw)
        emb = torch.cat([self.text_embeds(c) for c in captions]).clone()  # cached ones may be inference tensors
        down, mid = self.controlnet(z_t, t, encoder_hidden_states=emb, controlnet_cond=cond,
                                    conditioning_scale=self.conditioning_scale, return_dict=False)
        pred = self.unet(z_t, t, encoder_hidden_states=emb, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]
        kind = ddpm.config.prediction_type
        goal = noise if kind == "epsilon" else ddpm.get_velocity(target, noise, t) if kind == "v_prediction" else target
        return F.mse_loss(pred.float(), goal.float())


# --------------------------------------------------------------------------- components


def _byte_chars() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: the 256 printable stand-ins for the bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def tiny_clip_tokenizer(model_max_length: int = 77) -> Any:
    """A CLIP tokenizer built offline: byte-level vocabulary (each byte, and each byte ending a word),
    no merges, so every caption gets distinct ids (< 514) without any download."""
    transformers = _transformers()
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = _byte_chars()
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def tiny_components(seed: int = 0, *, codec_channels: int = 4, adapter_hidden: int = 16) -> dict:
    """Tiny random components (no download), deterministic for a seed, like diffusers' test
    ``get_dummy_components``: UNet (32, 64) with cross-attention 32, ControlNet from it (zero convs
    given small random weights so the control path matters), AutoencoderKL with 4 latent channels at
    1/8 (4 blocks), a 2-layer CLIP text encoder with :func:`tiny_clip_tokenizer`, DPM-Solver++ with
    SD 2.1-base's noise schedule, and an adapter for ``codec_channels`` (+ mask) -> 32 channels."""
    torch = _torch()
    diffusers = _diffusers()
    transformers = _transformers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = diffusers.UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        controlnet = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
        for m in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            torch.nn.init.normal_(m.weight, std=0.05)
            torch.nn.init.zeros_(m.bias)
        adapter = _adapter_cls()(codec_channels + 1, 32, hidden=adapter_hidden, zero_init=False)
        vae = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4, norm_num_groups=4, sample_size=64)
        text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
            num_attention_heads=4, num_hidden_layers=2, layer_norm_eps=1e-5, vocab_size=1000,
            max_position_embeddings=77))
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", steps_offset=1, timestep_spacing="trailing")
    for m in (unet, controlnet, adapter, vae, text_encoder):
        m.eval().requires_grad_(False)
    return {"unet": unet, "controlnet": controlnet, "scheduler": scheduler, "vae": vae,
            "text_encoder": text_encoder, "tokenizer": tiny_clip_tokenizer(), "adapter": adapter}


def _scheduler_cls(name: str) -> Any:
    diffusers = _diffusers()
    table = {"dpm++": diffusers.DPMSolverMultistepScheduler, "ddim": diffusers.DDIMScheduler}
    if name not in table:
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(table)}")
    return table[name]


def _load_sd(sd: str, *, local_files_only: bool, torch_dtype: Any, scheduler: str) -> dict:
    diffusers = _diffusers()
    transformers = _transformers()
    p = Path(str(sd)).expanduser()
    if p.exists():
        if not p.is_dir():
            raise FileNotFoundError(f"Stable Diffusion weights {p}: a file, expected the pipeline folder "
                                    f"(with {', '.join(SD_SUBFOLDERS)}/)")
        for sub in SD_SUBFOLDERS:
            need = p / sub / ("tokenizer_config.json" if sub == "tokenizer" else
                              "scheduler_config.json" if sub == "scheduler" else "config.json")
            if not need.is_file():
                raise FileNotFoundError(f"Stable Diffusion weights: {need} is missing; {_SD_GET}")
        source = str(p)
    elif _HUB_ID.fullmatch(str(sd)):
        source = str(sd)
    else:
        raise FileNotFoundError(f"Stable Diffusion weights {str(sd)!r}: no such folder, and not a hub id "
                                f"(org/name); {_SD_GET}")
    kw: dict[str, Any] = {"local_files_only": local_files_only}
    mkw = dict(kw, **({"torch_dtype": torch_dtype} if torch_dtype is not None else {}))
    what = "unet"
    try:
        unet = diffusers.UNet2DConditionModel.from_pretrained(source, subfolder="unet", **mkw)
        what = "vae"
        vae = diffusers.AutoencoderKL.from_pretrained(source, subfolder="vae", **mkw)
        what = "text_encoder"
        text_encoder = transformers.CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **mkw)
        what = "tokenizer"
        tokenizer = transformers.CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
        what = "scheduler"
        sched = _scheduler_cls(scheduler).from_pretrained(source, subfolder="scheduler", **kw)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"Stable Diffusion weights {source!r}: {what} could not be loaded "
                                f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); "
                                f"{_SD_GET}") from e
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": sched}


def load_components(sd: str = DEFAULT_SD, controlnet: str | None = None, *, local_files_only: bool = True,
                    torch_dtype: Any = None, scheduler: str = "dpm++", codec_channels: int = 4) -> dict:
    """Stable Diffusion 2.1-base and the trained ControlNet + adapter, as components for
    :class:`ControlNetComposer`.

    ``sd``: a local pipeline folder (``unet/ vae/ text_encoder/ tokenizer/ scheduler/``) or a hub id
    (default ``stabilityai/stable-diffusion-2-1-base``; with ``local_files_only`` only the hub cache).
    ``controlnet``: a folder (or hub id) holding a diffusers ``ControlNetModel`` and
    ``adapter.safetensors`` (:func:`save_components`); None = an untrained ControlNet copied from the
    UNet with a zero adapter for ``codec_channels`` (composition then is caption-guided SD, plus
    keep_roi). ``scheduler``: ``"dpm++"`` (default) or ``"ddim"``, configured from SD's noise schedule.
    Anything missing raises ``FileNotFoundError`` naming it and how to get it.
    """
    diffusers = _diffusers()
    _scheduler_cls(scheduler)
    comps = _load_sd(sd, local_files_only=local_files_only, torch_dtype=torch_dtype, scheduler=scheduler)
    mkw: dict[str, Any] = {"local_files_only": local_files_only}
    if torch_dtype is not None:
        mkw["torch_dtype"] = torch_dtype
    Adapter = _adapter_cls()
    if controlnet is None:
        log.warning("no trained ControlNet given: using an untrained copy of the UNet encoder (zero control)")
        cn = diffusers.ControlNetModel.from_unet(comps["unet"])
        adapter = Adapter(codec_channels + 1, int(cn.config.block_out_channels[0]))
    else:
        p = Path(str(controlnet)).expanduser()
        if p.is_dir():
            for need in (p / "config.json", p / ADAPTER_FILE):
                if not need.is_file():
                    raise FileNotFoundError(f"trained ControlNet: {need} is missing; {_CN_GET}")
            try:
                cn = diffusers.ControlNetModel.from_pretrained(str(p), **mkw)
            except (OSError, ValueError) as e:
                raise FileNotFoundError(f"trained ControlNet {p}: weights could not be loaded ({e}); {_CN_GET}") from e
            adapter = Adapter.load(p / ADAPTER_FILE)
        elif p.exists() or not _HUB_ID.fullmatch(str(controlnet)):
            raise FileNotFoundError(f"trained ControlNet {str(controlnet)!r}: no such folder (and not a hub id); "
                                    f"{_CN_GET}")
        else:
            try:
                from huggingface_hub import hf_hub_download

                cn = diffusers.ControlNetModel.from_pretrained(str(controlnet), **mkw)
                adapter = Adapter.load(
                    hf_hub_download(str(controlnet), ADAPTER_FILE, local_files_only=local_files_only)
                )
            except (OSError, ValueError) as e:
                raise FileNotFoundError(
                    f"trained ControlNet {str(controlnet)!r} could not be loaded ({e}); {_CN_GET}"
                ) from e
    cn.eval().requires_grad_(False)
    adapter.eval().requires_grad_(False)
    comps.update(controlnet=cn, adapter=adapter)
    return comps


def save_components(components: Mapping[str, Any], sd_dir: str | Path | None = None,
                    controlnet_dir: str | Path | None = None) -> None:
    """Write components in the layout :func:`load_components` reads: ``sd_dir`` gets
    ``unet/ vae/ text_encoder/ tokenizer/ scheduler/``, ``controlnet_dir`` a diffusers ControlNet
    folder plus ``adapter.safetensors``. The ControlNet is saved with a placeholder (unused) stock
    conditioning embedding so the folder stays a valid ``ControlNetModel``."""
    diffusers = _diffusers()
    if sd_dir is not None:
        d = Path(sd_dir)
        vae = components["vae"]
        vae = getattr(vae, "vae", vae)
        for sub, m in (("unet", components["unet"]), ("vae", vae), ("text_encoder", components["text_encoder"]),
                       ("tokenizer", components["tokenizer"]), ("scheduler", components["scheduler"])):
            m.save_pretrained(str(d / sub))
    if controlnet_dir is not None:
        from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding

        cn, adapter = components["controlnet"], components["adapter"]
        if not isinstance(cn, diffusers.ControlNetModel):
            raise TypeError(f"components['controlnet'] is a {type(cn).__name__}, not a ControlNetModel")
        cfg = cn.config
        installed = cn.controlnet_cond_embedding
        cn.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            conditioning_embedding_channels=cfg.block_out_channels[0],
            block_out_channels=tuple(cfg.conditioning_embedding_out_channels),
            conditioning_channels=cfg.conditioning_channels)
        try:
            cn.save_pretrained(str(controlnet_dir))
        finally:
            cn.controlnet_cond_embedding = installed
        adapter.save(Path(controlnet_dir) / ADAPTER_FILE)


# --------------------------------------------------------------------------- factory


def make_composer(kind: str, **kw: Any) -> Composer:
    """A composer by kind.

    - ``"none"``: ``latent_space=`` a LatentSpace, or ``codec=`` a LatentCodec.
    - ``"controlnet"``: ``components=`` a dict (:func:`tiny_components` / :func:`load_components`), or
      ``sd=`` (folder, hub id, or ``"tiny"`` for :func:`tiny_components`), ``controlnet=`` (folder or
      None), ``local_files_only=`` (True), ``torch_dtype=``, ``scheduler=`` (``"dpm++"``), ``seed=``;
      ``codec=`` / ``codec_space=`` the codec's latent space (omit when ẑ_c is in the SD VAE's space);
      other keywords go to :class:`ControlNetComposer`.
    """
    k = str(kind).strip().lower()
    if k not in COMPOSER_KINDS:
        raise ValueError(f"unknown composer kind {kind!r}; valid kinds: {', '.join(COMPOSER_KINDS)}")
    codec = kw.pop("codec", None)
    if k == "none":
        space = kw.pop("latent_space", None) or codec
        if space is None:
            raise ValueError("composer 'none' needs latent_space= (a LatentSpace) or codec= (a LatentCodec)")
        return LatentDecoderComposer(space, **kw)
    codec_space = kw.pop("codec_space", None)
    if codec_space is None and codec is not None:
        codec_space = codec.latent_space()
    components = kw.pop("components", None)
    sd = kw.pop("sd", None)
    cn = kw.pop("controlnet", None)
    load_kw = {name: kw.pop(name) for name in ("local_files_only", "torch_dtype", "scheduler") if name in kw}
    codec_channels = int(codec_space.channels) if codec_space is not None else 4
    if components is None:
        if sd is None:
            raise ValueError("composer 'controlnet' needs components= or sd= (a Stable Diffusion folder, hub id, "
                             "or 'tiny')")
        if sd == "tiny":
            if cn:
                raise ValueError(f"sd 'tiny' builds random components and cannot take the trained ControlNet {cn!r}; "
                                 "pass the SD folder the training wrote beside it (latentcast train composer: "
                                 "<out>/sd) as sd")
            components = tiny_components(int(kw.get("seed", 0)), codec_channels=codec_channels)
        else:
            components = load_components(sd, cn, codec_channels=codec_channels, **load_kw)
    return ControlNetComposer(**dict(components), codec_space=codec_space, **kw)
