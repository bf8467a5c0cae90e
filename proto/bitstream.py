"""LCF v1/v2: the versioned frame-packet container.

One packet carries one coded frame: a fixed header (codec identity, frame size,
rate point, checksums), a table of regions of interest, a table of sections and the
section payloads, followed by a CRC32 of everything before it. All integers are
little-endian; every count and length is bounded.

Byte layout::

    offset  field
    0       magic            4 bytes  b"LCF\\x00"
    4       version          u8       = 1, or 2 when the packet codes a background (below)
    5       flags            u8       bit0 = has_roi_mask_only (packet codes only the
                                      ROI regions of y); other bits must be 0
    6       codec_id         u16      registry id of the codec architecture (nonzero)
    8       weights_hash     8 bytes  first 8 bytes of sha256 of the codec weights
    16      rate_point       u8       index of the rate point / quality (0..254)
    17      latent_space_id  u8
    18      width            u16      frame width in pixels, 1..16384
    20      height           u16      frame height in pixels, 1..16384
    22      label_set_hash   4 bytes  identifies the label list the ROI label ids
                                      refer to (all zero = none)
    26      symbol_crc       u32      CRC32 of the decoded quantized symbols (checked
                                      by the codec after entropy decoding, not here)
    30      n_rois           u16      0..MAX_ROIS (= 1024)
    32      n_sections       u8       1..MAX_SECTIONS (= 16)
    (33     bg_rate_point    u8       version 2 only: the rate point of the cells outside
                                      the ROIs, 0..rate_point; needs roi_only. The ROI
                                      cells are coded at rate_point, every other cell at
                                      this coarser step: ROI-QP, as in H.264/H.265 and
                                      MPEG's video coding for machines. Every offset
                                      below moves by one byte.)
    33      ROI table        n_rois x 12 bytes:
                                      x0 u16, y0 u16, x1 u16, y1 u16, label_id u16,
                                      score u8 (round(confidence * 255)), reserved u8 (= 0)
                                      with 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height
    ...     section table    n_sections x 5 bytes: kind u8, length u32
                                      kind: 1 = Z (hyperprior), 2 = Y (latent symbols),
                                      3 = META (free bytes), 4 = T (temporal: frame,
                                      reference and keyframe ids, see proto.temporal);
                                      unknown kinds are rejected;
                                      each kind at most once; each length <=
                                      MAX_SECTION_BYTES (= 64 MiB); the lengths sum to
                                      exactly the bytes between the table and the CRC
    ...     section payloads, concatenated in table order
    end-4   crc32            u32      zlib.crc32 of every byte before it

A writer emits version 1 for every packet without a background (so those bytes are
exactly what v1 writers made) and version 2 only for packets with one; readers accept
both.

Version 3 is the compact form of a temporal P frame (``Packet.compact``). Everything a
P frame shares with its stream's keyframe (codec, weights, latent space, frame size,
label set) is left out, and so is the section table: a P frame always has exactly a T
and a Y section, and the T section's reference is the previous frame. 26 bytes of
container instead of 61::

    offset  field
    0       magic            4 bytes  b"LCF\x00"
    4       version          u8       = 3
    5       flags            u8       = 0x01 (roi_only; other bits must be 0)
    6       rate_point       u8       of the P frame's coded cells (0..254)
    7       bg_rate_point    u8       of its background updates (0..254)
    8       frame_id         u32      this frame; it is predicted from frame_id - 1 (mod 2**32)
    12      key_id           u32      the keyframe whose background it uses
    16      symbol_crc       u32
    20      n_rois           u16      0..MAX_ROIS
    22      ROI table        n_rois x 12 bytes, as in version 1
    ...     Y payload        every byte up to the CRC
    end-4   crc32            u32

A reader needs the stream's :class:`StreamContext` (its keyframe's identity) to turn a
compact packet into a :class:`Packet`; without it, parsing refuses with a
:class:`BitstreamError` that says so. The parsed packet is the same :class:`Packet` a
version 1 P frame gives (its T section rebuilt), with ``compact`` set so that it writes
back to the same bytes.

Parsing order: packet length (against ``max_packet_bytes`` and the 26-byte minimum;
42 bytes for versions 1 and 2),
magic, version, CRC32, then the fields in layout order. Every count and length is
checked against its maximum and against the bytes actually remaining before anything
is sliced or allocated, so a hostile packet costs at most O(len(data)) work and memory.

Every rejection, on reading or on writing, raises :class:`BitstreamError` (a
``ValueError``) whose message names the field, quotes the bad value and the valid
range. ``to_bytes`` writes sections in ascending kind order (Z, Y, META), so equal
packets give equal bytes; ``from_bytes`` accepts any table order.

This module imports the standard library only.
"""

from __future__ import annotations

import enum
import numbers
import operator
import reprlib
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MAGIC",
    "VERSION",
    "VERSIONS",
    "VERSION_COMPACT_P",
    "MAX_ROIS",
    "MAX_SECTIONS",
    "MAX_SECTION_BYTES",
    "MAX_DIM",
    "MAX_PACKET_BYTES",
    "MAX_DECODE_PIXELS",
    "HEADER_BYTES",
    "ROI_ENTRY_BYTES",
    "SECTION_ENTRY_BYTES",
    "CRC_BYTES",
    "MIN_PACKET_BYTES",
    "COMPACT_HEADER_BYTES",
    "MIN_COMPACT_PACKET_BYTES",
    "T_SECTION",
    "StreamContext",
    "is_compact",
    "FLAG_ROI_ONLY",
    "FLAG_MOTION",
    "BitstreamError",
    "SectionKind",
    "Roi",
    "PacketHeader",
    "Packet",
    "pack",
    "unpack",
    "describe",
]

MAGIC = b"LCF\x00"
VERSION = 3  # the newest version this module reads and writes
VERSIONS = (1, 2, 3)  # every version it reads
VERSION_COMPACT_P = 3  # the compact temporal P frame
MAX_ROIS = 1024
MAX_SECTIONS = 16
MAX_SECTION_BYTES = 64 * 1024 * 1024
MAX_DIM = 16384
#: Default bound on a whole packet accepted by :func:`unpack`.
MAX_PACKET_BYTES = 64 * 1024 * 1024
#: Frames larger than this (width x height) are refused by the decoder before any allocation, and by
#: the encoders before any work (the format itself allows MAX_DIM x MAX_DIM).
MAX_DECODE_PIXELS = 4096 * 2304

FLAG_ROI_ONLY = 0x01
_KNOWN_FLAGS = FLAG_ROI_ONLY
FLAG_MOTION = 0x02  # version 3 only: the compact P frame is a P_MC frame (T kind 2: its CODE cells carry motion)

_HEADER = struct.Struct("<4sBBH8sBBHH4sIHB")
_ROI = struct.Struct("<HHHHHBB")
_SECTION = struct.Struct("<BI")
_CRC = struct.Struct("<I")
_V2_EXTRA = struct.Struct("<B")  # version 2: bg_rate_point after the fixed header
_COMPACT = struct.Struct("<4sBBBBIIIH")  # version 3: the compact P frame's header
#: The T (temporal) section's payload: kind u8, frame_id u32, ref_id u32, key_id u32, bg_rate_point u8
#: (``proto.temporal.TemporalInfo``). Version 3 rebuilds it from its own fields.
T_SECTION = struct.Struct("<BIIIB")
_T_KIND_P, _T_KIND_P_MC = 1, 2

HEADER_BYTES = _HEADER.size  # 33
ROI_ENTRY_BYTES = _ROI.size  # 12
SECTION_ENTRY_BYTES = _SECTION.size  # 5
CRC_BYTES = _CRC.size  # 4
#: Fixed header + one section table entry + CRC trailer (versions 1 and 2).
MIN_PACKET_BYTES = HEADER_BYTES + SECTION_ENTRY_BYTES + CRC_BYTES  # 42
COMPACT_HEADER_BYTES = _COMPACT.size  # 22
#: The shortest packet of any version: a compact P frame without ROIs and with an empty Y section.
MIN_COMPACT_PACKET_BYTES = COMPACT_HEADER_BYTES + CRC_BYTES  # 26

_U8 = 0xFF
_U16 = 0xFFFF
_U32 = 0xFFFFFFFF
_MAX_RATE_POINT = 254
_WEIGHTS_HASH_BYTES = 8
_LABEL_SET_HASH_BYTES = 4

assert HEADER_BYTES == 33 and ROI_ENTRY_BYTES == 12 and SECTION_ENTRY_BYTES == 5 and COMPACT_HEADER_BYTES == 22


class BitstreamError(ValueError):
    """A packet (or a packet about to be written) violates the LCF format."""


class SectionKind(enum.IntEnum):
    """Kinds of section payload; each appears at most once per packet."""

    Z = 1  # hyperprior symbols
    Y = 2  # latent symbols
    META = 3  # free bytes
    T = 4  # temporal: frame id, reference and keyframe it depends on (proto.temporal.TemporalInfo)


_VALID_KINDS = ", ".join(f"{k.value}={k.name}" for k in SectionKind)

_short = reprlib.Repr()
_short.maxstring = 40
_short.maxother = 40


# ----------------------------------------------------------------------------- checks


def _err(msg: str) -> BitstreamError:
    return BitstreamError(msg)


def _as_int(name: str, value: Any, lo: int, hi: int) -> int:
    """Return ``value`` as a Python int (type check only; the range is for the message)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _err(
            f"{name} must be an integer in range {lo}..{hi}, "
            f"got {type(value).__name__} {_short.repr(value)}"
        )
    return operator.index(value)


def _check_int(name: str, value: Any, lo: int, hi: int, note: str = "") -> int:
    """Return ``value`` as a Python int in ``lo..hi`` or raise BitstreamError."""
    v = _as_int(name, value, lo, hi)
    if not lo <= v <= hi:
        raise _err(f"{name} {v} out of range {lo}..{hi}{note}")
    return v


def _check_bytes(name: str, value: Any, size: int | None = None, max_size: int | None = None) -> bytes:
    """Return ``value`` as ``bytes`` (exact ``size`` or at most ``max_size``)."""
    if isinstance(value, str) or not isinstance(value, (bytes, bytearray, memoryview)):
        raise _err(f"{name} must be bytes-like, got {type(value).__name__} {_short.repr(value)}")
    b = bytes(value)
    if size is not None and len(b) != size:
        raise _err(f"{name} must be exactly {size} bytes, got {len(b)} bytes ({_short.repr(b)})")
    if max_size is not None and len(b) > max_size:
        raise _err(f"{name} length {len(b)} out of range 0..{max_size}")
    return b


def _check_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"):
        return bool(value)
    if isinstance(value, numbers.Integral) and operator.index(value) in (0, 1):
        return bool(operator.index(value))
    raise _err(f"{name} must be a bool (True/False), got {type(value).__name__} {_short.repr(value)}")


def _check_kind(name: str, value: Any) -> SectionKind:
    if isinstance(value, SectionKind):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        v = operator.index(value)
        if v in SectionKind._value2member_map_:
            return SectionKind(v)
        raise _err(f"unknown {name} {v} (valid: {_VALID_KINDS})")
    raise _err(f"unknown {name} {_short.repr(value)} (valid: {_VALID_KINDS})")


def _check_roi_box(prefix: str, x0: int, y0: int, x1: int, y1: int, width: int, height: int) -> None:
    """Check 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height (values already ints)."""
    _check_int(f"{prefix}x0", x0, 0, width - 1, " (need 0 <= x0 < x1 <= width)")
    _check_int(f"{prefix}x1", x1, x0 + 1, width, " (need 0 <= x0 < x1 <= width)")
    _check_int(f"{prefix}y0", y0, 0, height - 1, " (need 0 <= y0 < y1 <= height)")
    _check_int(f"{prefix}y1", y1, y0 + 1, height, " (need 0 <= y0 < y1 <= height)")


# ------------------------------------------------------------------------- data model


@dataclass(frozen=True, kw_only=True)
class Roi:
    """A region of interest in pixel coordinates, half-open: [x0, x1) x [y0, y1).

    ``score`` is the detector confidence in [0, 1]; on the wire it is stored as
    ``round(score * 255)``, so a parsed Roi carries ``score_u8 / 255``.
    """

    x0: int
    y0: int
    x1: int
    y1: int
    label_id: int = 0
    score: float = 1.0

    def __post_init__(self) -> None:
        self._validate("")

    def _validate(self, prefix: str) -> None:
        for name in ("x0", "y0", "x1", "y1"):
            object.__setattr__(self, name, _as_int(f"{prefix}{name}", getattr(self, name), 0, MAX_DIM))
        _check_roi_box(prefix, self.x0, self.y0, self.x1, self.y1, MAX_DIM, MAX_DIM)
        object.__setattr__(self, "label_id", _check_int(f"{prefix}label_id", self.label_id, 0, _U16))
        s = self.score
        if isinstance(s, bool) or not isinstance(s, numbers.Real):
            raise _err(
                f"{prefix}score must be a real number in range 0.0..1.0, "
                f"got {type(s).__name__} {_short.repr(s)}"
            )
        s = float(s)
        if not 0.0 <= s <= 1.0:  # also rejects NaN
            raise _err(f"{prefix}score {s!r} out of range 0.0..1.0")
        object.__setattr__(self, "score", s)

    @property
    def score_u8(self) -> int:
        """The score as stored on the wire: ``round(score * 255)`` in 0..255."""
        return round(self.score * 255)


@dataclass(frozen=True, kw_only=True)
class PacketHeader:
    """Everything in a packet except the section payloads."""

    codec_id: int
    weights_hash: bytes
    rate_point: int
    latent_space_id: int
    width: int
    height: int
    label_set_hash: bytes = b"\0\0\0\0"
    symbol_crc: int = 0
    roi_only: bool = False
    rois: tuple[Roi, ...] = ()
    bg_rate_point: int | None = None  # rate point of the cells outside the ROIs (None: not coded); needs roi_only

    @property
    def version(self) -> int:
        """The LCF version this header is written in: 2 only when it codes a background."""
        return 1 if self.bg_rate_point is None else 2

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise BitstreamError unless every field is valid (normalises numpy scalars)."""
        put = object.__setattr__
        put(self, "codec_id", _check_int("codec_id", self.codec_id, 1, _U16))
        put(self, "weights_hash", _check_bytes("weights_hash", self.weights_hash, size=_WEIGHTS_HASH_BYTES))
        put(self, "rate_point", _check_int("rate_point", self.rate_point, 0, _MAX_RATE_POINT))
        put(self, "latent_space_id", _check_int("latent_space_id", self.latent_space_id, 0, _U8))
        put(self, "width", _check_int("width", self.width, 1, MAX_DIM))
        put(self, "height", _check_int("height", self.height, 1, MAX_DIM))
        put(self, "label_set_hash", _check_bytes("label_set_hash", self.label_set_hash, size=_LABEL_SET_HASH_BYTES))
        put(self, "symbol_crc", _check_int("symbol_crc", self.symbol_crc, 0, _U32))
        put(self, "roi_only", _check_bool("roi_only", self.roi_only))
        if self.bg_rate_point is not None:
            note = f" (the background is coded at most as finely as the ROIs: rate_point {self.rate_point})"
            put(self, "bg_rate_point", _check_int("bg_rate_point", self.bg_rate_point, 0, self.rate_point, note))
            if not self.roi_only:
                raise _err(f"bg_rate_point {self.bg_rate_point} needs roi_only (a full-frame packet codes every "
                           "cell at rate_point)")
        rois = self.rois
        if isinstance(rois, (str, bytes, bytearray, Mapping)) or not hasattr(rois, "__iter__"):
            raise _err(f"rois must be a sequence of Roi, got {type(rois).__name__}")
        rois = tuple(rois)
        if len(rois) > MAX_ROIS:
            raise _err(f"n_rois {len(rois)} out of range 0..{MAX_ROIS}")
        for i, roi in enumerate(rois):
            if not isinstance(roi, Roi):
                raise _err(f"rois[{i}] must be a Roi, got {type(roi).__name__} {_short.repr(roi)}")
            roi._validate(f"rois[{i}].")  # re-check: frozen objects can still be forced
            _check_roi_box(f"rois[{i}].", roi.x0, roi.y0, roi.x1, roi.y1, self.width, self.height)
        put(self, "rois", rois)

    @property
    def flags(self) -> int:
        return FLAG_ROI_ONLY if self.roi_only else 0


@dataclass(frozen=True, kw_only=True)
class StreamContext:
    """What a compact P frame (version 3) leaves out: the identity its stream's keyframe carries."""

    codec_id: int
    weights_hash: bytes
    latent_space_id: int
    width: int
    height: int
    label_set_hash: bytes = b"\0\0\0\0"

    @classmethod
    def of(cls, header: PacketHeader) -> StreamContext:
        """The context of the stream a packet with ``header`` (e.g. its keyframe) belongs to."""
        return cls(codec_id=header.codec_id, weights_hash=header.weights_hash, latent_space_id=header.latent_space_id,
                   width=header.width, height=header.height, label_set_hash=header.label_set_hash)


def _normalize_sections(sections: Any) -> dict[SectionKind, bytes]:
    if not isinstance(sections, Mapping):
        raise _err(f"sections must be a mapping SectionKind -> bytes, got {type(sections).__name__}")
    n = len(sections)
    if not 1 <= n <= MAX_SECTIONS:
        raise _err(f"n_sections {n} out of range 1..{MAX_SECTIONS} (a packet needs at least one section)")
    out: dict[SectionKind, bytes] = {}
    for key, value in sections.items():
        kind = _check_kind("section kind", key)
        if kind in out:  # only reachable with exotic keys that compare unequal but map to one kind
            raise _err(f"section kind {kind.value}={kind.name} appears twice (each kind at most once)")
        out[kind] = _check_bytes(f"section {kind.name}", value, max_size=MAX_SECTION_BYTES)
    # canonical order on the wire: ascending kind
    return {k: out[k] for k in sorted(out)}


@dataclass(kw_only=True)
class Packet:
    """A header plus its section payloads, keyed by :class:`SectionKind`."""

    header: PacketHeader
    sections: dict[SectionKind, bytes] = field(default_factory=dict)
    compact: bool = False  # written as a compact P frame (version 3); needs exactly a P frame's T and Y sections

    def __post_init__(self) -> None:
        self.sections = self.validate()

    def validate(self) -> dict[SectionKind, bytes]:
        """Raise BitstreamError unless the packet can be written.

        Returns the sections as a new dict with SectionKind keys, bytes values, in
        wire (ascending kind) order.
        """
        if not isinstance(self.header, PacketHeader):
            raise _err(f"header must be a PacketHeader, got {type(self.header).__name__}")
        self.header.validate()
        sections = _normalize_sections(self.sections)
        self.compact = _check_bool("compact", self.compact)
        if self.compact:
            _compact_fields(self.header, sections)
        return sections

    def to_bytes(self) -> bytes:
        """Serialise; validates first and raises BitstreamError on an invalid packet."""
        sections = self.validate()
        h = self.header
        if self.compact:
            frame_id, key_id, bg, kind = _compact_fields(h, sections)
            flags = h.flags | (FLAG_MOTION if kind == _T_KIND_P_MC else 0)
            parts = [_COMPACT.pack(MAGIC, VERSION_COMPACT_P, flags, h.rate_point, bg, frame_id, key_id, h.symbol_crc,
                                   len(h.rois))]
            parts.extend(_ROI.pack(r.x0, r.y0, r.x1, r.y1, r.label_id, r.score_u8, 0) for r in h.rois)
            parts.append(sections[SectionKind.Y])
            body = b"".join(parts)
            return body + _CRC.pack(zlib.crc32(body) & _U32)
        parts = [
            _HEADER.pack(
                MAGIC,
                h.version,
                h.flags,
                h.codec_id,
                h.weights_hash,
                h.rate_point,
                h.latent_space_id,
                h.width,
                h.height,
                h.label_set_hash,
                h.symbol_crc,
                len(h.rois),
                len(sections),
            )
        ]
        if h.bg_rate_point is not None:
            parts.append(_V2_EXTRA.pack(h.bg_rate_point))
        parts.extend(_ROI.pack(r.x0, r.y0, r.x1, r.y1, r.label_id, r.score_u8, 0) for r in h.rois)
        parts.extend(_SECTION.pack(int(kind), len(payload)) for kind, payload in sections.items())
        parts.extend(sections.values())
        body = b"".join(parts)
        if len(body) + _CRC.size > MAX_PACKET_BYTES:
            raise _err(f"packet of {len(body) + _CRC.size} bytes exceeds MAX_PACKET_BYTES={MAX_PACKET_BYTES}: "
                       "readers with the default limit would refuse it")
        return body + _CRC.pack(zlib.crc32(body) & _U32)

    @classmethod
    def from_bytes(cls, data: bytes, *, max_packet_bytes: int = MAX_PACKET_BYTES,
                   stream: StreamContext | None = None) -> Packet:
        """Parse and validate one packet; every rejection raises BitstreamError. ``stream``: the context a
        compact P frame (version 3) is read in (other versions carry their own and ignore it)."""
        return _parse(data, max_packet_bytes, stream)


def is_compact(data: Any) -> bool:
    """True when ``data`` (bytes-like) starts like a compact P frame (version 3): it needs a stream context."""
    try:
        mv = memoryview(data)
    except TypeError:
        return False
    return mv.nbytes > 4 and bytes(mv[:4]) == MAGIC and mv[4] == VERSION_COMPACT_P


def _compact_fields(h: PacketHeader, sections: dict[SectionKind, bytes]) -> tuple[int, int, int, int]:
    """(frame_id, key_id, bg_rate_point, T kind) of a packet that can be written compact, else BitstreamError."""
    why = None
    if set(sections) != {SectionKind.T, SectionKind.Y}:
        why = f"its sections are {'+'.join(k.name for k in sections)}, not exactly T+Y"
    elif not h.roi_only or h.bg_rate_point is not None:
        why = "a P frame is roi_only and has no header bg_rate_point"
    elif len(sections[SectionKind.T]) != T_SECTION.size:
        why = f"its T section is {len(sections[SectionKind.T])} bytes, not {T_SECTION.size}"
    else:
        kind, frame_id, ref_id, key_id, bg = T_SECTION.unpack(sections[SectionKind.T])
        if kind not in (_T_KIND_P, _T_KIND_P_MC):
            why = f"its T section is of kind {kind}, not a P frame ({_T_KIND_P} or {_T_KIND_P_MC})"
        elif ref_id != (frame_id - 1) & _U32:
            why = f"frame {frame_id} is predicted from frame {ref_id}, not from the one before it"
        else:
            return frame_id, key_id, bg, kind
    raise _err(f"packet cannot be written compact (version {VERSION_COMPACT_P}): {why}")


# --------------------------------------------------------------------------- parsing


def _as_buffer(data: Any, max_packet_bytes: int) -> memoryview:
    if (
        isinstance(max_packet_bytes, bool)
        or not isinstance(max_packet_bytes, numbers.Integral)
        or max_packet_bytes < 1
    ):
        # a caller bug, not a bad packet: deliberately not a BitstreamError
        raise ValueError(f"max_packet_bytes must be a positive integer, got {max_packet_bytes!r}")
    if isinstance(data, str):
        raise _err("packet data must be bytes-like, got str")
    try:
        mv = memoryview(data)
    except TypeError:
        raise _err(f"packet data must be bytes-like, got {type(data).__name__}") from None
    n = mv.nbytes  # no copy yet
    if n > max_packet_bytes:
        raise _err(f"packet length {n} out of range {MIN_COMPACT_PACKET_BYTES}..{max_packet_bytes} (max_packet_bytes)")
    if n < MIN_COMPACT_PACKET_BYTES:
        raise _err(f"packet length {n} out of range {MIN_COMPACT_PACKET_BYTES}..{max_packet_bytes} (too short)")
    if not mv.c_contiguous:
        mv = memoryview(mv.tobytes())
    return mv.cast("B") if (mv.format != "B" or mv.ndim != 1) else mv


def _parse(data: Any, max_packet_bytes: int, stream: StreamContext | None = None) -> Packet:
    buf = _as_buffer(data, max_packet_bytes)
    total = len(buf)

    magic = bytes(buf[0:4])
    if magic != MAGIC:
        raise _err(f"magic {magic!r} is not {MAGIC!r} (not an LCF packet)")
    version = buf[4]
    if version not in VERSIONS:
        raise _err(f"version {version} out of range {VERSIONS[0]}..{VERSIONS[-1]} (unsupported LCF version)")
    if version in (1, 2) and total < MIN_PACKET_BYTES:
        raise _err(f"packet length {total} out of range {MIN_PACKET_BYTES}..{max_packet_bytes} "
                   f"(too short for version {version})")
    if version == 2 and total < MIN_PACKET_BYTES + _V2_EXTRA.size:
        raise _err(f"packet length {total} out of range {MIN_PACKET_BYTES + _V2_EXTRA.size}..{max_packet_bytes} "
                   f"(too short for version {version})")
    (stored_crc,) = _CRC.unpack_from(buf, total - CRC_BYTES)
    computed_crc = zlib.crc32(buf[: total - CRC_BYTES]) & _U32
    if stored_crc != computed_crc:
        raise _err(
            f"crc32 0x{stored_crc:08x} does not match computed 0x{computed_crc:08x} "
            "(corrupt or truncated packet)"
        )
    if version == VERSION_COMPACT_P:
        return _parse_compact(buf, stream)

    (
        _magic,
        _version,
        flags,
        codec_id,
        weights_hash,
        rate_point,
        latent_space_id,
        width,
        height,
        label_set_hash,
        symbol_crc,
        n_rois,
        n_sections,
    ) = _HEADER.unpack_from(buf, 0)

    if flags & ~_KNOWN_FLAGS:
        raise _err(
            f"flags 0x{flags:02x} out of range 0x00..0x{_KNOWN_FLAGS:02x} "
            "(only bit0 = roi_only is defined; other bits must be 0)"
        )
    codec_id = _check_int("codec_id", codec_id, 1, _U16)
    rate_point = _check_int("rate_point", rate_point, 0, _MAX_RATE_POINT)
    width = _check_int("width", width, 1, MAX_DIM)
    height = _check_int("height", height, 1, MAX_DIM)

    end = total - CRC_BYTES  # first byte of the CRC trailer
    pos = HEADER_BYTES
    bg_rate_point = None
    if version >= 2:
        (bg_rate_point,) = _V2_EXTRA.unpack_from(buf, pos)
        pos += _V2_EXTRA.size
        if not flags & FLAG_ROI_ONLY:
            raise _err(f"bg_rate_point {bg_rate_point} needs roi_only (flags 0x{flags:02x} has bit0 clear)")
        _check_int("bg_rate_point", bg_rate_point, 0, rate_point, f" (at most rate_point {rate_point})")

    # ROI table: bound the count by its maximum and by the bytes left, before slicing.
    _check_int("n_rois", n_rois, 0, MAX_ROIS)
    _check_int("n_sections", n_sections, 1, MAX_SECTIONS)
    room = end - pos
    max_rois_here = room // ROI_ENTRY_BYTES
    if n_rois > max_rois_here:
        raise _err(
            f"n_rois {n_rois} out of range 0..{max_rois_here} (a {n_rois}-entry ROI table needs "
            f"{n_rois * ROI_ENTRY_BYTES} bytes, only {room} remain before the crc32)"
        )
    room -= n_rois * ROI_ENTRY_BYTES
    max_sections_here = min(MAX_SECTIONS, room // SECTION_ENTRY_BYTES)
    if n_sections > max_sections_here:
        raise _err(
            f"n_sections {n_sections} out of range 1..{max_sections_here} (a {n_sections}-entry "
            f"section table needs {n_sections * SECTION_ENTRY_BYTES} bytes, only {room} remain "
            "after the ROI table)"
        )
    rois = []
    for i in range(n_rois):
        x0, y0, x1, y1, label_id, score_u8, reserved = _ROI.unpack_from(buf, pos)
        pos += ROI_ENTRY_BYTES
        prefix = f"rois[{i}]."
        _check_roi_box(prefix, x0, y0, x1, y1, width, height)
        _check_int(f"{prefix}reserved", reserved, 0, 0)
        rois.append(Roi(x0=x0, y0=y0, x1=x1, y1=y1, label_id=label_id, score=score_u8 / 255))

    # Section table (room was checked above).
    entries: list[tuple[SectionKind, int]] = []
    seen: dict[SectionKind, int] = {}
    payload_room = end - pos - SECTION_ENTRY_BYTES * n_sections
    used = 0
    for i in range(n_sections):
        kind_raw, length = _SECTION.unpack_from(buf, pos)
        pos += SECTION_ENTRY_BYTES
        kind = _check_kind(f"sections[{i}].kind", kind_raw)
        if kind in seen:
            raise _err(
                f"sections[{i}].kind {kind.value}={kind.name} duplicates sections[{seen[kind]}] "
                "(each kind at most once)"
            )
        seen[kind] = i
        _check_int(f"sections[{i}].length", length, 0, MAX_SECTION_BYTES)
        left = payload_room - used
        if length > left:
            raise _err(
                f"sections[{i}].length {length} out of range 0..{left} "
                f"(only {left} payload bytes remain before the crc32)"
            )
        used += length
        entries.append((kind, length))
    if used != payload_room:
        raise _err(
            f"section lengths sum to {used} but {payload_room} payload bytes follow the "
            f"section table (range {payload_room}..{payload_room})"
        )

    sections: dict[SectionKind, bytes] = {}
    for kind, length in entries:
        sections[kind] = bytes(buf[pos : pos + length])
        pos += length
    assert pos == end

    header = PacketHeader(
        codec_id=codec_id,
        weights_hash=bytes(weights_hash),
        rate_point=rate_point,
        latent_space_id=latent_space_id,
        width=width,
        height=height,
        label_set_hash=bytes(label_set_hash),
        symbol_crc=symbol_crc,
        roi_only=bool(flags & FLAG_ROI_ONLY),
        rois=tuple(rois),
        bg_rate_point=bg_rate_point,
    )
    return Packet(header=header, sections=sections)


def _compact_header(buf: memoryview) -> dict[str, int]:
    """The fields of a compact P frame's header (CRC already checked), each checked."""
    _magic, _version, flags, rate_point, bg, frame_id, key_id, symbol_crc, n_rois = _COMPACT.unpack_from(buf, 0)
    if flags & ~FLAG_MOTION != FLAG_ROI_ONLY:
        raise _err(f"flags 0x{flags:02x} out of range: a compact P frame is roi_only (0x01), with 0x02 for motion; "
                   "other bits must be 0")
    _check_int("rate_point", rate_point, 0, _MAX_RATE_POINT)
    _check_int("bg_rate_point", bg, 0, _MAX_RATE_POINT)
    _check_int("n_rois", n_rois, 0, MAX_ROIS)
    room = len(buf) - CRC_BYTES - COMPACT_HEADER_BYTES
    if n_rois * ROI_ENTRY_BYTES > room:
        raise _err(f"n_rois {n_rois} out of range 0..{room // ROI_ENTRY_BYTES} (a {n_rois}-entry ROI table needs "
                   f"{n_rois * ROI_ENTRY_BYTES} bytes, only {room} remain before the crc32)")
    return {"rate_point": rate_point, "bg_rate_point": bg, "frame_id": frame_id, "key_id": key_id,
            "symbol_crc": symbol_crc, "n_rois": n_rois, "kind": _T_KIND_P_MC if flags & FLAG_MOTION else _T_KIND_P}


def _parse_compact(buf: memoryview, stream: StreamContext | None) -> Packet:
    if stream is None:
        raise _err("a compact P frame (version 3) does not name its codec or frame size: parse it with its "
                   "stream's context (stream=StreamContext.of(the keyframe's header))")
    if not isinstance(stream, StreamContext):
        raise _err(f"stream must be a StreamContext, got {type(stream).__name__}")
    f = _compact_header(buf)
    pos, end = COMPACT_HEADER_BYTES, len(buf) - CRC_BYTES
    rois = []
    for i in range(f["n_rois"]):
        x0, y0, x1, y1, label_id, score_u8, reserved = _ROI.unpack_from(buf, pos)
        pos += ROI_ENTRY_BYTES
        _check_roi_box(f"rois[{i}].", x0, y0, x1, y1, stream.width, stream.height)
        _check_int(f"rois[{i}].reserved", reserved, 0, 0)
        rois.append(Roi(x0=x0, y0=y0, x1=x1, y1=y1, label_id=label_id, score=score_u8 / 255))
    header = PacketHeader(codec_id=stream.codec_id, weights_hash=stream.weights_hash, rate_point=f["rate_point"],
                          latent_space_id=stream.latent_space_id, width=stream.width, height=stream.height,
                          label_set_hash=stream.label_set_hash, symbol_crc=f["symbol_crc"], roi_only=True,
                          rois=tuple(rois))
    t = T_SECTION.pack(f["kind"], f["frame_id"], (f["frame_id"] - 1) & _U32, f["key_id"], f["bg_rate_point"])
    return Packet(header=header, sections={SectionKind.T: t, SectionKind.Y: bytes(buf[pos:end])}, compact=True)


# ----------------------------------------------------------------------- module API


def pack(packet: Packet) -> bytes:
    """Serialise ``packet`` (same as ``packet.to_bytes()``)."""
    if not isinstance(packet, Packet):
        raise _err(f"pack() needs a Packet, got {type(packet).__name__}")
    return packet.to_bytes()


def unpack(data: bytes, *, max_packet_bytes: int = MAX_PACKET_BYTES, stream: StreamContext | None = None) -> Packet:
    """Parse one packet (same as ``Packet.from_bytes``)."""
    return _parse(data, max_packet_bytes, stream)


def describe(packet: Packet | bytes, *, max_packet_bytes: int = MAX_PACKET_BYTES,
             stream: StreamContext | None = None) -> dict[str, Any]:
    """A JSON-able summary of a packet.

    ``packet`` may be a :class:`Packet` (sizes are those of ``pack(packet)``) or the
    received bytes (parsed first; sizes are those of the bytes given). ``header_bytes``
    is everything that is not section payload: the fixed header, both tables and the
    CRC trailer, so ``header_bytes + sum(section_bytes.values()) == total_bytes``.
    ``bpp`` is ``total_bytes * 8 / (width * height)``: real bytes, headers included.
    The bytes of a compact P frame without its ``stream`` give what the packet itself
    says (the stream's fields and ``bpp`` are None).
    """
    if isinstance(packet, Packet):
        total = len(packet.to_bytes())
    else:
        data = packet
        buf = _as_buffer(data, max_packet_bytes)
        if stream is None and is_compact(buf):
            _parse(data, max_packet_bytes, StreamContext(codec_id=1, weights_hash=bytes(8), latent_space_id=0,
                                                         width=MAX_DIM, height=MAX_DIM))  # every check but the stream's
            f = _compact_header(buf)
            total = len(buf)
            y = total - COMPACT_HEADER_BYTES - f["n_rois"] * ROI_ENTRY_BYTES - CRC_BYTES
            return {"format": "LCF", "version": VERSION_COMPACT_P, "compact": True, **f,
                    "codec_id": None, "weights_hash": None, "width": None, "height": None,
                    "section_bytes": {"Y": y}, "header_bytes": total - y, "total_bytes": total, "bpp": None}
        packet = _parse(data, max_packet_bytes, stream)
        total = memoryview(data).nbytes
    h = packet.header
    section_bytes = {kind.name: len(payload) for kind, payload in packet.sections.items()}
    if packet.compact:  # the T section is rebuilt from the header's fields: none of its bytes are on the wire
        section_bytes.pop(SectionKind.T.name, None)
    header_bytes = total - sum(section_bytes.values())
    return {
        "format": "LCF",
        "version": VERSION_COMPACT_P if packet.compact else h.version,
        "compact": packet.compact,
        "flags": h.flags,
        "codec_id": h.codec_id,
        "weights_hash": h.weights_hash.hex(),
        "rate_point": h.rate_point,
        "latent_space_id": h.latent_space_id,
        "width": h.width,
        "height": h.height,
        "label_set_hash": h.label_set_hash.hex(),
        "symbol_crc": h.symbol_crc,
        "roi_only": h.roi_only,
        "bg_rate_point": h.bg_rate_point,
        "n_rois": len(h.rois),
        "rois": [
            {
                "x0": r.x0,
                "y0": r.y0,
                "x1": r.x1,
                "y1": r.y1,
                "label_id": r.label_id,
                "score_u8": r.score_u8,
                "score": r.score_u8 / 255,
            }
            for r in h.rois
        ],
        "n_sections": len(section_bytes),
        "section_bytes": section_bytes,
        "header_bytes": header_bytes,
        "total_bytes": total,
        "bpp": total * 8 / (h.width * h.height),
    }
