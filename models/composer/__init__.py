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

The package, one job per module:

- ``captions``: :func:`caption_for`, :func:`seed_for`.
- ``base``: ``COMPOSER_KINDS`` and the defaults, :class:`ComposeRequest`, :class:`Composition`, the
  :class:`Composer` interface, :func:`make_composer`.
- ``latent_decoder``: :class:`LatentDecoderComposer` (``none``).
- ``adapter``: :class:`LatentAdapter` and the grid resampling.
- ``controlnet``: :class:`ControlNetComposer`, the sampler and the training loss.
- ``loading``: :func:`load_components`, :func:`save_components`, :func:`tiny_components`.

Importing the package needs numpy only (``captions``, ``base`` and ``latent_decoder``; the cloud's
config reads ``COMPOSER_KINDS`` without torch). The torch, diffusers and transformers modules
(``adapter``, ``controlnet``, ``loading``) are imported when one of their names is first used, as
diffusers' lazy modules do, and say what to install when a package is missing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .base import (
    ADAPTER_FILE,
    COMPOSER_KINDS,
    DEFAULT_SD,
    HUMAN_STEPS,
    MACHINE_STEPS,
    MASK_STRIDE,
    Composer,
    ComposeRequest,
    Composition,
    make_composer,
)
from .captions import caption_for, seed_for
from .latent_decoder import LatentDecoderComposer

if TYPE_CHECKING:  # the names the lazy table below imports on first use
    from .adapter import LatentAdapter
    from .controlnet import ControlNetComposer
    from .loading import load_components, save_components, tiny_clip_tokenizer, tiny_components

_LAZY = {  # public name -> the submodule that defines it (imports torch / diffusers)
    "LatentAdapter": "adapter",
    "ControlNetComposer": "controlnet",
    "load_components": "loading",
    "save_components": "loading",
    "tiny_clip_tokenizer": "loading",
    "tiny_components": "loading",
}

__all__ = [
    "COMPOSER_KINDS",
    "DEFAULT_SD",
    "ADAPTER_FILE",
    "MACHINE_STEPS",
    "HUMAN_STEPS",
    "MASK_STRIDE",
    "ComposeRequest",
    "Composition",
    "Composer",
    "LatentDecoderComposer",
    "caption_for",
    "seed_for",
    "make_composer",
    # lazy (_LAZY)
    "LatentAdapter",
    "ControlNetComposer",
    "load_components",
    "save_components",
    "tiny_clip_tokenizer",
    "tiny_components",
]


def __getattr__(name: str) -> Any:  # PEP 562, as diffusers' _LazyModule: import the defining submodule on first use
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
