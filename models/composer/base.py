"""What a composer is: the request and result types, the :class:`Composer` interface, the kinds
and defaults, and :func:`make_composer`.

This module needs numpy only; torch is imported on first use (``torch_module``) with an install hint,
and the ControlNet composer's module only when ``make_composer("controlnet", ...)`` runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# the public names are re-exported by the package (latentcast.models.composer)
COMPOSER_KINDS: tuple[str, ...] = ("none", "controlnet")  # make_composer's kinds (cloud config: composer.kind)
DEFAULT_SD = "stabilityai/stable-diffusion-2-1-base"  # the paper profile's diffusion model (hub id)
ADAPTER_FILE = "adapter.safetensors"  # the LatentAdapter's file beside a trained ControlNet
MACHINE_STEPS = 8  # DISCOVER: sampling steps for machine vision consumers
HUMAN_STEPS = 50  # ... and for human perception
MASK_STRIDE = 16  # pixels per transmitted-mask cell: the codec's y grid (latentcast.proto.grid)

TORCH_HINT = 'the composer needs PyTorch: pip install -e ".[cloud]"'
SD_HINT = 'the controlnet composer needs diffusers and transformers: pip install -e ".[sd]"'
CN_GET = ("train the ControlNet and its adapter (DISCOVER eq. 4: ControlNetComposer.diffusion_loss) and save them "
          "with save_components(..., controlnet_dir=DIR), or copy a trained folder (config.json, "
          f"diffusion_pytorch_model.safetensors, {ADAPTER_FILE}) and pass DIR (composer.controlnet)")


def torch_module():
    """``torch``, imported on first use, or an ImportError that says how to install it."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is installed wherever models/ runs
        raise ImportError(TORCH_HINT) from e
    return torch


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


def as_latent(x: Any, i: int):
    """Request ``i``'s latent as a float torch tensor (C, h, w); a precise error for anything else."""
    torch = torch_module()
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


def check_size(r: ComposeRequest, i: int) -> None:
    """Request ``i``'s frame size: integers >= 1."""
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


def to_uint8(img) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8, rounding as ``LatentCodec.latent_to_frame``."""
    return (img.clamp(0, 1).permute(1, 2, 0).float().cpu().numpy() * 255 + 0.5).astype(np.uint8)


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
        from .latent_decoder import LatentDecoderComposer

        space = kw.pop("latent_space", None) or codec
        if space is None:
            raise ValueError("composer 'none' needs latent_space= (a LatentSpace) or codec= (a LatentCodec)")
        return LatentDecoderComposer(space, **kw)
    from .controlnet import ControlNetComposer
    from .loading import load_components, tiny_components

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
