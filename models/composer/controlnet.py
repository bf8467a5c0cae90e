"""The ``controlnet`` composer (the paper profile, DISCOVER §3.3): ControlNet diffusion on Stable
Diffusion composes the whole frame from the transmitted latent, its mask and a caption.

See the package docstring (``latentcast.models.composer``) for the data flow and the design choices.
Importing this module imports torch (``pip install -e ".[cloud]"``); diffusers is needed when it
runs (``pip install -e ".[sd]"``): the components are passed in (``loading``).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from latentcast.proto.grid import grid_shape

from ..latent_spaces import SDVAE, LatentSpace
from .adapter import LatentAdapter, regrid
from .base import (
    MACHINE_STEPS,
    MASK_STRIDE,
    SD_HINT,
    TORCH_HINT,
    Composer,
    ComposeRequest,
    Composition,
    as_latent,
    check_size,
    to_uint8,
)
from .captions import caption_for, seed_for

try:
    import torch
    from torch.nn import functional as F
except ImportError as e:  # pragma: no cover - torch is installed wherever models/ runs
    raise ImportError(TORCH_HINT) from e

log = logging.getLogger(__name__)

__all__ = ["ControlNetComposer"]

def _module_device(m: Any):
    """The device of a module's first parameter (CPU for parameterless modules such as PixelSpace)."""
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
            adapter = LatentAdapter(codec_channels + 1, emb_channels)
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
        lat_d = regrid(lat, self.codec_factor, f, hw)
        m_d = regrid(mask.to(lat.dtype), stride, f, hw, mask=True)
        return torch.cat([lat_d, m_d], dim=1)

    def _resolve(self, requests: Sequence[ComposeRequest]) -> list[dict]:
        jobs = []
        for i, r in enumerate(requests):
            check_size(r, i)
            lat = as_latent(r.latent, i).to(torch.float32)
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
        out = []
        cdev = _module_device(self.codec_space)
        with torch.no_grad():
            for j in group:
                img = self.codec_space.decode(j["lat"].to(cdev)).to(self.device, torch.float32)
                hh, ww = j["hw"][0] * self.space.factor, j["hw"][1] * self.space.factor
                out.append(regrid(img[:, :, : j["r"].height, : j["r"].width], 1, 1, (hh, ww)))
        return torch.cat(out)

    # ------------------------------------------------------------------ sampling
    def _run_group(self, group: list[dict]) -> list[Composition]:
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
            z_c = torch.cat([regrid(j["lat"], f, f, hw) for j in group]).to(dev, dt)
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
            m = torch.cat([regrid(j["mask"], j["stride"], f, hw, mask=True) for j in group]).to(dev, dt)
            latents = m * z_c + (1 - m) * latents
        images = self.space.decode(latents)
        out = []
        for k, j in enumerate(group):
            r = j["r"]
            img = images[k, :, : r.height, : r.width]
            if keep_roi and not self.same_space:
                m = regrid(j["mask"], j["stride"], 1, (r.height, r.width), mask=True)[0].to(dev, dt)
                img = m * codec_frames[k, :, : r.height, : r.width].to(dev, dt) + (1 - m) * img.clamp(0, 1)
            lat_out = latents[k, :, : math.ceil(r.height / f), : math.ceil(r.width / f)].float().cpu()
            out.append(Composition(frame=to_uint8(img), latent=lat_out, caption=j["caption"], seed=j["seed"],
                                   steps=len(timesteps),
                                   meta={"strength": strength, "keep_roi": keep_roi, "schedule_steps": steps}))
        return out

    def compose(self, requests: Sequence[ComposeRequest], *, return_latents: bool = False) -> list:
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
        try:
            import diffusers
        except ImportError as e:
            raise ImportError(SD_HINT) from e
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
