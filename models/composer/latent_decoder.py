"""The ``none`` composer: the codec latent space's own decoder (the embedded default, no diffusion)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import Composer, ComposeRequest, Composition, as_latent, check_size, to_uint8, torch_module

__all__ = ["LatentDecoderComposer"]

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
        torch = torch_module()
        lats = []
        for i, r in enumerate(requests):
            check_size(r, i)
            x = as_latent(r.latent, i)
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
                    frames[i] = to_uint8(img[j, :, : r.height, : r.width])
        if return_latents:
            return [Composition(frame=f, latent=lats[i].detach().cpu()) for i, f in enumerate(frames)]
        return frames
