"""Temporal coding in the cloud: the per-stream decoder of keyframes and P frames.

::

    packet ─► T section? no  ─► LatentCodec.decompress (an independent frame)
                         yes ─► KEY: LatentCodec.decode_y ─► state = ŷ (background and current), ẑ kept
                                P:   ref == last decoded frame and key == held keyframe?
                                       no  ─► MissingReference (nothing rendered; the cloud asks the edge
                                              for a keyframe over the back channel)
                                       yes ─► proto.temporal.decode_p ─► CRC ─► state.apply
                         ─► g_s(ŷ_state, all cells, ẑ_key) ─► ẑ_c ─► latent decoder ─► frame

The P-frame tables it decodes with are fitted by ``latentcast train temporal``
(``tools/fit_temporal_tables.py``) and shipped beside the codec
(:func:`default_tables_path`, resolved by ``latentcast.weights``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from latentcast.proto.bitstream import Packet, SectionKind
from latentcast.proto.temporal import BGCODE, CODE, TemporalError, TemporalInfo, TemporalState, TemporalTables, decode_p
from latentcast.weights import weights_path

from .codec import CodecError, LatentCodec, Reconstruction

log = logging.getLogger(__name__)

__all__ = ["MissingReference", "TemporalDecoder", "default_tables_path", "is_temporal"]


class MissingReference(TemporalError):
    """A P frame whose reference or keyframe this decoder does not hold: ask for a keyframe."""


def default_tables_path(codec: LatentCodec) -> Path:
    """``models/weights/<codec>-temporal.safetensors`` next to the shipped codec."""
    name = codec.path.stem if codec.path is not None else codec.codec_name
    return weights_path(name, "temporal-tables")


def is_temporal(packet: Packet) -> bool:
    return SectionKind.T in packet.sections


class TemporalDecoder:
    """One stream's decoder: keyframes and P frames in order; refuses what it cannot reconstruct exactly."""

    def __init__(self, *, codec: LatentCodec, tables: TemporalTables):
        if tables.M != codec.M:
            raise ValueError(f"temporal tables are for M={tables.M} channels, the codec has {codec.M}")
        self.codec, self.tables = codec, tables
        self.state: TemporalState | None = None
        self._z: torch.Tensor | None = None
        self._size: tuple[int, int] | None = None
        self.last_coded: np.ndarray | None = None  # (h, w) cells coded in the last packet
        self.counts = {"key": 0, "p": 0, "missing_reference": 0}

    def decode_state(self, packet: Packet | bytes) -> tuple[TemporalInfo, np.ndarray]:
        """Advance the stream's state by one packet; returns its T info and the cells coded in it."""
        packet = packet if isinstance(packet, Packet) else Packet.from_bytes(packet)
        info = TemporalInfo.from_bytes(packet.sections[SectionKind.T])
        hd = packet.header
        if info.is_key:
            y_hat, z_t, tx = self.codec.decode_y(packet)
            self.state = TemporalState.from_key(y_hat[0].numpy(), info.frame_id)
            self._z, self._size = z_t, (hd.width, hd.height)
            self.counts["key"] += 1
            return info, tx
        self.codec.check_packet(packet, sections=(SectionKind.Y,))
        try:
            if self.state is None:
                raise MissingReference(f"frame {info.frame_id} is a P frame and no keyframe has been decoded")
            if self._size != (hd.width, hd.height):
                raise MissingReference(f"frame {info.frame_id} is {hd.width}x{hd.height}, the keyframe "
                                       f"{self._size[0]}x{self._size[1]}")
            self.state.check_next(info)
        except TemporalError as exc:
            self.counts["missing_reference"] += 1
            raise MissingReference(str(exc)) from None
        for q in (hd.rate_point, info.bg_rate_point):
            if q >= self.codec.n_rates:
                raise CodecError(f"P frame rate point {q} out of range 0..{self.codec.n_rates - 1}")
        modes, sym, crc = decode_p(self.state, packet.sections[SectionKind.Y], tables=self.tables,
                                   y_tables=self.codec.y_tables, rate_point=hd.rate_point,
                                   bg_rate_point=info.bg_rate_point)
        if crc != hd.symbol_crc:
            raise CodecError(f"symbol checksum mismatch in P frame {info.frame_id} (decoded {crc:#010x}, packet "
                             f"{hd.symbol_crc:#010x}): frame not rendered")
        steps = self.codec.rate_deltas
        self.state.apply(modes, sym, step=steps[hd.rate_point], bg_step=steps[info.bg_rate_point],
                         frame_id=info.frame_id)
        self.counts["p"] += 1
        return info, (modes == CODE) | (modes == BGCODE)

    def decompress(self, data: bytes | Packet, *, decode_frame: bool = True) -> Reconstruction:
        """Bytes of the next packet -> :class:`Reconstruction` of the stream's current frame."""
        return self.prepare(data)(decode_frame)

    def prepare(self, data: bytes | Packet) -> Callable[[bool], Reconstruction]:
        """Decode the next packet into the state now (packets must come in order); returns
        ``render(decode_frame) -> Reconstruction`` of this frame, from a copy of the state, to run
        later and elsewhere (the cloud's worker threads). ``Reconstruction.mask`` is all cells: every
        cell of the state was transmitted at some point (:attr:`last_coded`: the cells of this packet)."""
        packet = data if isinstance(data, Packet) else Packet.from_bytes(data)
        _, self.last_coded = self.decode_state(packet)
        every = np.ones(self.last_coded.shape, dtype=bool)
        y, z, (w, h), codec = self.state.y.copy(), self._z, self._size, self.codec

        @torch.no_grad()
        def render(decode_frame: bool = True) -> Reconstruction:
            latent = codec.synthesize(torch.from_numpy(y)[None], every, z, width=w, height=h)
            frame = codec.latent_to_frame(latent, w, h) if decode_frame else None
            return Reconstruction(latent=latent[0].numpy(), frame=frame, packet=packet, mask=every)

        return render
