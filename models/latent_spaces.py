"""Pluggable diffusion latent spaces: the target of the codec's decoder.

The codec's synthesis transform does not produce pixels; it produces a latent
in some *latent space*, and that space's decoder turns it into a frame. The
space is a plug-in, so the same codec code targets the embedded profile's tiny
autoencoder, the paper profile's Stable Diffusion VAE, or plain pixels::

    images N x 3 x H x W, float RGB in [0, 1]
          |
          |  LatentSpace.encode  (training targets; no grad unless asked)
          v
    latents N x C x H/f x W/f      C = space.channels, f = space.factor
          ^                 |
          |                 |  LatentSpace.decode  (gradients flow if enabled)
    codec synthesis g_s     v
    (the cloud)       images N x 3 x H x W, float RGB in [0, 1]

Implementations:

- :class:`TinyAutoencoder`: the TAESD family (madebyollin/taesd architecture,
  MIT), e.g. ``taef2`` = the FLUX.2 latent space, 32 channels at 1/8. The layer
  list is inferred from the state-dict keys, so classic 4-channel ``taesd``
  files, ``taef2`` files (pooled GroupNorm mid-blocks) and models built here
  from a small config all load through one class.
- :class:`SDVAE`: a Stable Diffusion VAE (diffusers ``AutoencoderKL``, optional
  dependency ``pip install "latentcast[sd]"``); latents are scaled by the VAE's
  ``scaling_factor`` (and shifted by ``shift_factor`` when the config has one),
  i.e. they are in the diffusion UNet's input scale.
- :class:`PixelSpace`: pixels themselves, optionally space-to-depth
  (``PixelUnshuffle``) by a factor, so the codec can target plain pixels.

:func:`load_latent_space` builds one from a short spec string
(``"taef2"``, ``"taesd:<enc>,<dec>"``, ``"sd-vae:<path or hub id>"``,
``"pixels"``, ``"pixels:8"``).

Conventions: every space takes and returns float RGB in [0, 1] whatever its
internal range (TAESD works in [0, 1], the SD VAE in [-1, 1]). ``encode`` runs
under ``torch.no_grad`` unless ``grad=True``; ``decode`` never disables
gradients, so training can backpropagate a pixel loss through a frozen decoder
(pretrained weights are loaded frozen: ``requires_grad_(False)``, ``eval()``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "LatentSpace",
    "TinyAutoencoder",
    "SDVAE",
    "PixelSpace",
    "taef2",
    "load_latent_space",
    "LATENT_SPACE_SPECS",
]

PathLike = str | os.PathLike[str]

#: The spec forms :func:`load_latent_space` understands (quoted in its errors).
LATENT_SPACE_SPECS: tuple[str, ...] = (
    "taef2",
    "taesd:<encoder.pth>,<decoder.pth>",
    "taesd:<folder holding one *encoder* and one *decoder* weight file>",
    "sd-vae:<local folder | hub id | hub id/subfolder>",
    "pixels",
    "pixels:<factor>",
)

_TAESD_HINT = (
    "TAESD-family weights (taesd_*.pth, taef2_*.pth, ...) are published under the MIT "
    "licence at https://github.com/madebyollin/taesd; put them in <shared>/models (the "
    "shared folder is set by LATENTCAST_SHARED, default ../shared) or pass their paths"
)
_SD_HINT = 'SDVAE needs diffusers: pip install "latentcast[sd]"'


# --------------------------------------------------------------------------- interface


class LatentSpace(nn.Module):
    """A diffusion latent space: ``encode`` images to latents, ``decode`` them back.

    Attributes:
        name: short identifier, e.g. ``"taef2"`` (goes into logs and packet metadata).
        channels: latent channels C.
        factor: spatial downsampling f; images must have H and W multiples of f.

    Subclasses implement ``_encode`` / ``_decode``; the public methods check shapes.
    """

    name: str
    channels: int
    factor: int

    def __init__(self, *, name: str, channels: int, factor: int) -> None:
        super().__init__()
        if channels < 1 or factor < 1:
            raise ValueError(f"channels and factor must be >= 1, got {channels} and {factor}")
        self.name = name
        self.channels = int(channels)
        self.factor = int(factor)

    # -- shapes
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, H/f, W/f) for an H x W image; ``ValueError`` if not multiples of f."""
        if height <= 0 or width <= 0 or height % self.factor or width % self.factor:
            raise ValueError(
                f"{self.name}: image size {height}x{width} (HxW) is not a positive multiple "
                f"of the latent factor {self.factor}"
            )
        return self.channels, height // self.factor, width // self.factor

    def check_images(self, images: torch.Tensor) -> None:
        """Raise ``TypeError``/``ValueError`` unless ``images`` is N x 3 x H x W float, H, W % f == 0."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"{self.name}: images must be a torch.Tensor, got {type(images).__name__}")
        shape = tuple(images.shape)
        ok = (
            images.dim() == 4
            and shape[1] == 3
            and shape[2] > 0
            and shape[3] > 0
            and shape[2] % self.factor == 0
            and shape[3] % self.factor == 0
        )
        if not ok:
            raise ValueError(
                f"{self.name}: images must be N x 3 x H x W with H and W multiples of "
                f"{self.factor}; got shape {shape}"
            )
        if not images.is_floating_point():
            raise ValueError(
                f"{self.name}: images must be floating point RGB in [0, 1]; got dtype {images.dtype}"
            )

    def check_latents(self, latents: torch.Tensor) -> None:
        """Raise ``TypeError``/``ValueError`` unless ``latents`` is N x C x h x w float."""
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"{self.name}: latents must be a torch.Tensor, got {type(latents).__name__}")
        shape = tuple(latents.shape)
        if latents.dim() != 4 or shape[1] != self.channels or shape[2] <= 0 or shape[3] <= 0:
            raise ValueError(
                f"{self.name}: latents must be N x {self.channels} x h x w; got shape {shape}"
            )
        if not latents.is_floating_point():
            raise ValueError(f"{self.name}: latents must be floating point; got dtype {latents.dtype}")

    # -- public API
    def encode(self, images: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
        """Images N x 3 x H x W in [0, 1] -> latents N x C x H/f x W/f.

        Runs under ``torch.no_grad`` unless ``grad=True``.
        """
        self.check_images(images)
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        with ctx:
            return self._encode(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents N x C x h x w -> images N x 3 x h*f x w*f in [0, 1].

        Does not touch the grad mode: wrap in ``torch.no_grad()`` /
        ``torch.inference_mode()`` for inference, leave it on to backpropagate.
        """
        self.check_latents(latents)
        return self._decode(latents)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Round trip ``decode(encode(images))``."""
        return self.decode(self.encode(images))

    @torch.no_grad()
    def to_rgb8(self, latents: torch.Tensor, width: int, height: int) -> np.ndarray:
        """The first latent of ``latents`` (1 x C x h x w) -> its (height, width, 3) uint8 RGB frame."""
        img = self.decode(latents)[0, :, :height, :width].clamp(0, 1)
        return (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}, channels={self.channels}, factor={self.factor}"


# --------------------------------------------------------------------------- TAESD family


class _SoftClamp(nn.Module):
    """TAESD's decoder input clamp: ``tanh(x / 3) * 3`` (latents squashed into (-3, 3))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3.0) * 3.0


class _Block(nn.Module):
    """TAESD residual block, optionally with the pooled GroupNorm mid-block (TAEF2).

    ``pool`` (when present) = conv1x1 n->4n (no bias), GroupNorm, ReLU, conv1x1 4n->n
    (no bias), added residually before the block's convs.
    """

    def __init__(self, n_in: int, n_out: int, *, pool_width: int = 0, gn_groups: int = 4) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(n_in, n_out, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(n_out, n_out, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(n_out, n_out, 3, padding=1),
        )
        self.skip: nn.Module = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool: nn.Module | None = None
        if pool_width:
            if pool_width % gn_groups:
                raise ValueError(f"pool width {pool_width} is not divisible by {gn_groups} GroupNorm groups")
            self.pool = nn.Sequential(
                nn.Conv2d(n_in, pool_width, 1, bias=False),
                nn.GroupNorm(gn_groups, pool_width),
                nn.ReLU(),
                nn.Conv2d(pool_width, n_in, 1, bias=False),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


@dataclass(frozen=True)
class _Layer:
    """One entry of a TAESD ``nn.Sequential``; its index is its position in the list."""

    kind: str  # "conv" | "block" | "relu" | "upsample" | "clamp"
    c_in: int = 0
    c_out: int = 0
    kernel: int = 3
    stride: int = 1
    bias: bool = True
    pool: int = 0  # hidden width of the pooled GroupNorm mid-block; 0 = none


def _build_sequential(layers: Sequence[_Layer], gn_groups: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    for la in layers:
        if la.kind == "conv":
            mods.append(
                nn.Conv2d(la.c_in, la.c_out, la.kernel, stride=la.stride, padding=la.kernel // 2, bias=la.bias)
            )
        elif la.kind == "block":
            mods.append(_Block(la.c_in, la.c_out, pool_width=la.pool, gn_groups=gn_groups))
        elif la.kind == "relu":
            mods.append(nn.ReLU())
        elif la.kind == "upsample":
            mods.append(nn.Upsample(scale_factor=2, mode="nearest"))
        elif la.kind == "clamp":
            mods.append(_SoftClamp())
        else:  # pragma: no cover - internal
            raise ValueError(f"unknown layer kind {la.kind!r}")
    return nn.Sequential(*mods)


def _strip_prefixes(sd: Mapping[str, torch.Tensor], role: str) -> dict[str, torch.Tensor]:
    """Accept ``N.*`` (taesd .pth), ``<role>.N.*`` and ``<role>.layers.N.*`` (diffusers-style).

    A file holding both halves (keys ``encoder.*`` and ``decoder.*``, e.g. the hub's
    ``taef2.safetensors``) gives the half named by ``role``. Diffusers keeps the
    decoder's input clamp outside its layer list, so a decoder whose first layer
    index is 0 is shifted by one to the taesd numbering.
    """
    out = dict(sd)
    own = f"{role}."
    if any(k.startswith(own) for k in out):
        out = {k: v for k, v in out.items() if k.startswith(own)}
    for prefix in (own, "layers."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    if role == "decoder" and out:
        heads = [k.split(".", 1)[0] for k in out]
        if all(h.isdigit() for h in heads) and min(int(h) for h in heads) == 0:
            out = {f"{int(k.split('.', 1)[0]) + 1}.{k.split('.', 1)[1]}": v for k, v in out.items()}
    return out


def _infer_layers(sd: Mapping[str, torch.Tensor], role: str, source: str) -> list[_Layer]:
    """Rebuild the TAESD layer list of an encoder or decoder from its state-dict keys.

    Indices with parameters are convs (``N.weight``) or blocks (``N.conv.0.weight``,
    with ``N.pool.*`` when the block has the pooled GroupNorm mid-block). Missing
    indices are parameterless: the decoder's index 0 is the input clamp, a gap after
    a block is a 2x nearest upsample, a gap after a conv is a ReLU. In the encoder,
    every conv is stride 2 except the last one and a first conv followed by a block.
    """
    groups: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        head, _, rest = key.partition(".")
        if not head.isdigit() or not rest:
            raise ValueError(f"{source}: unexpected key {key!r} for a TAESD-family {role}")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{source}: {key!r} is not a tensor")
        groups.setdefault(int(head), {})[rest] = value
    if not groups:
        raise ValueError(f"{source}: empty state dict")

    layers: list[_Layer] = []
    for i in range(max(groups) + 1):
        p = groups.get(i)
        prev = layers[-1] if layers else None
        if p is None:
            if role == "decoder" and i == 0:
                layers.append(_Layer("clamp"))
            elif prev is None:
                raise ValueError(f"{source}: {role} has no parameters at index 0")
            elif prev.kind == "block" and role == "decoder":
                layers.append(_Layer("upsample", prev.c_out, prev.c_out))
            elif prev.kind == "conv":
                layers.append(_Layer("relu", prev.c_out, prev.c_out))
            else:
                raise ValueError(f"{source}: cannot place a parameterless layer at {role} index {i}")
            continue
        if "conv.0.weight" in p:
            needed = {f"conv.{j}.{t}" for j in (0, 2, 4) for t in ("weight", "bias")}
            missing = needed - set(p)
            if missing:
                raise ValueError(f"{source}: block {i} lacks {sorted(missing)}")
            c_in = int(p["conv.0.weight"].shape[1])
            c_out = int(p["conv.4.weight"].shape[0])
            pool = int(p["pool.0.weight"].shape[0]) if "pool.0.weight" in p else 0
            layers.append(_Layer("block", c_in, c_out, pool=pool))
        elif "weight" in p and p["weight"].dim() == 4:
            w = p["weight"]
            if w.shape[2] != w.shape[3] or w.shape[2] % 2 == 0:
                raise ValueError(f"{source}: conv {i} has an unsupported kernel {tuple(w.shape)}")
            layers.append(_Layer("conv", int(w.shape[1]), int(w.shape[0]), int(w.shape[2]), 1, "bias" in p))
        else:
            raise ValueError(f"{source}: cannot tell what layer {role} index {i} is (keys {sorted(p)})")

    if layers[-1].kind != "conv":
        raise ValueError(f"{source}: a TAESD {role} must end with a conv, found {layers[-1].kind}")
    if role == "encoder":
        for i, la in enumerate(layers):
            if la.kind != "conv":
                continue
            is_last = i == len(layers) - 1
            first_then_block = i == 0 and len(layers) > 1 and layers[1].kind == "block"
            if not (is_last or first_then_block):
                layers[i] = _Layer("conv", la.c_in, la.c_out, la.kernel, 2, la.bias)

    # channel flow check
    c = 3 if role == "encoder" else None
    for i, la in enumerate(layers):
        if la.kind in ("conv", "block"):
            if c is not None and la.c_in != c:
                raise ValueError(f"{source}: {role} layer {i} expects {la.c_in} channels but gets {c}")
            c = la.c_out
    if role == "decoder" and c != 3:
        raise ValueError(f"{source}: decoder ends with {c} channels, not 3 (RGB)")
    return layers


def _factor_of(layers: Sequence[_Layer], role: str) -> int:
    f = 1
    for la in layers:
        if role == "encoder" and la.kind == "conv":
            f *= la.stride
        if role == "decoder" and la.kind == "upsample":
            f *= 2
    return f


def _load_weights(path: Path, role: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{role} weights {path} not found. {_TAESD_HINT}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(path))
    else:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return _strip_prefixes(sd, role)


class TinyAutoencoder(LatentSpace):
    """TAESD-family tiny autoencoder (madebyollin/taesd architecture).

    Images in [0, 1] -> encoder -> latents (the target model's latent scale; the
    decoder soft-clamps its input with ``tanh(x / 3) * 3``) -> decoder -> images,
    clamped to [0, 1]. Either half may be absent (e.g. the cloud only decodes);
    calling the missing half raises ``RuntimeError``.

    Build with :meth:`from_files`, :meth:`taef2` or :meth:`from_config`.
    """

    #: TAESD latents live in about (-3, 3); ``to_unit``/``from_unit`` map that to [0, 1].
    latent_magnitude: float = 3.0
    latent_shift: float = 0.5

    def __init__(
        self,
        *,
        encoder_layers: Sequence[_Layer] | None,
        decoder_layers: Sequence[_Layer] | None,
        name: str,
        gn_groups: int = 4,
    ) -> None:
        if encoder_layers is None and decoder_layers is None:
            raise ValueError("a TinyAutoencoder needs an encoder, a decoder or both")
        shapes: list[tuple[int, int]] = []
        if encoder_layers is not None:
            shapes.append((encoder_layers[-1].c_out, _factor_of(encoder_layers, "encoder")))
        if decoder_layers is not None:
            first_conv = next(la for la in decoder_layers if la.kind == "conv")
            shapes.append((first_conv.c_in, _factor_of(decoder_layers, "decoder")))
        if len(shapes) == 2 and shapes[0] != shapes[1]:
            raise ValueError(
                f"{name}: encoder gives {shapes[0][0]} channels at 1/{shapes[0][1]} but the decoder "
                f"takes {shapes[1][0]} channels at 1/{shapes[1][1]}"
            )
        super().__init__(name=name, channels=shapes[0][0], factor=shapes[0][1])
        self.gn_groups = gn_groups
        self.encoder_layers: tuple[_Layer, ...] | None = (
            tuple(encoder_layers) if encoder_layers is not None else None
        )
        self.decoder_layers: tuple[_Layer, ...] | None = (
            tuple(decoder_layers) if decoder_layers is not None else None
        )
        self.encoder: nn.Sequential | None = (
            _build_sequential(encoder_layers, gn_groups) if encoder_layers is not None else None
        )
        self.decoder: nn.Sequential | None = (
            _build_sequential(decoder_layers, gn_groups) if decoder_layers is not None else None
        )

    # -- constructors
    @classmethod
    def from_files(
        cls,
        *,
        encoder_path: PathLike | None,
        decoder_path: PathLike | None,
        name: str | None = None,
        gn_groups: int = 4,
    ) -> TinyAutoencoder:
        """Load taesd-style ``.pth`` (or ``.safetensors``) state dicts; one of them may be ``None``.

        The layer list is inferred from the keys. ``gn_groups`` (GroupNorm groups of the
        pooled mid-blocks) is not recoverable from the weights; 4 is what TAEF2 uses.
        The model is returned frozen (``requires_grad_(False)``) in ``eval()`` mode.
        """
        if encoder_path is None and decoder_path is None:
            raise ValueError("from_files needs encoder_path, decoder_path or both")
        enc_sd = _load_weights(Path(encoder_path), "encoder") if encoder_path is not None else None
        dec_sd = _load_weights(Path(decoder_path), "decoder") if decoder_path is not None else None
        enc_layers = _infer_layers(enc_sd, "encoder", str(encoder_path)) if enc_sd is not None else None
        dec_layers = _infer_layers(dec_sd, "decoder", str(decoder_path)) if dec_sd is not None else None
        if name is None:
            stem = Path(encoder_path if encoder_path is not None else decoder_path).stem  # type: ignore[arg-type]
            name = re.sub(r"[_.-]?(encoder|decoder)$", "", stem) or "taesd"
        model = cls(encoder_layers=enc_layers, decoder_layers=dec_layers, name=name, gn_groups=gn_groups)
        for part, sd, path in ((model.encoder, enc_sd, encoder_path), (model.decoder, dec_sd, decoder_path)):
            if part is None or sd is None:
                continue
            try:
                part.load_state_dict(sd, strict=True)
            except RuntimeError as e:
                raise ValueError(f"{path}: weights do not fit the inferred TAESD layout: {e}") from e
        model.requires_grad_(False).eval()
        logger.info(
            "loaded %s: %d channels at 1/%d (encoder %s, decoder %s)",
            name, model.channels, model.factor, encoder_path, decoder_path,
        )
        return model

    @classmethod
    def taef2(cls, *, with_encoder: bool = True, with_decoder: bool = True) -> TinyAutoencoder:
        """TAEF2 (FLUX.2 latent space, 32 channels at 1/8) from the shared models folder."""
        from latentcast.shared import shared_path

        paths: dict[str, Path | None] = {}
        for role, wanted in (("encoder", with_encoder), ("decoder", with_decoder)):
            if not wanted:
                paths[role] = None
                continue
            try:
                paths[role] = shared_path("models", f"taef2_{role}.pth")
            except FileNotFoundError as e:
                raise FileNotFoundError(f"taef2_{role}.pth: {e}. {_TAESD_HINT}") from e
        return cls.from_files(encoder_path=paths["encoder"], decoder_path=paths["decoder"], name="taef2")

    @classmethod
    def from_config(
        cls,
        *,
        latent_channels: int = 4,
        width: int = 64,
        encoder_blocks: Sequence[int] = (1, 3, 3, 3),
        decoder_blocks: Sequence[int] = (3, 3, 3, 1),
        midblock_gn: bool = False,
        gn_groups: int = 4,
        name: str = "taesd-random",
        seed: int | None = 0,
    ) -> TinyAutoencoder:
        """A randomly initialised TAESD-family model (tests, distillation of smaller decoders).

        ``encoder_blocks[s]`` / ``decoder_blocks[s]`` = blocks in stage ``s``; the factor is
        ``2 ** (stages - 1)``. The defaults give the classic taesd layout (and, with
        ``latent_channels=32, midblock_gn=True``, TAEF2's). ``midblock_gn`` puts the pooled
        GroupNorm mid-block into the last encoder stage and the first decoder stage.
        ``seed`` makes the init reproducible without touching the global RNG.
        """
        if len(encoder_blocks) != len(decoder_blocks) or len(encoder_blocks) < 1:
            raise ValueError(
                f"encoder_blocks {tuple(encoder_blocks)} and decoder_blocks {tuple(decoder_blocks)} "
                "must have the same, non-zero number of stages"
            )
        if latent_channels < 1 or width < 1:
            raise ValueError(f"latent_channels and width must be >= 1, got {latent_channels}, {width}")
        pool = 4 * width if midblock_gn else 0
        n = len(encoder_blocks)
        enc: list[_Layer] = [_Layer("conv", 3, width)]
        for s, nb in enumerate(encoder_blocks):
            if s > 0:
                enc.append(_Layer("conv", width, width, 3, 2, False))
            enc += [_Layer("block", width, width, pool=pool if s == n - 1 else 0)] * nb
        enc.append(_Layer("conv", width, latent_channels))
        dec: list[_Layer] = [_Layer("clamp"), _Layer("conv", latent_channels, width), _Layer("relu", width, width)]
        for s, nb in enumerate(decoder_blocks):
            dec += [_Layer("block", width, width, pool=pool if s == 0 else 0)] * nb
            if s < n - 1:
                dec += [_Layer("upsample", width, width), _Layer("conv", width, width, 3, 1, False)]
        dec.append(_Layer("conv", width, 3))
        rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            model = cls(encoder_layers=enc, decoder_layers=dec, name=name, gn_groups=gn_groups)
        return model.eval()

    # -- persistence
    def save_files(self, *, encoder_path: PathLike | None, decoder_path: PathLike | None, half: bool = False) -> None:
        """Write taesd-layout state dicts (loadable by :meth:`from_files` and by taesd.py)."""
        for part, path in ((self.encoder, encoder_path), (self.decoder, decoder_path)):
            if path is None:
                continue
            if part is None:
                raise RuntimeError(f"{self.name}: cannot save a half the model does not have ({path})")
            sd = {k: (v.half() if half else v).detach().cpu().clone() for k, v in part.state_dict().items()}
            if str(path).endswith(".safetensors"):
                from safetensors.torch import save_file

                save_file(sd, str(path))
            else:
                torch.save(sd, str(path))

    # -- latent helpers
    @classmethod
    def to_unit(cls, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> [0, 1] (taesd's 8-bit storage convention), clamped."""
        return latents.div(2 * cls.latent_magnitude).add(cls.latent_shift).clamp(0, 1)

    @classmethod
    def from_unit(cls, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_unit` (for values inside the range)."""
        return x.sub(cls.latent_shift).mul(2 * cls.latent_magnitude)

    # -- LatentSpace
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            raise RuntimeError(f"{self.name}: loaded without an encoder")
        return self.encoder(images)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            raise RuntimeError(f"{self.name}: loaded without a decoder")
        return self.decoder(latents).clamp(0, 1)


def taef2(*, with_encoder: bool = True, with_decoder: bool = True) -> TinyAutoencoder:
    """TAEF2 from the shared models folder (see :meth:`TinyAutoencoder.taef2`)."""
    return TinyAutoencoder.taef2(with_encoder=with_encoder, with_decoder=with_decoder)


# --------------------------------------------------------------------------- SD VAE


def _import_diffusers() -> Any:
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(_SD_HINT) from e
    return diffusers


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)*")


class SDVAE(LatentSpace):
    """Stable Diffusion VAE (diffusers ``AutoencoderKL``) as a latent space.

    ``encode`` = posterior mean (deterministic), then ``(z - shift_factor) * scaling_factor``;
    ``decode`` inverts the scaling and maps the VAE's [-1, 1] output to [0, 1].
    """

    def __init__(self, vae: nn.Module, *, name: str = "sd-vae") -> None:
        cfg = vae.config  # type: ignore[attr-defined]
        super().__init__(
            name=name,
            channels=int(cfg.latent_channels),
            factor=2 ** (len(cfg.block_out_channels) - 1),
        )
        self.vae = vae
        self.scaling_factor = float(cfg.scaling_factor)
        shift = getattr(cfg, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0
        if getattr(cfg, "latents_mean", None) is not None:
            logger.warning("%s: config has latents_mean/latents_std; they are not applied", name)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: PathLike,
        *,
        subfolder: str | None = None,
        name: str | None = None,
        torch_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> SDVAE:
        """Load from a local folder (``config.json`` + weights, or a pipeline folder with
        ``vae/``) or a hub id (``org/name`` or ``org/name/subfolder``, e.g.
        ``stabilityai/stable-diffusion-2-1-base/vae``; needs the hub cache or a network).
        Extra ``kwargs`` go to ``AutoencoderKL.from_pretrained``. Returned frozen, in eval mode.
        """
        diffusers = _import_diffusers()
        text = str(path_or_id)
        p = Path(text).expanduser()
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"SD VAE path {p} is a file; pass the folder holding config.json")
            if subfolder is None and not (p / "config.json").is_file() and (p / "vae" / "config.json").is_file():
                subfolder = "vae"
            source = str(p)
        elif _HUB_ID.fullmatch(text):
            parts = text.split("/")
            source = "/".join(parts[:2])
            if len(parts) > 2 and subfolder is None:
                subfolder = "/".join(parts[2:])
        else:
            raise FileNotFoundError(
                f"SD VAE {text!r}: no such folder, and not a hub id (org/name[/subfolder])"
            )
        if torch_dtype is not None:
            kwargs["torch_dtype"] = torch_dtype
        try:
            vae = diffusers.AutoencoderKL.from_pretrained(source, subfolder=subfolder, **kwargs)
        except OSError as e:
            raise FileNotFoundError(
                f"SD VAE {text!r} (subfolder {subfolder!r}) could not be loaded: {str(e).rstrip('.')}. Without a "
                "network, download it beforehand (e.g. `hf download stabilityai/stable-diffusion-2-1-base "
                "--include 'vae/*'`) and pass the local folder"
            ) from e
        vae.requires_grad_(False).eval()
        model = cls(vae, name=name or "sd-vae")
        logger.info("loaded SD VAE %s (subfolder %s): %d channels at 1/%d, scale %g",
                    text, subfolder, model.channels, model.factor, model.scaling_factor)
        return model

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, seed: int = 0, name: str = "sd-vae-random") -> SDVAE:
        """A randomly initialised ``AutoencoderKL`` from a config dict (tests), seeded."""
        diffusers = _import_diffusers()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = diffusers.AutoencoderKL.from_config(dict(config))
        return cls(vae.eval(), name=name)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(images * 2.0 - 1.0).latent_dist  # type: ignore[operator]
        return (posterior.mode() - self.shift_factor) * self.scaling_factor

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scaling_factor + self.shift_factor
        out = self.vae.decode(z).sample  # type: ignore[operator]
        return ((out + 1.0) * 0.5).clamp(0, 1)


# --------------------------------------------------------------------------- pixels


class PixelSpace(LatentSpace):
    """Pixels as the "latent": identity (factor 1) or ``PixelUnshuffle(factor)``
    (3 * factor**2 channels at 1/factor). ``decode`` clamps to [0, 1]; for images in
    [0, 1] the round trip is exact.
    """

    def __init__(self, factor: int = 1, *, name: str | None = None) -> None:
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"PixelSpace factor must be an integer >= 1, got {factor!r}")
        super().__init__(
            name=name or ("pixels" if factor == 1 else f"pixels:{factor}"),
            channels=3 * factor * factor,
            factor=factor,
        )

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images, self.factor) if self.factor > 1 else images.clone()

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = F.pixel_shuffle(latents, self.factor) if self.factor > 1 else latents
        return x.clamp(0, 1)

    def to_rgb8(self, latents: torch.Tensor, width: int, height: int) -> np.ndarray:
        """As the base class, but the rearrangement is done on bytes (a temporal render's hot path)."""
        if self.factor == 1:
            return super().to_rgb8(latents, width, height)
        f, (_, c, h, w) = self.factor, latents.shape
        q = latents[0].detach().numpy() * np.float32(255) + np.float32(0.5)
        q = np.clip(q, 0, 255, out=q).astype(np.uint8).reshape(c // (f * f), f, f, h, w)
        return np.ascontiguousarray(q.transpose(3, 1, 4, 2, 0).reshape(h * f, w * f, -1)[:height, :width])


# --------------------------------------------------------------------------- registry


def _spec_error(spec: str, why: str) -> ValueError:
    forms = "; ".join(f"'{f}'" for f in LATENT_SPACE_SPECS)
    return ValueError(f"bad latent space spec {spec!r}: {why}. Valid forms: {forms}")


def _taesd_folder(folder: Path, spec: str) -> tuple[Path, Path]:
    def find(role: str) -> list[Path]:
        return sorted(
            q for q in folder.iterdir()
            if q.is_file() and role in q.name.lower() and q.suffix in (".pth", ".pt", ".safetensors")
        )

    enc, dec = find("encoder"), find("decoder")
    if len(enc) != 1 or len(dec) != 1:
        raise _spec_error(
            spec,
            f"folder {folder} must hold exactly one *encoder* and one *decoder* weight file "
            f"(found encoders {[q.name for q in enc]}, decoders {[q.name for q in dec]}); "
            "name the files instead",
        )
    return enc[0], dec[0]


def load_latent_space(spec: str, **kw: Any) -> LatentSpace:
    """Build a latent space from a spec string; ``kw`` go to the constructor.

    ``"taef2"``; ``"taesd:<encoder.pth>,<decoder.pth>"``; ``"taesd:<folder>"``;
    ``"sd-vae:<folder | hub id | hub id/subfolder>"``; ``"pixels"``; ``"pixels:<factor>"``.
    Unknown or malformed specs raise ``ValueError`` listing the valid forms.
    """
    if not isinstance(spec, str):
        raise _spec_error(repr(spec), f"expected a string, got {type(spec).__name__}")
    text = spec.strip()
    kind, sep, arg = text.partition(":")
    kind = kind.strip().lower()
    arg = arg.strip()
    if kind == "taef2" and not sep:
        return TinyAutoencoder.taef2(**kw)
    if kind == "taesd" and arg:
        if "," in arg:
            parts = [a.strip() for a in arg.split(",")]
            if len(parts) != 2 or not all(parts):
                raise _spec_error(spec, "taesd needs exactly two paths: <encoder>,<decoder>")
            return TinyAutoencoder.from_files(encoder_path=parts[0], decoder_path=parts[1], **kw)
        folder = Path(arg).expanduser()
        if not folder.is_dir():
            raise _spec_error(spec, f"{arg!r} is neither '<encoder>,<decoder>' nor an existing folder")
        enc, dec = _taesd_folder(folder, spec)
        return TinyAutoencoder.from_files(encoder_path=enc, decoder_path=dec, **kw)
    if kind == "sd-vae" and arg:
        return SDVAE.from_pretrained(arg, **kw)
    if kind == "pixels":
        if not sep:
            return PixelSpace(1, **kw)
        if arg.isdigit() and int(arg) >= 1:
            return PixelSpace(int(arg), **kw)
        raise _spec_error(spec, f"pixel factor {arg!r} is not an integer >= 1")
    raise _spec_error(spec, "unknown or incomplete spec")
