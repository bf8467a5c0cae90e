"""Releasing a trained codec: a training checkpoint frozen into a codec weight file (``latentcast release codec``).

::

    last.pt (models/training.py) ─► ElicCodec with the trained state ─► [keep only some rate points]
        ─► LatentCodec.save (tables, config, training metadata without machine paths)
        ─► [calibrate each rate point's table offset on training images for the encoder's lowest cost
            (real bytes + the RDOQ λ's share of distortion, coded as the edge codes); save again]

The weights hash every packet names is taken over the released file's content, so calibrating (which
changes the table offsets) gives a new hash.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from latentcast.proto.symbols import check_rdoq

from .codec import LatentCodec
from .elic import ElicCodec, ElicConfig

log = logging.getLogger(__name__)

__all__ = ["MACHINE_KEYS", "release_codec"]

#: training-config keys that name this machine's folders: kept out of a released file
MACHINE_KEYS = ("out", "cache", "init")


def release_codec(checkpoint: str | Path, out: str | Path, *, rate_points: Sequence[int] | None = None,
                  calibrate: bool = True, average: str | None = None, rdoq: float | None = None) -> bytes:
    """Freeze ``checkpoint`` (``last.pt`` of ``latentcast train codec``) into the codec weight file ``out``;
    returns its weights hash. ``rate_points`` ships only these trained rate points (ascending; ``None``:
    all); ``calibrate`` chooses the table offsets on training images (needs the shared training data);
    ``average`` ships one of the run's moving averages of the weights instead of the weights: ``"ema"`` (a run
    trained with ``--ema``) or ``"ema_slow"`` (``--ema-slow``). ``rdoq``: the λ of the encoder's choice of
    symbols this codec is coded with (0 = plain rounding), recorded in the file (encoders use it unless told
    otherwise: ``proto.symbols.codec_rdoq``) and the λ the offsets are calibrated for; None records none, and
    calibrates for the default ``proto.symbols.RDOQ_LAMBDA``."""
    from .training import checkpoint_weights

    rdoq = None if rdoq is None else check_rdoq(rdoq)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    c = dict(state["codec"])
    model = ElicCodec(ElicConfig.from_dict(c))
    model.load_state_dict(checkpoint_weights(state, average, source=checkpoint))
    model.reset_rate_points()  # the configured steps, with channel gains rounded into them
    train_cfg = {k: v for k, v in (state.get("train") or {}).items() if k not in MACHINE_KEYS}
    meta = {"train": train_cfg, "step": state.get("step"), "latent_var": state.get("latent_var")}
    if rdoq is not None:
        meta["rdoq"] = rdoq
    if average is not None:
        meta["weights"] = f"moving average of the run's weights (decay {train_cfg.get(average)})"
    if rate_points is not None:
        keep = [int(v) for v in rate_points]
        meta["trained_rate_steps"] = list(model.cfg.rate_steps)
        model.select_rate_points(keep)
        meta["released_rate_points"] = keep
    space = state["train"]["latent_space"]
    LatentCodec.save(model, out, latent_space=space, meta=meta)
    if calibrate:
        from .training import calibrate_table_offsets, calibration_images

        codec = LatentCodec.from_file(out)
        meta["table_offset_shifts"] = calibrate_table_offsets(codec, calibration_images(), rdoq=codec.rdoq)
        meta["table_offset_rdoq"] = codec.rdoq
        LatentCodec.save(codec.model, out, latent_space=space, meta=meta)
    weights_hash = LatentCodec.from_file(out).weights_hash
    log.info("released %s as %s (weights hash %s)", checkpoint, out, weights_hash.hex())
    return weights_hash
