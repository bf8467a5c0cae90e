"""Temporal coding in the cloud: the per-stream decoder of keyframes and P frames.

::

    packet ─► T section? no  ─► LatentCodec.decompress (an independent frame)
                         yes ─► KEY: LatentCodec.decode_y ─► state = ŷ (background and current), ẑ kept
                                P:   ref == last decoded frame and key == held keyframe?
                                       no  ─► MissingReference (nothing rendered; the cloud asks the edge
                                              for a keyframe over the back channel)
                                       yes ─► proto.temporal.decode_p ─► CRC ─► state.apply (P_MC: CODE
                                              cells from the moved latent)
                         ─► render: g_s(ŷ_state, all cells, ẑ_key) ─► ẑ_c ─► latent decoder ─► frame

Rendering costs what changed (``tiled``, the default). M(ẑ), g_s's global features, is computed once
per keyframe; the last rendered latent is kept, and a frame re-runs g_s only on the cells that changed
since then (every cell whose mode was not KEEP), grown by ``grow`` cells, each rectangle cut out with
``halo`` cells around it (``proto.regions``; g_s's layers at 1/8 and 1/4 run only on what the cells need,
``models/elic.py: crop_chain``; on ONNX Runtime by default, ``models/synthesis_runtime.py``), and pastes
them in. The pasted cells are the whole-frame g_s up to the halo's cut (g_s's receptive field is about
±10 cells, but the influence of a cell falls to under one grey level beyond 3 cells); cells outside the
pasted ones keep the values of their last render. The difference to rendering every frame whole is
measured by ``latentcast bench temporal`` and bounded by a whole render at every keyframe and whenever
the changed cells' crops would cover most of the frame. Temporal streams render with the codec's
``temporal_g_s`` (``codec.temporal_synthesis``: by default the cheaper synthesis shipped for the codec).

The P-frame tables it decodes with are fitted by ``latentcast train temporal``
(``tools/fit_temporal_tables.py``) and shipped beside the codec
(:func:`default_tables_path`, resolved by ``latentcast.weights``).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from latentcast.proto.bitstream import Packet, SectionKind, StreamContext, is_compact
from latentcast.proto.regions import SYNTHESIS_GROW, SYNTHESIS_HALO, change_regions
from latentcast.proto.temporal import (
    BGCODE,
    CODE,
    KEEP,
    TemporalError,
    TemporalInfo,
    TemporalState,
    TemporalTables,
    decode_p,
)
from latentcast.weights import weights_path

from .codec import CodecError, LatentCodec, Reconstruction
from .latent_spaces import PixelSpace
from .synthesis_runtime import render_synthesis, resolve_render_runtime

log = logging.getLogger(__name__)

__all__ = ["MissingReference", "TemporalDecoder", "default_tables_path", "is_temporal", "SYNTHESIS_HALO",
           "SYNTHESIS_GROW"]

_HISTORY = 64  # frames of changed-cell masks kept for renders that lag behind decoding


class MissingReference(TemporalError):
    """A P frame whose reference or keyframe this decoder does not hold: ask for a keyframe."""


def default_tables_path(codec: LatentCodec) -> Path:
    """``models/weights/<codec>-temporal.safetensors`` next to the shipped codec."""
    name = codec.path.stem if codec.path is not None else codec.codec_name
    return weights_path(name, "temporal-tables")


def is_temporal(packet: Packet) -> bool:
    return SectionKind.T in packet.sections


@dataclass
class _Rendered:
    """The last whole-grid latent a stream rendered, and which decoded frame it shows."""

    frame_no: int
    key_no: int
    latent: torch.Tensor  # (1, C, rows * 16 / f, cols * 16 / f): the padded grid, not cropped to the frame
    rgb: np.ndarray | None = None  # pixel latent spaces: the latent's (rows * 16, cols * 16, 3) uint8 RGB


class TemporalDecoder:
    """One stream's decoder: keyframes and P frames in order; refuses what it cannot reconstruct exactly.

    ``tiled``: render only what changed since the last render (see the module docstring); False renders
    every frame whole. ``halo``, ``grow``: the rectangles' margins in cells; ``max_fraction``: above this
    share of the grid, a render is whole. ``runtime``: g_s on ``"onnx"`` (ONNX Runtime, ``threads``
    intra-op threads, 0 = its default), ``"torch"``, ``"bf16"`` (torch in bfloat16; models/synthesis_runtime.py)
    or ``"auto"`` (bf16 on a CPU with native bfloat16, else onnx).
    """

    def __init__(self, *, codec: LatentCodec, tables: TemporalTables, tiled: bool = True,
                 halo: int = SYNTHESIS_HALO, grow: int = SYNTHESIS_GROW, max_fraction: float = 0.6,
                 runtime: str = "auto", threads: int = 0,
                 remote_render: Callable[[np.ndarray, np.ndarray, int, int], np.ndarray] | None = None):
        if tables.M != codec.M:
            raise ValueError(f"temporal tables are for M={tables.M} channels, the codec has {codec.M}")
        if halo < 0 or grow < 0 or not 0.0 < max_fraction <= 1.0:
            raise ValueError(f"halo {halo} and grow {grow} must be >= 0 and max_fraction {max_fraction} in (0, 1]")
        # where g_s runs: ONNX Runtime (exported once per g_s), torch, or torch in bfloat16 (synthesis_runtime.py)
        self.g_s = codec.temporal_g_s  # the codec's g_s of temporal streams (codec.temporal_synthesis)
        self.runtime = resolve_render_runtime(runtime)  # auto: bf16 on a CPU with native bfloat16, else onnx
        self._synthesis = render_synthesis(self.g_s, self.runtime, threads=threads)
        self.codec, self.tables = codec, tables
        self.remote_render = remote_render  # the ray engine: (ŷ, M(ẑ), w, h) -> frame, rendered whole elsewhere
        self.tiled, self.halo, self.grow, self.max_fraction = bool(tiled), int(halo), int(grow), float(max_fraction)
        self.state: TemporalState | None = None
        self._z: torch.Tensor | None = None
        self._gz: torch.Tensor | None = None  # M(ẑ) of the keyframe, on the y grid
        self._size: tuple[int, int] | None = None
        self._stream: StreamContext | None = None  # the held keyframe's identity: what compact P frames leave out
        self.last_coded: np.ndarray | None = None  # (h, w) cells coded in the last packet
        self.counts = {"key": 0, "p": 0, "missing_reference": 0, "render_whole": 0, "render_tiled": 0,
                       "render_cells": 0}
        self._frame_no = 0  # packets decoded into the state (this decoder's own count)
        self._key_no = 0  # the _frame_no of the held keyframe
        self._changed: deque[tuple[int, np.ndarray]] = deque(maxlen=_HISTORY)  # (frame_no, cells whose ŷ changed)
        self._rendered: _Rendered | None = None
        self._render_lock = threading.Lock()

    def parse(self, data: Packet | bytes) -> Packet:
        """The packet of ``data``; a compact P frame is read in the held keyframe's context (MissingReference
        before any keyframe)."""
        if isinstance(data, Packet):
            return data
        if self._stream is None and is_compact(data):
            self.counts["missing_reference"] += 1
            raise MissingReference("a compact P frame arrived and no keyframe has been decoded")
        return Packet.from_bytes(data, stream=self._stream)

    def decode_state(self, packet: Packet | bytes) -> tuple[TemporalInfo, np.ndarray]:
        """Advance the stream's state by one packet; returns its T info and the cells coded in it."""
        packet = self.parse(packet)
        info = TemporalInfo.from_bytes(packet.sections[SectionKind.T])
        hd = packet.header
        if info.is_key:
            y_hat, z_t, tx = self.codec.decode_y(packet)
            self.state = TemporalState.from_key(y_hat[0].numpy(), info.frame_id)
            with torch.no_grad():
                gz = self.g_s.global_features(z_t.float())
            self._z, self._gz, self._size = z_t, gz, (hd.width, hd.height)
            self._stream = StreamContext.of(hd)
            self._frame_no += 1
            self._key_no = self._frame_no
            self._changed.clear()
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
        modes, sym, crc, motion = decode_p(self.state, packet.sections[SectionKind.Y], tables=self.tables,
                                       y_tables=self.codec.y_tables, rate_point=hd.rate_point,
                                       bg_rate_point=info.bg_rate_point, motion=info.has_motion)
        if crc != hd.symbol_crc:
            raise CodecError(f"symbol checksum mismatch in P frame {info.frame_id} (decoded {crc:#010x}, packet "
                             f"{hd.symbol_crc:#010x}): frame not rendered")
        steps = self.codec.rate_deltas
        self.state.apply(modes, sym, step=steps[hd.rate_point], bg_step=steps[info.bg_rate_point],
                         frame_id=info.frame_id, motion=motion)
        self.counts["p"] += 1
        self._frame_no += 1
        self._changed.append((self._frame_no, modes != KEEP))
        return info, (modes == CODE) | (modes == BGCODE)

    def decompress(self, data: bytes | Packet, *, decode_frame: bool = True) -> Reconstruction:
        """Bytes of the next packet -> :class:`Reconstruction` of the stream's current frame."""
        return self.prepare(data)(decode_frame)

    def prepare(self, data: bytes | Packet) -> Callable[[bool], Reconstruction]:
        """Decode the next packet into the state now (packets must come in order); returns
        ``render(decode_frame) -> Reconstruction`` of this frame, from a copy of the state, to run
        later and elsewhere (the cloud's worker threads; renders of one stream take turns, and one that
        comes after a later frame's is rendered whole). ``Reconstruction.mask`` is all cells: every
        cell of the state was transmitted at some point (:attr:`last_coded`: the cells of this packet)."""
        packet = self.parse(data)
        _, self.last_coded = self.decode_state(packet)
        every = np.ones(self.last_coded.shape, dtype=bool)
        y, (w, h), codec = self.state.y.copy(), self._size, self.codec
        frame_no, key_no, gz = self._frame_no, self._key_no, self._gz

        @torch.no_grad()
        def render(decode_frame: bool = True) -> Reconstruction:
            if self.remote_render is not None:
                frame = self.remote_render(y, gz[0].numpy(), w, h)
                return Reconstruction(latent=None, frame=frame, packet=packet, mask=every)
            f = codec.cfg.latent_factor
            latent, rgb = self._render(frame_no, key_no, y, gz)
            latent = latent[:, :, : -(-h // f), : -(-w // f)]
            frame = None
            if decode_frame:  # the pasted RGB (the same bytes as converting the whole latent), else convert it
                frame = rgb[:h, :w].copy() if rgb is not None else codec.latent_to_frame(latent, w, h)
            return Reconstruction(latent=latent[0].numpy(), frame=frame, packet=packet, mask=every)

        return render

    def _changed_since(self, frame_no: int, upto: int) -> np.ndarray | None:
        """Cells whose ŷ changed in frames (frame_no, upto], or None when the history no longer reaches back."""
        masks = [m for n, m in self._changed if frame_no < n <= upto]
        if len(masks) != upto - frame_no:
            return None
        out = np.zeros(self.state.y.shape[1:], dtype=bool)
        for m in masks:
            out |= m
        return out

    def _render(self, frame_no: int, key_no: int, y: np.ndarray,
                gz: torch.Tensor) -> tuple[torch.Tensor, np.ndarray | None]:
        """g_s of the state ``y`` of decoded frame ``frame_no`` (keyframe ``key_no``): the padded grid's latent,
        and with a pixel latent space its RGB, converted only where the latent was pasted (None otherwise)."""
        synthesis = self._synthesis
        space = self.codec.latent_space()
        pixels = isinstance(space, PixelSpace) and 16 % space.factor == 0  # each cell's pixels from its own latent

        def y_t(rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:  # float32, only what is cut
            return torch.from_numpy(y[:, rows, cols])[None].float()

        with self._render_lock:
            last = self._rendered
            regions = None
            if self.tiled and last is not None and last.key_no == key_no and last.frame_no <= frame_no:
                changed = self._changed_since(last.frame_no, frame_no)
                if changed is not None:
                    regions = change_regions(changed, halo=self.halo, grow=self.grow, max_fraction=self.max_fraction)
            rgb = None
            if regions is None:
                latent = synthesis(y_t(), torch.ones(1, 1, *y.shape[1:]), gz)
                if pixels:
                    rgb = space.to_rgb8(latent, y.shape[2] * 16, y.shape[1] * 16)
                self.counts["render_whole"] += 1
            else:
                f = 16 // self.codec.cfg.latent_factor
                latent = last.latent.clone()
                rgb = last.rgb.copy() if pixels and last.rgb is not None else None
                for reg in regions:
                    R0, R1, C0, C1 = reg.crop
                    r0, r1, c0, c1 = reg.inner
                    dr, dc = reg.offset
                    part = synthesis(y_t(slice(R0, R1), slice(C0, C1)), torch.ones(1, 1, R1 - R0, C1 - C0),
                                     gz[:, :, R0:R1, C0:C1], keep=(dr, dr + r1 - r0, dc, dc + c1 - c0))
                    latent[:, :, r0 * f: r1 * f, c0 * f: c1 * f] = part
                    if rgb is not None:
                        rgb[r0 * 16: r1 * 16, c0 * 16: c1 * 16] = space.to_rgb8(part, (c1 - c0) * 16, (r1 - r0) * 16)
                    self.counts["render_cells"] += reg.crop_cells
                self.counts["render_tiled"] += 1
            if last is None or last.key_no != key_no or last.frame_no < frame_no:
                self._rendered = _Rendered(frame_no=frame_no, key_no=key_no, latent=latent, rgb=rgb)
        return latent, rgb
