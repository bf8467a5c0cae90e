"""Coding order of the latent symbols, shared by the edge encoder and the cloud decoder (numpy only).

A frame's symbols are two sections:

- ``Z``: the hyper-latent ẑ, all of it, channel by channel, each channel with
  its own factorized-prior table.
- ``Y``: the latent ŷ in ``2 x len(groups)`` steps: for each channel group, the
  anchor cells of the checkerboard, then the other cells. In a step, only the
  cells inside the ROI mask are coded, channel-major then row-major, each with
  the Gaussian table its integer scale index names.

The symbol checksum (``symbol_crc`` in the packet header) is the CRC32 of the
int32 little-endian symbols in that same order (Z first), so the decoder can
prove it recovered exactly what the encoder coded.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .bitstream import Packet, PacketHeader, Roi, SectionKind
from .entropy import SymbolDecoder, SymbolEncoder, TableSet
from .grid import anchor_mask, coded_cells
from .temporal import TemporalInfo

__all__ = ["coding_steps", "rate_steps_of", "quantize_z", "quantize_y", "check_rdoq", "codec_rdoq", "RDOQ_LAMBDA",
           "RDOQ_RADIUS", "check_frame", "parse_background", "describe_levels", "FrameCompressor", "LatentEncoder",
           "LatentDecoder"]

BACKGROUND_NONE = "none"  # the background level of ROI-only packets: the cloud fills it from the hyperprior


def parse_background(value: str | int | None) -> int | None:
    """A background level as users write it (``none`` or a rate point) -> None or the rate point.
    Whether the rate point fits a codec is checked where the codec is known (``check_background``)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in (BACKGROUND_NONE, "")):
        return None
    if isinstance(value, bool):
        raise ValueError(f"background {value!r}: expected '{BACKGROUND_NONE}' or a rate point 0, 1, ...")
    try:
        level = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"background {value!r}: expected '{BACKGROUND_NONE}' or a rate point 0, 1, ...") from None
    if level < 0 or (isinstance(value, float) and value != level):
        raise ValueError(f"background {value!r}: expected '{BACKGROUND_NONE}' or a rate point 0, 1, ...")
    return level


def describe_levels(header: PacketHeader) -> dict:
    """The quantization levels a packet codes: the ROIs' rate point and the background's
    (a rate point, ``none`` for ROI-only packets, or ``full frame``)."""
    if not header.roi_only:
        return {"roi": header.rate_point, "background": "full frame"}
    bg = header.bg_rate_point
    return {"roi": header.rate_point, "background": BACKGROUND_NONE if bg is None else bg}


def quantize_z(z: np.ndarray, step: float) -> np.ndarray:
    """The encoder's choice of hyper-latent symbols: ``floor(z / step + 1/2)`` (int64)."""
    return np.floor(np.asarray(z, dtype=np.float64) / step + 0.5).astype(np.int64)


# The encoder's choice of y symbols (rate-distortion optimized quantization). Of the two integers around
# r = (y - μ)/Δ it keeps the one with the smaller  (r - s)² + λ·bits(s)  under the symbol's own table: the
# squared rounding error in quantization steps against the bits (TableSet.code_lengths). λ = 0 is plain
# rounding, floor(r + 1/2). The decoder does not change: it decodes whichever symbol was sent.
RDOQ_LAMBDA = 0.05  # the encoder's λ for a codec whose release records none (codec_rdoq): results/rdoq
RDOQ_RADIUS = 32  # symbols beyond ±this cost what ±this costs (the choice there is the rounding's)


def check_rdoq(value: float, default: float | str = "unset, the codec's own") -> float:
    """A λ of :func:`quantize_y` as users give it: a finite number >= 0 (``default``: the caller's, for the error)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
        raise ValueError(f"rdoq {value!r} out of range: a number >= 0 (0 = plain rounding; default {default})")
    return float(value)


def codec_rdoq(meta: Mapping[str, Any]) -> float:
    """The λ a codec is coded with unless the user says otherwise (edge ``codec.rdoq`` unset): the one its release
    recorded (``meta["rdoq"]`` of the weight file, or of the edge bundle's manifest: ``release codec --rdoq``,
    which calibrates the table offsets for it), else :data:`RDOQ_LAMBDA`."""
    value = meta.get("rdoq")
    return RDOQ_LAMBDA if value is None else check_rdoq(value)


def quantize_y(r: np.ndarray, table: np.ndarray, lengths: np.ndarray, lam: float) -> np.ndarray:
    """The y symbols (float64 integers) of ``r`` = (y - μ)/Δ, each coded with table ``table`` (same shape), under
    ``lengths`` = ``TableSet.code_lengths(RDOQ_RADIUS)``, with λ ``lam`` (see :data:`RDOQ_LAMBDA`).
    ``models/export.py`` builds the same choice into the edge's ONNX graph."""
    r = np.asarray(r, dtype=np.float64)
    if lam == 0:
        return np.floor(r + 0.5)
    lo = np.floor(r)
    hi = lo + 1
    width = lengths.shape[1]
    t = np.asarray(table, dtype=np.int64) * width

    def cost(s: np.ndarray, err: np.ndarray) -> np.ndarray:
        at = t + (np.clip(s, -RDOQ_RADIUS, RDOQ_RADIUS) + RDOQ_RADIUS).astype(np.int64)
        return err * err + lam * lengths.ravel()[at]

    return np.where(cost(hi, hi - r) <= cost(lo, r - lo), hi, lo)


def rate_steps_of(table) -> list[float] | list[np.ndarray]:
    """Each rate point's quantization step from a codec's ``rate_delta`` table (a weight file's tensor or
    an edge manifest's list): (n,) gives floats, (n, M) (channel gains) gives (M,1,1) float64 arrays that
    broadcast over a latent (M,h,w)."""
    t = np.asarray(table, dtype=np.float64)
    if t.ndim == 1:
        return [float(d) for d in t]
    if t.ndim != 2:
        raise ValueError(f"rate_delta table has shape {t.shape}: expected (rate points,) or (rate points, M)")
    return [row.reshape(-1, 1, 1).copy() for row in t]


def coding_steps(groups: Sequence[int]) -> list[tuple[int, slice, bool]]:
    """(group index, channel slice, anchor?) for every step in decoding order."""
    out, s = [], 0
    for k, c in enumerate(groups):
        sl = slice(s, s + c)
        out += [(k, sl, True), (k, sl, False)]
        s += c
    return out


def _crc(crc: int, values: np.ndarray) -> int:
    return zlib.crc32(np.asarray(values, dtype="<i4").tobytes(), crc)


def _cells(tx_mask: np.ndarray, anchor: bool) -> np.ndarray:
    a = anchor_mask(*tx_mask.shape)
    return tx_mask & (a if anchor else ~a)


class LatentEncoder:
    """Codes a frame's symbols into the Z and Y sections and computes the symbol CRC."""

    def __init__(self, *, groups: Sequence[int], y_tables: TableSet, z_tables: TableSet, codec_id: int = 0,
                 weights_hash: bytes = b"", latent_space_id: int = 0):
        self.groups = tuple(groups)
        self.y_tables, self.z_tables = y_tables, z_tables
        self.codec_id, self.weights_hash, self.latent_space_id = codec_id, weights_hash, latent_space_id

    def packet(self, *, width: int, height: int, rois: Sequence[Roi], roi_only: bool, rate_point: int,
               z_sym: np.ndarray, y_sym: np.ndarray, y_table: np.ndarray, tx_mask: np.ndarray,
               label_set_hash: bytes = b"\0\0\0\0", temporal: TemporalInfo | None = None,
               bg_rate_point: int | None = None) -> bytes:
        """Code the symbols and wrap them in a versioned packet (see ``bitstream``); ``temporal``
        adds the T section of a temporal keyframe; ``bg_rate_point`` names the rate point the
        cells outside the ROIs were coded at (``tx_mask`` then covers them too).

        The z tables are laid out rate point by rate point: table ``rate_point * Nz + c``."""
        zb, yb, crc = self.encode(z_sym=z_sym, y_sym=y_sym, y_table=y_table, tx_mask=tx_mask,
                                  z_table_base=rate_point * z_sym.shape[0])
        sections = {SectionKind.Z: zb, SectionKind.Y: yb}
        if temporal is not None:
            sections[SectionKind.T] = temporal.to_bytes()
        return self._wrap(width=width, height=height, rois=rois, roi_only=roi_only, rate_point=rate_point, crc=crc,
                          label_set_hash=label_set_hash, sections=sections, bg_rate_point=bg_rate_point)

    def _wrap(self, *, width: int, height: int, rois: Sequence[Roi], roi_only: bool, rate_point: int, crc: int,
              label_set_hash: bytes, sections: dict, bg_rate_point: int | None = None, compact: bool = False) -> bytes:
        header = PacketHeader(codec_id=self.codec_id, weights_hash=self.weights_hash, rate_point=rate_point,
                              latent_space_id=self.latent_space_id, width=width, height=height,
                              label_set_hash=label_set_hash, symbol_crc=crc, roi_only=roi_only, rois=tuple(rois),
                              bg_rate_point=bg_rate_point)
        return Packet(header=header, sections=sections, compact=compact).to_bytes()

    def p_packet(self, *, width: int, height: int, rate_point: int, y_bytes: bytes, crc: int, temporal: TemporalInfo,
                 rois: Sequence[Roi] = (), label_set_hash: bytes = b"\0\0\0\0", compact: bool = False) -> bytes:
        """A temporal P frame: the T and Y sections of ``proto.temporal.encode_p``, no Z. ``compact``: in the
        compact container (LCF version 3), which its reader parses in the stream's context."""
        return self._wrap(width=width, height=height, rois=rois, roi_only=True, rate_point=rate_point, crc=crc,
                          label_set_hash=label_set_hash, sections={SectionKind.T: temporal.to_bytes(),
                                                                   SectionKind.Y: y_bytes}, compact=compact)

    def encode(
        self, *, z_sym: np.ndarray, y_sym: np.ndarray, y_table: np.ndarray, tx_mask: np.ndarray,
        z_table_base: int = 0,
    ) -> tuple[bytes, bytes, int]:
        """``z_sym`` (Cz,hz,wz), channel c coded with z table ``z_table_base + c``; ``y_sym``,
        ``y_table`` (M,h,w); ``tx_mask`` (h,w) bool. Returns (Z bytes, Y bytes, symbol CRC)."""
        if y_sym.shape != y_table.shape or y_sym.shape[1:] != tx_mask.shape:
            raise ValueError(f"shapes differ: y_sym {y_sym.shape}, y_table {y_table.shape}, mask {tx_mask.shape}")
        if z_table_base < 0 or z_table_base + z_sym.shape[0] > len(self.z_tables):
            raise ValueError(f"z tables {z_table_base}..{z_table_base + z_sym.shape[0] - 1} do not exist "
                             f"(the prior has {len(self.z_tables)} tables)")
        crc = 0
        zenc = SymbolEncoder()
        zt = np.broadcast_to(z_table_base + np.arange(z_sym.shape[0]).reshape(-1, 1, 1), z_sym.shape)
        zenc.encode(z_sym.ravel(), zt.ravel(), self.z_tables)
        crc = _crc(crc, z_sym.ravel())
        yenc = SymbolEncoder()
        for _k, sl, anchor in coding_steps(self.groups):
            cells = _cells(tx_mask, anchor)
            vals = y_sym[sl][:, cells].ravel()
            yenc.encode(vals, y_table[sl][:, cells].ravel(), self.y_tables)
            crc = _crc(crc, vals)
        return zenc.to_bytes(), yenc.to_bytes(), crc


class LatentDecoder:
    """Decodes Z at once and Y step by step (the caller computes each step's tables in between)."""

    def __init__(
        self, *, groups: Sequence[int], y_tables: TableSet, z_tables: TableSet, z_bytes: bytes, y_bytes: bytes
    ):
        self.groups = tuple(groups)
        self.y_tables, self.z_tables = y_tables, z_tables
        self._z = SymbolDecoder(z_bytes)
        self._y = SymbolDecoder(y_bytes)
        self.crc = 0

    def decode_z(self, shape: tuple[int, int, int], z_table_base: int = 0) -> np.ndarray:
        if z_table_base < 0 or z_table_base + shape[0] > len(self.z_tables):
            raise ValueError(f"z tables {z_table_base}..{z_table_base + shape[0] - 1} do not exist")
        zt = np.broadcast_to(z_table_base + np.arange(shape[0]).reshape(-1, 1, 1), shape)
        z = self._z.decode(zt.ravel(), self.z_tables).reshape(shape)
        self.crc = _crc(self.crc, z.ravel())
        return z

    def decode_step(
        self, *, sl: slice, anchor: bool, y_table: np.ndarray, tx_mask: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Symbols of one step: returns (values, cells) where ``values`` has shape (channels, cells.sum())."""
        cells = _cells(tx_mask, anchor)
        t = y_table[:, cells]  # y_table is the group's (C,h,w) table indices
        vals = self._y.decode(t.ravel(), self.y_tables)
        self.crc = _crc(self.crc, vals)
        return vals.reshape(t.shape), cells


def check_frame(frame: np.ndarray) -> None:
    """Raise ``ValueError`` naming the value unless ``frame`` is an (H, W, 3) uint8 RGB array."""
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8 \
            or frame.shape[0] < 1 or frame.shape[1] < 1:
        desc = f"{type(frame).__name__} {getattr(frame, 'shape', '')} {getattr(frame, 'dtype', '')}"
        raise ValueError(f"frame must be an (H, W, 3) uint8 RGB array, got {desc}")


class FrameCompressor:
    """``compress`` for any backend: the edge's ONNX Runtime encoder and the cloud's PyTorch codec
    supply ``analyze``, ``z_symbols``, ``encode_symbols``, ``n_rates`` and a :class:`LatentEncoder`
    (``_enc``); the frame, ROI, mask and packet handling here is the one both share."""

    n_rates: int
    M: int  # latent channels
    rate_deltas: Sequence[float] | Sequence[np.ndarray]  # Δ_q of each rate point ((M,1,1) with channel gains)
    y_tables: TableSet  # the Gaussian tables of y (temporal P frames use them too)
    _enc: LatentEncoder

    def p_packet(self, **kwargs) -> bytes:
        """:meth:`LatentEncoder.p_packet` with this codec's identity."""
        return self._enc.p_packet(**kwargs)

    def analyze(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """y (M,h,w) and z (Nz,hz,wz), float32."""
        raise NotImplementedError

    def z_symbols(self, z: np.ndarray, rate_point: int) -> np.ndarray:
        raise NotImplementedError

    def encode_symbols(self, y: np.ndarray, z_sym: np.ndarray, *, rate_point: int,
                       tx_mask: np.ndarray, cell_rate: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """y symbols and table indices (both (M,h,w) int64; only cells in ``tx_mask`` matter).
        ``cell_rate`` (h,w): each cell's rate point (default: ``rate_point`` everywhere)."""
        raise NotImplementedError

    def encode_symbols_y_hat(self, y: np.ndarray, z_sym: np.ndarray, *, rate_point: int,
                             tx_mask: np.ndarray, cell_rate: np.ndarray | None = None
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`encode_symbols` and the decoded latent ŷ (M,h,w) float64 (exact: the decoder's)."""
        raise NotImplementedError

    def compress_key(self, frame: np.ndarray, *, rate_point: int, temporal: TemporalInfo, rois: Sequence[Roi] = (),
                     label_set_hash: bytes = b"\0\0\0\0", analysis: tuple[np.ndarray, np.ndarray] | None = None,
                     background: int | None = None) -> tuple[bytes, np.ndarray]:
        """A temporal keyframe: every cell coded, plus the T section; returns (packet bytes, ŷ).
        ``analysis``: the frame's (y, z) if already computed. ``background``: the rate point (``0..rate_point``)
        of the cells outside the ROIs (an LCF v2 packet, as :meth:`compress`'s); None: every cell at
        ``rate_point``."""
        data, y_hat = self._intra(frame, rois, rate_point=rate_point, roi_only=background is not None,
                                  label_set_hash=label_set_hash, temporal=temporal, analysis=analysis,
                                  with_y_hat=True, background=background)
        return data, np.asarray(y_hat, dtype=np.float64)

    def check_rate(self, rate_point: int) -> int:
        if not isinstance(rate_point, (int, np.integer)) or not 0 <= int(rate_point) < self.n_rates:
            raise ValueError(f"rate_point {rate_point!r} out of range 0..{self.n_rates - 1}")
        return int(rate_point)

    def check_background(self, background: int | None, rate_point: int) -> int | None:
        """A background level: None (not coded) or a rate point ``0..rate_point``; precise error otherwise."""
        if background is None:
            return None
        if isinstance(background, bool) or not isinstance(background, (int, np.integer)) \
                or not 0 <= int(background) <= rate_point:
            raise ValueError(f"background {background!r} out of range: None (ROIs only) or a rate point "
                             f"0..{rate_point} (at most the ROIs' rate point {rate_point})")
        return int(background)

    def compress(self, frame: np.ndarray, rois: Sequence[Roi] = (), *, rate_point: int = 0,
                 roi_only: bool | None = None, label_set_hash: bytes = b"\0\0\0\0",
                 background: int | None = None) -> bytes:
        """One RGB frame (H,W,3 uint8) -> packet bytes. With ROIs, ``roi_only`` (default: True when
        ROIs are given) codes only their latent cells (+ margin); z is always coded. ``background``:
        with ``roi_only``, the rate point (``0..rate_point``) the other cells are coded at (an LCF v2
        packet); None leaves them out (the cloud fills them from the hyperprior)."""
        rois = tuple(rois)
        roi_only = bool(rois) if roi_only is None else roi_only
        return self._intra(frame, rois, rate_point=rate_point, roi_only=roi_only, label_set_hash=label_set_hash,
                           background=background)[0]

    def _intra(self, frame: np.ndarray, rois: Sequence[Roi], *, rate_point: int, roi_only: bool, label_set_hash: bytes,
               temporal: TemporalInfo | None = None, analysis: tuple[np.ndarray, np.ndarray] | None = None,
               with_y_hat: bool = False, background: int | None = None) -> tuple[bytes, np.ndarray | None]:
        """The intra packet both ``compress`` and ``compress_key`` make; ŷ too when ``with_y_hat``."""
        check_frame(frame)
        rate_point = self.check_rate(rate_point)
        background = self.check_background(background, rate_point) if roi_only else None
        h, w = frame.shape[:2]
        rois = tuple(rois)
        y, z = analysis if analysis is not None else self.analyze(frame)
        z_sym = self.z_symbols(z, rate_point)
        tx, cell_rate = coded_cells(w, h, [(r.x0, r.y0, r.x1, r.y1) for r in rois], roi_only=roi_only,
                                    rate_point=rate_point, bg_rate_point=background)
        kw = {} if background is None else {"cell_rate": cell_rate}
        y_hat = None
        if with_y_hat:
            y_sym, y_tab, y_hat = self.encode_symbols_y_hat(y, z_sym, rate_point=rate_point, tx_mask=tx, **kw)
        else:
            y_sym, y_tab = self.encode_symbols(y, z_sym, rate_point=rate_point, tx_mask=tx, **kw)
        data = self._enc.packet(width=w, height=h, rois=rois, roi_only=roi_only, rate_point=rate_point, z_sym=z_sym,
                                y_sym=y_sym, y_table=y_tab, tx_mask=tx, label_set_hash=label_set_hash,
                                temporal=temporal, bg_rate_point=background)
        return data, y_hat
