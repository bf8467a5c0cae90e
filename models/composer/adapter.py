"""The adapter between the codec's latent and the ControlNet, and the grid resampling in front of it.

::

    [ẑ_c, mask] on the codec grid ─► regrid (area down / bilinear up, mask nearest) ─► diffusion grid
        ─► conv3x3 ─► SiLU ─► depth x (conv3x3 ─► SiLU) ─► conv3x3 (zero-initialised)
        ─► the ControlNet's conditioning embedding (block_out_channels[0] channels)

Importing this module imports torch (``pip install -e ".[cloud]"``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from latentcast.weights import read_tagged_file

from .base import CN_GET, TORCH_HINT

try:
    import torch
    from torch import nn
    from torch.nn import functional as F
except ImportError as e:  # pragma: no cover - torch is installed wherever models/ runs
    raise ImportError(TORCH_HINT) from e

__all__ = ["ADAPTER_FORMAT", "LatentAdapter", "regrid"]

ADAPTER_FORMAT = "latentcast-adapter-1"  # the ``format`` metadata of an adapter file


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

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(cond))
        for b in self.blocks:
            x = F.silu(b(x))
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
        sd, md = read_tagged_file(path, ADAPTER_FORMAT, what="ControlNet adapter", get=CN_GET)
        model = cls(**json.loads(md["config"]), zero_init=False)
        model.load_state_dict(sd)
        return model.eval()


def regrid(x, src_px: float, dst_px: float, out_hw: tuple[int, int], *, mask: bool = False):
    """Resample (N, C, h, w) from a grid of ``src_px`` pixels per cell to one of ``dst_px``, both
    anchored at the frame's top-left corner, to exactly ``out_hw`` cells (replicate-padded or cropped).
    Finer -> coarser: ``area`` (averages; a mask becomes the fraction of transmitted pixels);
    coarser -> finer: ``bilinear`` (latents) or ``nearest`` (masks)."""
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
