"""Temporal coding: a background latent once, then only what changed (numpy only, edge and cloud).

A temporal stream is a chain of LCF packets that each carry a ``T`` section
(:class:`TemporalInfo`) naming the frame, the frame it was predicted from and the
keyframe whose background it draws on::

    key  (frame k): an ordinary full-frame intra packet (Z, Y) + T{kind=KEY, frame=k}
         ─► state: ŷ = ŷ_bg = the decoded latent, fg = nothing, z from this packet
    P    (frame t): T{kind=P, frame=t, ref=t-1, key=k} + Y = per-cell modes, then residual symbols
         ─► for each latent cell (16x16 pixels), its mode says what the new ŷ is:
              KEEP     ŷ_t = ŷ_{t-1}                       (0 bits beyond the mode)
              CODE     ŷ_t = ŷ_{t-1} + Δ_q · s             (a foreground cell: ROI content that moved)
              BG       ŷ_t = ŷ_bg                          (the object left: back to the background)
              BGCODE   ŷ_bg += Δ_bg · s ; ŷ_t = ŷ_bg        (the background itself changed)

The edge decides the modes (:func:`choose_modes`): cells under the grounded ROIs
are coded when their quantized change against the previous decoded latent has
at least ``threshold`` nonzero symbols; other cells fall back to the background,
which is itself re-coded where it changed by ``bg_threshold`` nonzero symbols (a
person the grounding missed, a parked car, a light switched on). The edge runs
the same :class:`TemporalState` update as the cloud on the symbols it sends, so
both hold the same latent (closed loop: errors never accumulate). All updates
are dyadic float64 arithmetic (``Δ`` has 8 fractional bits), exact on any machine.

Entropy coding (the "conditional" model, :class:`TemporalTables`): the residual
``s`` is coded with the previous latent as its mean (``s`` is the change) and a
zero-mean Gaussian table whose scale depends on the channel, the mode, whether
the cell was coded in the previous frame too (a moving object) and the cell's
class, a 4-level measure of how much it changed that the encoder sends first;
the modes are coded with a 4-symbol table chosen by the cell's context in the
previous frame. Every context is known before its symbols are decoded, so a
frame decodes in a handful of vectorized calls. The tables are fitted on footage
(``latentcast train temporal``) and stored as integers.

``Y`` section order: all modes (row-major); then for CODE cells their classes
(row-major) and their residual symbols (channel-major, then row-major); then the
same for BGCODE cells. The packet's ``symbol_crc`` is the CRC32 of all of these
in that order.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bitstream import T_SECTION as _INFO
from .entropy import SymbolDecoder, SymbolEncoder, TableSet, quantize_pmf

__all__ = [
    "KEEP", "CODE", "BG", "BGCODE", "MODES", "KIND_KEY", "KIND_P", "TemporalError", "TemporalInfo",
    "TemporalTables", "TemporalState", "choose_modes", "encode_p", "decode_p", "residual_context", "group_context",
    "cell_classes", "N_MODE_CTX", "N_GROUP_CTX", "N_CLASSES", "N_RES_CTX",
]

KEEP, CODE, BG, BGCODE = 0, 1, 2, 3
MODES = ("KEEP", "CODE", "BG", "BGCODE")
KIND_KEY, KIND_P = 0, 1
_KINDS = {KIND_KEY: "KEY", KIND_P: "P"}
N_MODE_CTX = 8  # fg_state x (coded here last frame) x (coded in the 3x3 neighbourhood last frame)
N_GROUP_CTX = 4  # per rate point: (CODE | BGCODE) x (coded here last frame)
N_CLASSES = 4  # classes of coded cells by the L1 norm of their residual (side information)
N_RES_CTX = N_GROUP_CTX * N_CLASSES  # residual table contexts per rate point
MAX_FRAME_ID = 2**32 - 1


class TemporalError(ValueError):
    """A temporal packet that cannot be applied: malformed, or its reference is not the one held."""


@dataclass(frozen=True)
class TemporalInfo:
    """The ``T`` section: what frame this is and what it depends on (14 bytes)."""

    kind: int  # KIND_KEY or KIND_P
    frame_id: int  # this frame's number in the stream (wraps at 2**32)
    ref_id: int  # P: the frame this one is predicted from (the previous frame); KEY: = frame_id
    key_id: int  # the keyframe whose background this frame uses; KEY: = frame_id
    bg_rate_point: int = 0  # P: the rate point whose step codes background updates (BGCODE cells)

    def __post_init__(self) -> None:
        if isinstance(self.bg_rate_point, bool) or not isinstance(self.bg_rate_point, (int, np.integer)) \
                or not 0 <= self.bg_rate_point <= 254:
            raise TemporalError(f"temporal bg_rate_point {self.bg_rate_point!r} out of range 0..254")
        if self.kind not in _KINDS:
            raise TemporalError(f"temporal kind {self.kind!r} is not one of "
                                f"{', '.join(f'{k}={v}' for k, v in _KINDS.items())}")
        for name in ("frame_id", "ref_id", "key_id"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v <= MAX_FRAME_ID:
                raise TemporalError(f"temporal {name} {v!r} out of range 0..{MAX_FRAME_ID}")
        if self.kind == KIND_KEY and not (self.ref_id == self.key_id == self.frame_id):
            raise TemporalError(f"a keyframe depends on nothing: ref_id {self.ref_id} and key_id {self.key_id} "
                                f"must equal frame_id {self.frame_id}")

    @property
    def is_key(self) -> bool:
        return self.kind == KIND_KEY

    def to_bytes(self) -> bytes:
        return _INFO.pack(self.kind, self.frame_id, self.ref_id, self.key_id, self.bg_rate_point)

    @classmethod
    def from_bytes(cls, data: bytes) -> TemporalInfo:
        if len(data) != _INFO.size:
            raise TemporalError(f"T section is {len(data)} bytes, expected {_INFO.size}")
        return cls(*_INFO.unpack(data))


# ----------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class TemporalTables:
    """Integer entropy model of P frames.

    - ``mode_freqs[c]``: the 4-symbol table of a cell's mode in mode context ``c`` (:meth:`TemporalState.mode_context`);
    - ``class_edges[q]``: a coded cell's class is how many of these its residual's L1 norm reaches (rate point ``q``);
      ``class_freqs[q * N_GROUP_CTX + g]``: the class table in group context ``g`` = (CODE | BGCODE) x (coded here
      last frame);
    - ``res_scale[q * N_RES_CTX + g * N_CLASSES + k, m]``: the Gaussian table (an index into the codec's ``y_tables``,
      the ones intra frames use) of channel ``m`` of a class-``k`` cell in group context ``g`` at rate point ``q``.

    The class is side information the encoder picks (2 bits at most, entropy coded): it tells the decoder how
    much the cell changed, so each channel's table can fit small and large changes separately."""

    mode_freqs: np.ndarray  # (N_MODE_CTX, 4) int32, each row sums to 2**16, entries >= 1
    class_freqs: np.ndarray  # (n_rates * N_GROUP_CTX, N_CLASSES) int32, rows sum to 2**16, entries >= 1
    class_edges: np.ndarray  # (n_rates, N_CLASSES - 1) int64, ascending L1 thresholds
    res_scale: np.ndarray  # (n_rates * N_RES_CTX, M) int64 scale-table index
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        mf, cf, ce, rs = (np.asarray(a) for a in (self.mode_freqs, self.class_freqs, self.class_edges, self.res_scale))
        for name, f, shape in (("mode_freqs", mf, (N_MODE_CTX, 4)), ("class_freqs", cf, None)):
            if (shape is not None and f.shape != shape) or f.ndim != 2 or np.any(f < 1) or np.any(f.sum(1) != 1 << 16):
                raise TemporalError(f"{name} must be positive rows summing to 2**16 of shape {shape or '(*, *)'}, "
                                    f"got {f.shape}")
        if rs.ndim != 2 or rs.shape[0] % N_RES_CTX or not rs.shape[0] or np.any(rs < 0):
            raise TemporalError(f"res_scale must be (n_rates * {N_RES_CTX}, M) non-negative indices, got {rs.shape}")
        n = rs.shape[0] // N_RES_CTX
        if (
            cf.shape != (n * N_GROUP_CTX, N_CLASSES)
            or ce.shape != (n, N_CLASSES - 1)
            or np.any(np.diff(ce, axis=1) < 0)
        ):
            raise TemporalError(f"class_freqs {cf.shape} / class_edges {ce.shape} do not fit {n} rate points "
                                f"and {N_CLASSES} classes (edges ascending)")

    @property
    def n_rates(self) -> int:
        return int(self.res_scale.shape[0] // N_RES_CTX)

    @property
    def M(self) -> int:
        return int(self.res_scale.shape[1])

    @property
    def mode_tables(self) -> TableSet:
        return _freq_tableset(self.mode_freqs)

    @property
    def class_tables(self) -> TableSet:
        return _freq_tableset(self.class_freqs)

    @classmethod
    def from_counts(cls, mode_counts: np.ndarray, class_counts: np.ndarray, class_edges: np.ndarray,
                    res_scale: np.ndarray, meta: dict | None = None) -> TemporalTables:
        """Tables from symbol counts (+1/2 each, so every symbol stays codable)."""

        def freqs(counts):
            return np.stack([quantize_pmf(np.asarray(c, dtype=np.float64) + 0.5) for c in counts]).astype(np.int32)

        return cls(mode_freqs=freqs(mode_counts), class_freqs=freqs(class_counts),
                   class_edges=np.asarray(class_edges, dtype=np.int64), res_scale=np.asarray(res_scale, dtype=np.int64),
                   meta=dict(meta or {}))

    @classmethod
    def flat(cls, *, M: int, n_rates: int, scale: int = 30, edges: tuple[int, ...] = (4, 12, 32)) -> TemporalTables:
        """Untrained tables (uniform modes and classes, one scale everywhere): tests and a first fit."""
        return cls.from_counts(np.ones((N_MODE_CTX, 4)), np.ones((n_rates * N_GROUP_CTX, N_CLASSES)),
                               np.tile(np.asarray(edges, dtype=np.int64), (n_rates, 1)),
                               np.full((n_rates * N_RES_CTX, M), scale))

    _ARRAYS = ("mode_freqs", "class_freqs", "class_edges", "res_scale")

    def save(self, path: Path | str, *, weights_hash: bytes) -> None:
        """A safetensors file (numpy arrays) naming the codec weights it was fitted for."""
        import json

        from safetensors.numpy import save_file

        md = {"format": "latentcast-temporal-2", "weights_hash": weights_hash.hex(), "meta": json.dumps(self.meta)}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(getattr(self, k)) for k in self._ARRAYS}, str(path), metadata=md)

    @classmethod
    def load(cls, path: Path | str, *, weights_hash: bytes | None = None) -> TemporalTables:
        import json

        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"temporal tables {path} not found (fit them with `latentcast train temporal`)")
        with safe_open(str(path), framework="numpy") as f:
            md = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
        if md.get("format") != "latentcast-temporal-2":
            raise TemporalError(f"{path} is not a latentcast temporal table file of this version (format "
                                f"{md.get('format')!r}, expected 'latentcast-temporal-2'): refit with "
                                "`latentcast train temporal`")
        if weights_hash is not None and md.get("weights_hash") != weights_hash.hex():
            raise TemporalError(f"{path} was fitted for codec weights {md.get('weights_hash')}, "
                                f"not {weights_hash.hex()}: refit with `latentcast train temporal`")
        return cls(**{k: arrays[k] for k in cls._ARRAYS}, meta=json.loads(md.get("meta", "{}")))


_TABLE_CACHE: dict[tuple, TableSet] = {}


def _freq_tableset(freqs: np.ndarray) -> TableSet:
    """Rows of frequencies (symbols 0..n-1) as a TableSet; each gets the (unused) escape entry the coder needs."""
    key = (freqs.shape, freqs.astype(np.int32).tobytes())
    if key not in _TABLE_CACHE:
        tabs = []
        for row in np.asarray(freqs, dtype=np.int64):
            t = row.copy()
            t[int(np.argmax(t))] -= 1
            tabs.append(np.append(t, 1).astype(np.int32))
        _TABLE_CACHE[key] = TableSet(freqs=tuple(tabs), offsets=np.zeros(len(tabs), dtype=np.int64))
    return _TABLE_CACHE[key]


# ----------------------------------------------------------------------------- state


@dataclass
class TemporalState:
    """What both ends hold for a stream between packets (exact float64 latents)."""

    y: np.ndarray  # (M, h, w) float64: the latent of the last frame
    bg: np.ndarray  # (M, h, w) float64: the background latent
    fg: np.ndarray  # (h, w) bool: cells showing foreground (CODE since the last BG/BGCODE)
    coded: np.ndarray  # (h, w) bool: cells coded (CODE or BGCODE) in the last frame
    frame_id: int
    key_id: int

    @classmethod
    def from_key(cls, y_hat: np.ndarray, frame_id: int) -> TemporalState:
        y = np.asarray(y_hat, dtype=np.float64)
        if y.ndim != 3:
            raise TemporalError(f"keyframe latent must be (M, h, w), got {y.shape}")
        hw = y.shape[1:]
        return cls(y=y.copy(), bg=y.copy(), fg=np.zeros(hw, bool), coded=np.zeros(hw, bool), frame_id=int(frame_id),
                   key_id=int(frame_id))

    def copy(self) -> TemporalState:
        return TemporalState(y=self.y.copy(), bg=self.bg.copy(), fg=self.fg.copy(), coded=self.coded.copy(),
                             frame_id=self.frame_id, key_id=self.key_id)

    def mode_context(self) -> np.ndarray:
        """(h, w) int context of each cell's mode symbol, known before the frame is decoded."""
        c = self.coded
        p = np.pad(c, 1)
        h, w = c.shape
        near = np.zeros_like(c)
        for dy in range(3):
            for dx in range(3):
                near |= p[dy:dy + h, dx:dx + w]
        return self.fg.astype(np.int64) * 4 + c.astype(np.int64) * 2 + near.astype(np.int64)

    def check_next(self, info: TemporalInfo) -> None:
        """Raise :class:`TemporalError` unless ``info`` is a P frame that follows this state."""
        if info.is_key:
            return
        if info.key_id != self.key_id:
            raise TemporalError(
                f"frame {info.frame_id} uses keyframe {info.key_id}, the held keyframe is {self.key_id}"
            )
        if info.ref_id != self.frame_id:
            raise TemporalError(f"frame {info.frame_id} is predicted from frame {info.ref_id}, "
                                f"the last decoded frame is {self.frame_id}")

    def apply(self, modes: np.ndarray, sym: np.ndarray, *, step: float, bg_step: float, frame_id: int) -> None:
        """Advance to the next frame given its modes (h,w) and residual symbols (M,h,w) (0 where not coded)."""
        if modes.shape != self.fg.shape or sym.shape != self.y.shape:
            raise TemporalError(f"modes {modes.shape} / symbols {sym.shape} do not match the state {self.y.shape}")
        code, bgcode, bg = modes == CODE, modes == BGCODE, modes == BG
        s = sym.astype(np.float64)
        self.bg = np.where(bgcode[None], self.bg + bg_step * s, self.bg)
        y = np.where(code[None], self.y + step * s, self.y)
        self.y = np.where((bg | bgcode)[None], self.bg, y)
        self.fg = (self.fg | code) & ~(bg | bgcode)
        self.coded = code | bgcode
        self.frame_id = int(frame_id)


def _quantize(r: np.ndarray, step: float, deadzone: float) -> np.ndarray:
    """Rounding with a dead zone: ``sign(r) floor(|r|/step + 1/2 - deadzone)``, clipped at 0."""
    if deadzone == 0.0:
        return np.floor(r / step + 0.5)
    return np.sign(r) * np.maximum(np.floor(np.abs(r) / step + 0.5 - deadzone), 0.0)


def choose_modes(state: TemporalState, y: np.ndarray, roi: np.ndarray, *, step: float, bg_step: float,
                 threshold: int, bg_threshold: int, deadzone: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The edge's decision for one frame: modes (h,w) and residual symbols (M,h,w).

    ``roi``: (h,w) bool cells under the grounded ROIs. A ROI cell is coded (CODE) when its change
    against the previous latent, quantized with ``step``, has at least ``threshold`` nonzero symbols.
    Elsewhere, a cell showing foreground goes back to the background (BG), and any cell whose
    change against the background, quantized with ``bg_step``, has at least ``bg_threshold``
    nonzero symbols is re-coded into the background (BGCODE). ``deadzone`` (0..0.5) widens the zero
    bin of the residual quantizer: fewer small symbols, fewer bits (the decoder is unchanged)."""
    y = np.asarray(y, dtype=np.float64)
    s_fg = _quantize(y - state.y, step, deadzone)
    s_bg = _quantize(y - state.bg, bg_step, deadzone)
    code = roi & ((s_fg != 0).sum(0) >= threshold)
    bgcode = ~roi & ((s_bg != 0).sum(0) >= bg_threshold)
    modes = np.full(roi.shape, KEEP, dtype=np.int64)
    modes[~roi & state.fg] = BG
    modes[code] = CODE
    modes[bgcode] = BGCODE
    sym = np.where(code[None], s_fg, np.where(bgcode[None], s_bg, 0.0)).astype(np.int64)
    return modes, sym


def group_context(state: TemporalState, cells: np.ndarray, kind: int, rate_point: int) -> np.ndarray:
    """Row of ``class_freqs`` for each cell of ``cells`` (kind 0: CODE, 1: BGCODE), (n,) int."""
    return rate_point * N_GROUP_CTX + kind * 2 + state.coded[cells].astype(np.int64)


def cell_classes(tables: TemporalTables, sym: np.ndarray, rate_point: int) -> np.ndarray:
    """The class of each coded cell: how many of the rate point's L1 edges its residual (M, n) reaches."""
    return np.searchsorted(tables.class_edges[rate_point], np.abs(sym).sum(0), side="right").astype(np.int64)


def residual_context(state: TemporalState, cells: np.ndarray, kind: int, rate_point: int,
                     classes: np.ndarray) -> np.ndarray:
    """Row of ``res_scale`` for each cell of ``cells`` with its class, (n,) int."""
    g = kind * 2 + state.coded[cells].astype(np.int64)
    return rate_point * N_RES_CTX + g * N_CLASSES + classes


def _check_rate(tables: TemporalTables, rate_point: int) -> None:
    if not 0 <= rate_point < tables.n_rates:
        raise TemporalError(f"rate point {rate_point} has no temporal tables (fitted: 0..{tables.n_rates - 1})")


def encode_p(state: TemporalState, modes: np.ndarray, sym: np.ndarray, *, tables: TemporalTables,
             y_tables: TableSet, rate_point: int, bg_rate_point: int) -> tuple[bytes, int]:
    """The Y section of a P frame and its symbol CRC (``state`` is the one *before* this frame)."""
    enc = SymbolEncoder()
    m = modes.ravel()
    enc.encode(m, state.mode_context().ravel(), tables.mode_tables)
    crc = zlib.crc32(m.astype("<i4").tobytes())
    for kind, cells in enumerate((modes == CODE, modes == BGCODE)):
        if not cells.any():
            continue
        q = rate_point if kind == 0 else bg_rate_point
        _check_rate(tables, q)
        v = sym[:, cells]
        k = cell_classes(tables, v, q)
        enc.encode(k, group_context(state, cells, kind, q), tables.class_tables)
        enc.encode(v.ravel(), tables.res_scale[residual_context(state, cells, kind, q, k)].T.ravel(), y_tables)
        crc = zlib.crc32(v.astype("<i4").tobytes(), zlib.crc32(k.astype("<i4").tobytes(), crc))
    return enc.to_bytes(), crc


def decode_p(state: TemporalState, data: bytes, *, tables: TemporalTables, y_tables: TableSet, rate_point: int,
             bg_rate_point: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Inverse of :func:`encode_p`: modes (h,w), symbols (M,h,w), CRC."""
    dec = SymbolDecoder(data)
    ctx = state.mode_context()
    m = dec.decode(ctx.ravel(), tables.mode_tables).reshape(ctx.shape).astype(np.int64)
    if np.any((m < 0) | (m > 3)):
        raise TemporalError("decoded a mode outside KEEP/CODE/BG/BGCODE: corrupt Y section")
    crc = zlib.crc32(m.astype("<i4").tobytes())
    sym = np.zeros(state.y.shape, dtype=np.int64)
    for kind, cells in enumerate((m == CODE, m == BGCODE)):
        if not cells.any():
            continue
        q = rate_point if kind == 0 else bg_rate_point
        _check_rate(tables, q)
        k = dec.decode(group_context(state, cells, kind, q), tables.class_tables).astype(np.int64)
        if np.any((k < 0) | (k >= N_CLASSES)):
            raise TemporalError("decoded a cell class out of range: corrupt Y section")
        t = tables.res_scale[residual_context(state, cells, kind, q, k)].T  # (M, n)
        v = dec.decode(t.ravel(), y_tables).reshape(t.shape).astype(np.int64)
        sym[:, cells] = v
        crc = zlib.crc32(v.astype("<i4").tobytes(), zlib.crc32(k.astype("<i4").tobytes(), crc))
    return m, sym, crc
