"""Composer components: Stable Diffusion and a trained ControlNet + adapter loaded from disk
(:func:`load_components`), written back (:func:`save_components`), or built tiny and random for
tests (:func:`tiny_components`, like diffusers' ``get_dummy_components``).

Nothing is downloaded unless asked (``local_files_only=False``). Importing this module imports
torch, diffusers and transformers (``pip install -e ".[sd]"``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .adapter import LatentAdapter
from .base import ADAPTER_FILE, CN_GET, DEFAULT_SD, SD_HINT, TORCH_HINT

try:
    import torch
except ImportError as e:  # pragma: no cover - torch is installed wherever models/ runs
    raise ImportError(TORCH_HINT) from e
try:
    import diffusers
    import transformers
except ImportError as e:
    raise ImportError(SD_HINT) from e

log = logging.getLogger(__name__)

__all__ = ["SD_SUBFOLDERS", "tiny_clip_tokenizer", "tiny_components", "load_components", "save_components"]

SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")  # a Stable Diffusion pipeline folder
_SD_GET = ("download it beforehand, e.g. `hf download stabilityai/stable-diffusion-2-1-base --local-dir DIR "
           "--include 'unet/*' 'vae/*' 'text_encoder/*' 'tokenizer/*' 'scheduler/*'`, and pass DIR (composer.sd)")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

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
        adapter = LatentAdapter(codec_channels + 1, 32, hidden=adapter_hidden, zero_init=False)
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
    table = {"dpm++": diffusers.DPMSolverMultistepScheduler, "ddim": diffusers.DDIMScheduler}
    if name not in table:
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(table)}")
    return table[name]


def _load_sd(sd: str, *, local_files_only: bool, torch_dtype: Any, scheduler: str) -> dict:
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
    _scheduler_cls(scheduler)
    comps = _load_sd(sd, local_files_only=local_files_only, torch_dtype=torch_dtype, scheduler=scheduler)
    mkw: dict[str, Any] = {"local_files_only": local_files_only}
    if torch_dtype is not None:
        mkw["torch_dtype"] = torch_dtype
    if controlnet is None:
        log.warning("no trained ControlNet given: using an untrained copy of the UNet encoder (zero control)")
        cn = diffusers.ControlNetModel.from_unet(comps["unet"])
        adapter = LatentAdapter(codec_channels + 1, int(cn.config.block_out_channels[0]))
    else:
        p = Path(str(controlnet)).expanduser()
        if p.is_dir():
            for need in (p / "config.json", p / ADAPTER_FILE):
                if not need.is_file():
                    raise FileNotFoundError(f"trained ControlNet: {need} is missing; {CN_GET}")
            try:
                cn = diffusers.ControlNetModel.from_pretrained(str(p), **mkw)
            except (OSError, ValueError) as e:
                raise FileNotFoundError(f"trained ControlNet {p}: weights could not be loaded ({e}); {CN_GET}") from e
            adapter = LatentAdapter.load(p / ADAPTER_FILE)
        elif p.exists() or not _HUB_ID.fullmatch(str(controlnet)):
            raise FileNotFoundError(f"trained ControlNet {str(controlnet)!r}: no such folder (and not a hub id); "
                                    f"{CN_GET}")
        else:
            try:
                from huggingface_hub import hf_hub_download

                cn = diffusers.ControlNetModel.from_pretrained(str(controlnet), **mkw)
                adapter = LatentAdapter.load(
                    hf_hub_download(str(controlnet), ADAPTER_FILE, local_files_only=local_files_only)
                )
            except (OSError, ValueError) as e:
                raise FileNotFoundError(
                    f"trained ControlNet {str(controlnet)!r} could not be loaded ({e}); {CN_GET}"
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
