"""Symbols <-> bytes: the entropy coder of the latent codec (numpy + constriction).

Every probability model here is an *integer* frequency table shipped with the
codec weights, so encoder and decoder use bit-identical models whatever
machine they run on. The tables are indexed by small integers that the
entropy-parameter networks compute in exact integer arithmetic (see
``models/quant.py``): float noise cannot reach the coder.

::

    y symbols (int) ─┬─ scale index l (int) ──► table T_l ──┐
                     │                                      ├─► range coder ──► bytes
                     └─ |s| > R_l: escape symbol + Elias-γ ─┘     (constriction)
    z symbols (int) ──► per-channel table (factorized prior) ──► range coder ──► bytes

Hostile bytes cost little to refuse. A decoder checks, after every group, that the section could
hold what it decoded: the information content of the symbols decoded so far (``-log2 p`` under
the tables) cannot exceed the section's bits plus :data:`BUDGET_SLACK_BITS` (a range coder never
writes fewer bits than that), and escaped symbols (a Python loop each) stay within
:func:`escape_budget` of the symbols so far. A forged or corrupt section (all zeros, a
truncated stream, symbols the section is too short for) is refused at the first group that
breaks either rule, not after decoding a whole frame of garbage; the encoder refuses a frame
that would break the escape rule, so no packet it writes is refused.

A table ``T`` is an int32 array of frequencies summing to ``2**PRECISION``;
entry ``i`` codes the symbol ``i - R`` for ``i < 2R+1`` and the last entry is the
escape for values outside ``[-R, R]``. Every frequency is >= 1 so every symbol
is codable.

The range coder (constriction's ``RangeEncoder``, a queue: symbols are decoded
in the order they were encoded) turns the symbol groups of one packet section
into a single word stream. Symbols are coded in groups sharing one table, in
the order the caller gives: the decoder must ask for the same groups in the
same order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = [
    "PRECISION",
    "TableSet",
    "SymbolEncoder",
    "SymbolDecoder",
    "gaussian_tables",
    "quantize_pmf",
    "EntropyError",
    "UncodableSymbols",
    "BUDGET_SLACK_BITS",
    "escape_budget",
]

PRECISION = 16  # frequencies sum to 2**PRECISION
_ESC_BITS_ALPHABET = 33  # Elias-gamma prefix: bit length 0..32 of an escaped magnitude
_ESC_CHUNK = 16  # escaped low bits are coded 16 at a time (constriction's uniform model limit is lower than 2**32)
_ESC_LEN_BITS = math.log2(_ESC_BITS_ALPHABET)  # information of an escape's bit-length symbol
BUDGET_SLACK_BITS = 128  # a section's bits may fall short of its symbols' information by at most this (range coder)
ESCAPE_FREE = 1024  # escaped symbols always allowed per section ...
ESCAPE_SHARE = 64  # ... plus one per this many symbols (real frames: ~15 escapes in 800,000 symbols)


def escape_budget(symbols: int) -> int:
    """How many escaped symbols a section may hold among its first ``symbols`` symbols."""
    return ESCAPE_FREE + symbols // ESCAPE_SHARE


class EntropyError(ValueError):
    """A symbol stream that cannot be decoded (corrupt or truncated bytes, bad table)."""


class UncodableSymbols(ValueError):
    """Values the encoder refuses to code: too many outside their tables' range (the escape budget) or
    too large to escape-code. The frame that made them cannot be sent; the caller skips it."""


def quantize_pmf(pmf: np.ndarray, *, precision: int = PRECISION) -> np.ndarray:
    """Float pmf (any positive scale) -> int32 frequencies >= 1 summing to ``2**precision``.

    Deterministic given the same float input; used only when building tables,
    which are then stored as integers (never recomputed on the decoding side).
    """
    pmf = np.asarray(pmf, dtype=np.float64)
    if pmf.ndim != 1 or pmf.size < 2:
        raise ValueError(f"pmf must be 1-D with at least 2 entries, got shape {pmf.shape}")
    if not np.all(np.isfinite(pmf)) or np.any(pmf < 0):
        raise ValueError("pmf has negative or non-finite entries")
    total = 1 << precision
    if pmf.size > total // 2:
        raise ValueError(f"pmf of {pmf.size} entries does not fit {precision}-bit frequencies")
    pmf = pmf / pmf.sum()
    freq = np.maximum(1, np.floor(pmf * (total - pmf.size)).astype(np.int64))
    # hand the remainder to the largest entries, one by one, in a fixed order
    rem = total - int(freq.sum())
    order = np.argsort(-pmf, kind="stable")
    i = 0
    while rem != 0:
        j = order[i % pmf.size]
        if rem > 0:
            freq[j] += 1
            rem -= 1
        elif freq[j] > 1:
            freq[j] -= 1
            rem += 1
        i += 1
    return freq.astype(np.int32)


def gaussian_tables(scales: np.ndarray, *, tail: float = 7.0, max_radius: int = 1024) -> list[np.ndarray]:
    """Zero-mean discretized Gaussian tables, one per scale, each with an escape entry."""
    tables = []
    for s in np.asarray(scales, dtype=np.float64):
        r = int(min(max_radius, max(1, math.ceil(tail * s))))
        k = np.arange(-r, r + 1, dtype=np.float64)
        upper = np.array([0.5 * math.erfc(-(v + 0.5) / (s * math.sqrt(2))) for v in k])
        lower = np.array([0.5 * math.erfc(-(v - 0.5) / (s * math.sqrt(2))) for v in k])
        pmf = upper - lower
        esc = max(0.0, 1.0 - pmf.sum())
        tables.append(quantize_pmf(np.append(pmf, esc)))
    return tables


@dataclass(frozen=True)
class TableSet:
    """A list of integer frequency tables with the symbol offset of each.

    Table ``t`` codes values ``offset[t] .. offset[t] + len(table[t]) - 2`` directly
    and anything else through its last (escape) entry.
    """

    freqs: tuple[np.ndarray, ...]
    offsets: np.ndarray  # int64, value coded by entry 0 of each table

    @classmethod
    def centered(cls, tables: list[np.ndarray]) -> TableSet:
        offs = np.array([-(len(t) - 2) // 2 for t in tables], dtype=np.int64)
        return cls(freqs=tuple(np.asarray(t, dtype=np.int32) for t in tables), offsets=offs)

    @classmethod
    def from_packed(cls, packed: np.ndarray, lengths: np.ndarray, offsets: np.ndarray) -> TableSet:
        """Rebuild from the flat form stored in weight files (see :meth:`packed`)."""
        packed = np.asarray(packed, dtype=np.int32)
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.ndim != 1 or int(lengths.sum()) != packed.size or np.any(lengths < 2):
            raise EntropyError("table lengths do not match the packed table data")
        ends = np.cumsum(lengths)
        freqs = tuple(packed[e - n : e] for e, n in zip(ends, lengths))
        for i, f in enumerate(freqs):
            if int(f.sum()) != (1 << PRECISION) or np.any(f < 1):
                raise EntropyError(f"table {i} does not sum to 2**{PRECISION} with positive entries")
        return cls(freqs=freqs, offsets=np.asarray(offsets, dtype=np.int64))

    def packed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (
            np.concatenate(self.freqs).astype(np.int32),
            np.array([len(f) for f in self.freqs], dtype=np.int64),
            self.offsets.copy(),
        )

    def __len__(self) -> int:
        return len(self.freqs)

    @cached_property
    def bits(self) -> tuple[np.ndarray, ...]:
        """Information content ``-log2 p`` (bits, float64) of each entry of each table."""
        return tuple(PRECISION - np.log2(f.astype(np.float64)) for f in self.freqs)

    def symbol_bits(self, values: np.ndarray, table_index: np.ndarray) -> np.ndarray:
        """Bits (float64, ``values``' shape) of each value under its table, escapes included: the escape entry,
        the bit length and the low bits that :class:`SymbolEncoder` writes (what :class:`SymbolDecoder` counts)."""
        values = np.asarray(values, dtype=np.int64)
        table_index = np.broadcast_to(np.asarray(table_index, dtype=np.int64), values.shape)
        out = np.empty(values.shape, dtype=np.float64)
        for t in np.unique(table_index):
            sel = table_index == t
            bits, v = self.bits[t], values[sel] - self.offsets[t]
            n_direct = len(bits) - 1
            esc = (v < 0) | (v >= n_direct)
            u = np.where(v < 0, -2 * v - 1, 2 * (v - n_direct)) + 1  # the escape's zig-zag magnitude, >= 1
            low_bits = np.floor(np.log2(np.maximum(u, 1)))  # bit length - 1
            out[sel] = np.where(esc, bits[-1] + _ESC_LEN_BITS + low_bits, bits[np.clip(v, 0, n_direct - 1)])
        return out

    def code_lengths(self, radius: int) -> np.ndarray:
        """Bits (float64, (tables, 2·radius+1)) of the values ``-radius .. radius`` under each table
        (:meth:`symbol_bits`): what an encoder weighs its choice of symbols by (``proto/symbols.py``)."""
        if radius < 0:
            raise ValueError(f"radius {radius} must be >= 0")
        made = self.__dict__.setdefault("_code_lengths", {})  # built once per radius (encoders ask every frame)
        if radius not in made:
            values = np.arange(-radius, radius + 1, dtype=np.int64)
            out = self.symbol_bits(np.tile(values, (len(self), 1)), np.arange(len(self))[:, None])
            out.setflags(write=False)
            made[radius] = out
        return made[radius]

    @cached_property
    def models(self) -> _Models:
        """constriction models of the tables, built once per table set."""
        return _Models(self)


def _runs(table_index: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(table, positions) for each table used, in ascending table order, positions in stable order."""
    order = np.argsort(table_index, kind="stable")
    idx_sorted = table_index[order]
    bounds = np.flatnonzero(np.diff(idx_sorted)) + 1
    for s, e in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [idx_sorted.size]])):
        yield int(idx_sorted[s]), order[s:e]


def _check_index(table_index: np.ndarray, tables: TableSet, error: type[Exception]) -> None:
    if table_index.min() < 0 or table_index.max() >= len(tables):
        raise error(f"table index out of range 0..{len(tables) - 1}")


class _Models:
    """constriction models built once per table set (they are reusable)."""

    def __init__(self, tables: TableSet):
        import constriction

        m = constriction.stream.model
        self.cats = [m.Categorical(f.astype(np.float64) / (1 << PRECISION), perfect=False) for f in tables.freqs]
        self.esc_len = m.Uniform(_ESC_BITS_ALPHABET)
        self.uniform = m.Uniform


class SymbolEncoder:
    """Encodes groups of integer symbols, each group under one table of a :class:`TableSet`."""

    def __init__(self):
        import constriction

        self._enc = constriction.stream.queue.RangeEncoder()
        self._symbols = 0  # symbols encoded so far (the escape budget counts them)
        self._escapes = 0

    def encode(self, values: np.ndarray, table_index: np.ndarray, tables: TableSet) -> None:
        """Encode ``values[i]`` with table ``table_index[i]``; the decoder must call
        :meth:`SymbolDecoder.decode` with the same ``table_index``."""
        values = np.asarray(values, dtype=np.int64).ravel()
        table_index = np.asarray(table_index, dtype=np.int64).ravel()
        if values.shape != table_index.shape:
            raise ValueError(f"values {values.shape} and table_index {table_index.shape} differ")
        if values.size == 0:
            return
        _check_index(table_index, tables, ValueError)
        models = tables.models
        for t, pos in _runs(table_index):
            v = values[pos] - tables.offsets[t]
            n_direct = len(tables.freqs[t]) - 1
            esc = (v < 0) | (v >= n_direct)
            sym = np.where(esc, n_direct, v).astype(np.int32)
            self._symbols += sym.size
            self._escapes += int(esc.sum())
            if self._escapes > escape_budget(self._symbols):
                raise UncodableSymbols(
                    f"{self._escapes} of the first {self._symbols} symbols are outside their tables' "
                    f"range (at most {escape_budget(self._symbols)} may be escape-coded): the values "
                    "are not what the entropy model was trained for"
                )
            self._enc.encode(sym, models.cats[t])
            if esc.any():
                self._encode_escapes(v[esc], n_direct, models)

    def _encode_escapes(self, v: np.ndarray, n_direct: int, models: _Models) -> None:
        # zig-zag the distance outside the direct range, then Elias-gamma style:
        # bit length with a uniform model, then the low bits with a uniform model.
        u = np.where(v < 0, -2 * v - 1, 2 * (v - n_direct)).astype(np.int64)  # >= 0
        u = u + 1  # >= 1, so bit length >= 1
        if u.max() >= (1 << 32):
            raise UncodableSymbols(f"symbol magnitude {int(u.max())} too large to escape-code")
        for x in u:
            nb = int(x).bit_length()
            self._enc.encode(np.array([nb], dtype=np.int32), models.esc_len)
            rest, bits = int(x) - (1 << (nb - 1)), nb - 1
            while bits > 0:  # the low bits, at most 16 per uniform symbol
                chunk = min(bits, _ESC_CHUNK)
                bits -= chunk
                self._enc.encode(np.array([(rest >> bits) & ((1 << chunk) - 1)], dtype=np.int32),
                                 models.uniform(1 << chunk))

    def to_bytes(self) -> bytes:
        words = self._enc.get_compressed()
        return np.asarray(words, dtype="<u4").tobytes()


class SymbolDecoder:
    """Decodes what :class:`SymbolEncoder` wrote, group by group in the same order."""

    def __init__(self, data: bytes):
        import constriction

        if len(data) % 4:
            raise EntropyError(f"entropy-coded section of {len(data)} bytes is not a whole number of 32-bit words")
        words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
        try:
            self._dec = constriction.stream.queue.RangeDecoder(words)
        except Exception as exc:  # constriction rejects some malformed streams up front
            raise EntropyError(f"cannot start decoding: {exc}") from exc
        self._size = len(data)
        self._budget = 8.0 * len(data) + BUDGET_SLACK_BITS  # bits the section can account for
        self.info_bits = 0.0  # information content of the symbols decoded so far
        self._symbols = 0
        self._escapes = 0

    def decode(self, table_index: np.ndarray, tables: TableSet) -> np.ndarray:
        table_index = np.asarray(table_index, dtype=np.int64).ravel()
        out = np.empty(table_index.size, dtype=np.int64)
        if table_index.size == 0:
            return out
        _check_index(table_index, tables, EntropyError)
        models = tables.models
        try:
            for t, pos in _runs(table_index):
                n_direct = len(tables.freqs[t]) - 1
                sym = np.asarray(self._dec.decode(models.cats[t], int(pos.size)), dtype=np.int64)
                self.info_bits += float(tables.bits[t][sym].sum())
                esc = sym == n_direct
                n_esc = int(esc.sum())
                self._symbols += sym.size
                self._escapes += n_esc
                self._check_budget()
                if n_esc:
                    sym[esc] = self._decode_escapes(n_esc, n_direct, models)
                    self._check_budget()
                out[pos] = sym + tables.offsets[t]
        except EntropyError:
            raise
        except BaseException as exc:  # constriction's Rust panics arrive as pyo3 PanicException (a BaseException)
            if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
                raise
            raise EntropyError(f"entropy decoding failed: {exc}") from exc
        return out

    def _check_budget(self) -> None:
        if self._escapes > escape_budget(self._symbols):
            raise EntropyError(f"{self._escapes} escaped symbols among the first {self._symbols} (at most "
                               f"{escape_budget(self._symbols)}): corrupt or forged section")
        if self.info_bits > self._budget:
            raise EntropyError(f"a section of {self._size} bytes cannot hold the symbols decoded from it so far "
                               f"({self.info_bits:.0f} bits of information after {self._symbols} symbols): corrupt "
                               "or forged section")

    def _decode_escapes(self, n: int, n_direct: int, models: _Models) -> np.ndarray:
        res = np.empty(n, dtype=np.int64)
        for i in range(n):
            nb = int(self._dec.decode(models.esc_len, 1)[0])
            self.info_bits += _ESC_LEN_BITS + max(0, nb - 1)
            if nb < 1:
                raise EntropyError(f"escape bit length {nb} out of range 1..32")
            x, bits = 1, nb - 1
            while bits > 0:
                chunk = min(bits, _ESC_CHUNK)
                bits -= chunk
                x = (x << chunk) | int(self._dec.decode(models.uniform(1 << chunk), 1)[0])
            u = x - 1
            res[i] = -(u + 1) // 2 if u % 2 else u // 2 + n_direct
        return res
