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

Motion (a ``P_MC`` frame, kind 2): each CODE cell also carries a motion vector ``v`` in quarter
cells (4 pixels at 1/16), and its mean is the previous latent moved by ``v``
(:func:`motion_predict`: bilinear between the 4 nearest cells, edge cells repeated, rounded to 8
fractional bits) instead of ŷ_{t-1} itself: ``ŷ_t = P_v(ŷ_{t-1}) + Δ_q · s``. A walking person moves
a few pixels a frame, which a latent at 1/16 cannot follow without it. The edge estimates one vector
per grounded box, all boxes at once (:func:`choose_motion`: the cheapest residual over the box's cells,
its symbols' L1 norm plus its squared error under half a step) and gives each coded cell the best of
its boxes' vectors and none. A moving camera (the edge's ``temporal.camera_motion``) also sends the
camera's vector, in whole cells, which moves the whole state, foreground and background latents,
before anything else (:func:`search_camera`). A frame in which nothing moves is an ordinary ``P`` frame.

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

``Y`` section order: a ``P_MC`` frame's camera vector (one symbol of :data:`CAMERA_ALPHABET`); all modes
(row-major); in a ``P_MC`` frame, then the CODE cells' motion vectors
(row-major): each one's kind (none, its predictor's: the nonzero vector of the CODE cell above, else
left, else the last one, or a new one; a table per whether the cells above and left are CODE cells),
then the new vectors as symbols of :data:`MV_ALPHABET`; then for CODE cells their classes
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
    "cell_classes", "N_MODE_CTX", "N_GROUP_CTX", "N_CLASSES", "N_RES_CTX", "KIND_P_MC", "MV_RANGE", "MV_ALPHABET",
    "CAMERA_ALPHABET", "CAMERA_RANGE", "Motion", "motion_predict", "search_motion", "search_camera", "choose_motion",
    "box_cells", "interior_cells", "rd_prune", "code_lengths", "quantize",
]

KEEP, CODE, BG, BGCODE = 0, 1, 2, 3
MODES = ("KEEP", "CODE", "BG", "BGCODE")
KIND_KEY, KIND_P, KIND_P_MC = 0, 1, 2
_KINDS = {KIND_KEY: "KEY", KIND_P: "P", KIND_P_MC: "P_MC"}
MV_RANGE = 4  # motion vectors in quarter cells: |dy|, |dx| <= 4, i.e. up to one cell (16 px) each way
MV_ALPHABET = (2 * MV_RANGE + 1) ** 2  # a vector (dy, dx) as one symbol (dy + R) * (2R + 1) + (dx + R)
CAMERA_RANGE = 8  # the camera's vector of a frame, in quarter cells: up to 2 cells (32 px) each way
CAMERA_ALPHABET = (2 * CAMERA_RANGE + 1) ** 2
_CAMERA_FREQS = np.array([[(1 << 15) if i == CAMERA_ALPHABET // 2 else 0 for i in range(CAMERA_ALPHABET)]],
                         dtype=np.int64)  # half the mass on "the camera did not move", the rest uniform
_CAMERA_FREQS[0, np.arange(CAMERA_ALPHABET) != CAMERA_ALPHABET // 2] = (1 << 15) // (CAMERA_ALPHABET - 1)
_CAMERA_FREQS[0, 0] += (1 << 16) - int(_CAMERA_FREQS.sum())
_CAMERA_FREQS = _CAMERA_FREQS.astype(np.int32)
# A CODE cell's vector kind (none / its predictor's / new) by whether the cells above and to the left are CODE
# cells: symbol counts of the edge's choices on vtest's training frames (index % 8 != 0), rate point 0.
_MV_KIND_COUNTS = ((645, 32, 94), (876, 172, 100), (1005, 366, 127), (2893, 2792, 395))
_MV_FREQS = np.array([[(1 << 16) // MV_ALPHABET + (i < (1 << 16) % MV_ALPHABET) for i in range(MV_ALPHABET)]],
                     dtype=np.int32)  # a new vector: uniform
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

    @property
    def kind_name(self) -> str:
        """KEY, P or P_MC."""
        return _KINDS[self.kind]

    @property
    def has_motion(self) -> bool:
        """A ``P_MC`` frame: its CODE cells carry motion vectors."""
        return self.kind == KIND_P_MC

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


def _mv_kind_tables() -> TableSet:
    return _freq_tableset(np.stack([quantize_pmf(np.asarray(c, dtype=np.float64) + 0.5)
                                    for c in _MV_KIND_COUNTS]).astype(np.int32))


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


@dataclass(frozen=True, eq=False)
class Motion:
    """A ``P_MC`` frame's motion: the camera's vector, which moves both latents of the state (every cell)
    first, then the CODE cells' own vectors (2,h,w) on top of it; all in quarter cells."""

    camera: tuple[int, int] = (0, 0)  # |dy|, |dx| <= CAMERA_RANGE
    cells: np.ndarray | None = None  # (2, h, w) int, nonzero only on CODE cells, |v| <= MV_RANGE; None: none move

    def __post_init__(self) -> None:
        if len(self.camera) != 2 or any(abs(int(v)) > CAMERA_RANGE for v in self.camera):
            raise TemporalError(f"camera vector {self.camera!r} outside +-{CAMERA_RANGE} quarter cells")

    @property
    def moves(self) -> bool:
        """Anything moves: else the frame is an ordinary P frame."""
        return tuple(self.camera) != (0, 0) or (self.cells is not None and bool(self.cells.any()))


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

    def moved(self, camera: tuple[int, int]) -> TemporalState:
        """The state with both latents moved by the camera's vector (``self`` when it is zero; not a copy)."""
        if tuple(camera) == (0, 0):
            return self
        mv = np.empty((2, *self.fg.shape), dtype=np.int64)
        mv[0], mv[1] = camera
        return TemporalState(y=motion_predict(self.y, mv), bg=motion_predict(self.bg, mv), fg=self.fg.copy(),
                             coded=self.coded.copy(), frame_id=self.frame_id, key_id=self.key_id)

    def apply(self, modes: np.ndarray, sym: np.ndarray, *, step: float, bg_step: float, frame_id: int,
              motion: Motion | None = None) -> None:
        """Advance to the next frame given its modes (h,w) and residual symbols (M,h,w) (0 where not coded);
        ``motion``: a ``P_MC`` frame's (the camera's vector moves the state first; CODE cells are predicted
        from the latent moved by their own vectors)."""
        if modes.shape != self.fg.shape or sym.shape != self.y.shape:
            raise TemporalError(f"modes {modes.shape} / symbols {sym.shape} do not match the state {self.y.shape}")
        if motion is not None and tuple(motion.camera) != (0, 0):
            moved = self.moved(motion.camera)
            self.y, self.bg = moved.y, moved.bg
        mv = None if motion is None else motion.cells
        code, bgcode, bg = modes == CODE, modes == BGCODE, modes == BG
        # only the cells that change are touched (in place): the same arithmetic, element by element, as a
        # whole-grid update, so both ends stay bit-identical
        if bgcode.any():
            self.bg[:, bgcode] = self.bg[:, bgcode] + _per_channel(bg_step) * sym[:, bgcode]
        if code.any():
            r, c = np.nonzero(code)
            base = self.y[:, r, c] if mv is None else _moved_cells(self.y, r, c, mv[0, r, c], mv[1, r, c])
            self.y[:, r, c] = base + _per_channel(step) * sym[:, r, c]
        back = bg | bgcode
        if back.any():
            self.y[:, back] = self.bg[:, back]
        self.fg = (self.fg | code) & ~(bg | bgcode)
        self.coded = code | bgcode
        self.frame_id = int(frame_id)


def motion_predict(y: np.ndarray, mv: np.ndarray) -> np.ndarray:
    """``y`` (M,h,w) with each cell replaced by ``y`` at the cell minus its vector: ``mv`` (2,h,w) int, (dy, dx)
    in quarter cells (the cell's content came from ``dy / 4`` cells above and ``dx / 4`` to the left).

    Bilinear between the 4 nearest cells (weights in sixteenths), cells beyond the grid repeat the edge,
    rounded to 8 fractional bits: dyadic arithmetic, the same on every machine. Cells with a zero
    vector keep ``y`` exactly."""
    y = np.asarray(y, dtype=np.float64)
    mv = np.asarray(mv)
    out = y.copy()
    r, c = np.nonzero((mv[0] != 0) | (mv[1] != 0))
    if r.size:
        out[:, r, c] = _moved_cells(y, r, c, mv[0, r, c], mv[1, r, c])
    return out


def _moved_cells(y: np.ndarray, r: np.ndarray, c: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """(M, n): :func:`motion_predict` at the cells (r, c) with vectors (dy, dx); a zero vector gives ``y``."""
    dy, dx = np.asarray(dy, dtype=np.int64), np.asarray(dx, dtype=np.int64)
    y0, y1, x0, x1, fy, fx = _taps(y.shape, r, c, dy, dx)
    v = ((4 - fy) * (4 - fx) * y[:, y0, x0] + (4 - fy) * fx * y[:, y0, x1] + fy * (4 - fx) * y[:, y1, x0]
         + fy * fx * y[:, y1, x1]) / 16.0
    v = np.floor(v * 256.0 + 0.5) / 256.0
    still = (dy == 0) & (dx == 0)
    if still.any():
        v[:, still] = y[:, r[still], c[still]]
    return v


def _taps(shape: tuple[int, ...], r, c, dy, dx) -> tuple[np.ndarray, ...]:
    """The 4 cells a moved cell reads and its weights in quarters: (y0, y1, x0, x1, fy, fx) for the cells (r, c)
    moved by (dy, dx) quarter cells, edge cells repeated (the bilinear interpolation of :func:`motion_predict`
    and of the search)."""
    h, w = shape[-2:]
    sy, sx = r * 4 - dy, c * 4 - dx
    iy, fy = np.floor_divide(sy, 4), np.mod(sy, 4)
    ix, fx = np.floor_divide(sx, 4), np.mod(sx, 4)
    return (np.clip(iy, 0, h - 1), np.clip(iy + 1, 0, h - 1), np.clip(ix, 0, w - 1), np.clip(ix + 1, 0, w - 1),
            fy, fx)


def _per_channel(step) -> np.ndarray | float:
    """A rate point's step as a factor of (M, n) symbols: a number, or (M, 1) with channel gains."""
    a = np.asarray(step, dtype=np.float64)
    return a.reshape(-1, 1) if a.ndim else float(a)


_SEARCH_CHANNELS = 24  # the search ranks vectors on the channels that changed most in the box (all: too slow)
_DISTORTION_WEIGHT = 4.0  # a prediction's cost: the L1 norm of its quantized residual + this x its squared error
# (in steps): the L1 norm alone is blind to errors under half a step, which no symbol corrects


def _prediction_cost(x: np.ndarray, axis) -> np.ndarray:
    """Cost of predicting with residual ``x`` (in steps): the symbols' L1 norm (about their bits) plus
    :data:`_DISTORTION_WEIGHT` x the squared error left where the symbols are zero or rounded."""
    q = np.floor(x + 0.5)
    cost = np.abs(q).sum(axis)
    if _DISTORTION_WEIGHT:
        cost = cost + _DISTORTION_WEIGHT * ((x - q) ** 2).sum(axis)
    return cost


def _gather_moved(y: np.ndarray, r: np.ndarray, c: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """``y`` (C,h,w) moved by (dy, dx) quarter cells at the cells (r, c): bilinear, edge cells repeated, not
    rounded (the search only ranks vectors). Broadcasts r, c, dy, dx; returns (C, *their shape)."""
    y0, y1, x0, x1, fy, fx = _taps(y.shape, r, c, dy, dx)
    fy, fx = fy.astype(y.dtype), fx.astype(y.dtype)
    top = (4 - fx) * y[:, y0, x0] + fx * y[:, y0, x1]
    bottom = (4 - fx) * y[:, y1, x0] + fx * y[:, y1, x1]
    return ((4 - fy) * top + fy * bottom) / 16.0


def _search_boxes(y_prev: np.ndarray, y: np.ndarray, boxes: list[tuple[int, int, int, int]], *, step,
                  mv_range: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every box's vector at once (a handful of array operations per frame, whatever the number of boxes: the
    edge's encoder shares the interpreter with other cameras' work).

    Coarse to fine (even vectors, then the 8 around each box's best), ranked by the :func:`_prediction_cost`
    summed over the box's cells on the :data:`_SEARCH_CHANNELS` channels that changed most over all boxes;
    ties to the shorter vector. Returns (vectors (n_boxes, 2), and per box cell: row, column, box index,
    cost of its box's vector on all channels)."""
    if not 0 <= mv_range <= MV_RANGE:
        raise ValueError(f"mv_range {mv_range!r} out of range 0..{MV_RANGE}")
    rows, cols, owner = [], [], []
    for i, (r0, r1, c0, c1) in enumerate(boxes):
        rr, cc = np.mgrid[r0:r1, c0:c1]
        rows.append(rr.ravel())
        cols.append(cc.ravel())
        owner.append(np.full(rr.size, i))
    r, c, bid = (np.concatenate(v).astype(np.int64) for v in (rows, cols, owner))
    nb = len(boxes)
    y_prev = np.asarray(y_prev, dtype=np.float64)
    tgt = np.asarray(y)[:, r, c].astype(np.float64)  # (M, n): the box cells only, then float64
    step_a = np.asarray(step, dtype=np.float64)
    step_v = _per_channel(step)
    ch = np.sort(np.argsort(np.abs(tgt - y_prev[:, r, c]).sum(1))[-_SEARCH_CHANNELS:])
    sub_prev, sub_tgt = y_prev[ch].astype(np.float32), tgt[ch].astype(np.float32)[:, :, None]
    sub_step = np.asarray(step_v[ch] if step_a.ndim else step_v, dtype=np.float32)
    sub_step = sub_step[:, :, None] if step_a.ndim else sub_step

    def best_of(cands: np.ndarray) -> np.ndarray:
        """cands (nb, K, 2) -> each box's best (nb, 2)."""
        dy, dx = cands[bid, :, 0], cands[bid, :, 1]  # (n, K)
        p = _gather_moved(sub_prev, r[:, None], c[:, None], dy, dx)  # (C, n, K)
        cost = _prediction_cost((sub_tgt - p) / sub_step, 0)  # (n, K)
        per_box = np.zeros((nb, cands.shape[1]))
        np.add.at(per_box, bid, cost)
        per_box += 1e-3 * np.abs(cands).sum(2)  # ties go to the shorter vector
        return cands[np.arange(nb), np.argmin(per_box, axis=1)]

    even = np.arange(-mv_range, mv_range + 1)
    even = even[even % 2 == 0]
    coarse = np.stack(np.meshgrid(even, even, indexing="ij"), -1).reshape(1, -1, 2)
    v = best_of(np.broadcast_to(coarse, (nb, *coarse.shape[1:])))
    around = np.stack(np.meshgrid([-1, 0, 1], [-1, 0, 1], indexing="ij"), -1).reshape(1, -1, 2)
    v = best_of(np.clip(v[:, None] + around, -mv_range, mv_range))
    pred = _moved_cells(y_prev, r, c, v[bid, 0], v[bid, 1])  # (M, n), as the decoder will compute it
    return v, r, c, bid, _prediction_cost((tgt - pred) / step_v, 0)


def search_motion(y_prev: np.ndarray, y: np.ndarray, box: tuple[int, int, int, int], *, step,
                  mv_range: int = MV_RANGE) -> tuple[tuple[int, int], np.ndarray]:
    """The vector (dy, dx) that best moves ``y_prev`` onto ``y`` over the cells ``box`` = (r0, r1, c0, c1)
    (:func:`_search_boxes` for one box), and the per-cell costs of its residual (r1-r0, c1-c0)."""
    v, _, _, _, cost = _search_boxes(y_prev, y, [box], step=step, mv_range=mv_range)
    r0, r1, c0, c1 = box
    return (int(v[0, 0]), int(v[0, 1])), cost.reshape(r1 - r0, c1 - c0)


def search_camera(y_prev: np.ndarray, y: np.ndarray, *, step, camera_range: int = CAMERA_RANGE) -> tuple[int, int]:
    """The camera's vector: the shift of the whole ``y_prev`` by whole cells (multiples of 4 quarter cells) that
    best predicts ``y`` (the smallest :func:`_prediction_cost` over every cell, on the channels that changed
    most; ties to the shorter vector). Whole cells, because a fractional shift of the whole state blurs the
    cells that are not re-coded a little more every frame (measured on bikes.mp4: 0.9 dB lost at q2)."""
    if not 0 <= camera_range <= CAMERA_RANGE:
        raise ValueError(f"camera_range {camera_range!r} out of range 0..{CAMERA_RANGE}")
    y_prev, y = np.asarray(y_prev, dtype=np.float64), np.asarray(y, dtype=np.float64)
    _, h, w = y.shape
    step = np.asarray(step, dtype=np.float64)
    ch = np.sort(np.argsort(np.abs(y - y_prev).sum((1, 2)))[-_SEARCH_CHANNELS // 2:])
    sub_step = (step[ch] if step.ndim == 3 else step).astype(np.float32)
    sub_step = sub_step[..., None] if step.ndim == 3 else sub_step  # (C, 1, 1, 1) against (C, h, w, K)
    d = np.arange(-(camera_range // 4), camera_range // 4 + 1) * 4
    cand = np.stack(np.meshgrid(d, d, indexing="ij"), -1).reshape(-1, 2)  # (K, 2)
    r, c = np.mgrid[0:h, 0:w]
    p = _gather_moved(y_prev[ch].astype(np.float32), r[..., None], c[..., None], cand[:, 0], cand[:, 1])
    cost = _prediction_cost((y[ch].astype(np.float32)[..., None] - p) / sub_step, (0, 1, 2))
    k = int(np.argmin(cost + 1e-3 * np.abs(cand).sum(1)))  # ties go to the shorter vector
    return int(cand[k, 0]), int(cand[k, 1])


def box_cells(boxes, shape: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Pixel boxes (x0, y0, x1, y1) as the cells they touch, (r0, r1, c0, c1) within a grid of ``shape``."""
    rows, cols = shape
    return [(min(int(y0) // 16, rows), min(-(-int(y1) // 16), rows), min(int(x0) // 16, cols),
             min(-(-int(x1) // 16), cols)) for x0, y0, x1, y1 in boxes]


def choose_motion(state: TemporalState, y: np.ndarray, roi: np.ndarray, boxes, *, step,
                  mv_range: int = MV_RANGE) -> np.ndarray:
    """The edge's motion vectors (2,h,w) for one frame: per box (r0, r1, c0, c1) in cells that changed, its
    vector (:func:`_search_boxes`); each ROI cell takes the vector of its boxes whose residual costs least
    (:func:`_prediction_cost`), or none when not moving costs as little."""
    mv = np.zeros((2, *roi.shape), dtype=np.int64)
    boxes = [b for b in boxes if b[1] > b[0] and b[3] > b[2]]
    if not boxes:
        return mv
    step_v = _per_channel(step)
    r, c = np.nonzero(np.any([_box_mask(b, roi.shape) for b in boxes], axis=0) & roi)
    best = np.full(roi.shape, np.inf)  # the cost of each cell's prediction so far: not moving, first
    best[r, c] = _prediction_cost((np.asarray(y)[:, r, c].astype(np.float64) - state.y[:, r, c]) / step_v, 0)
    moving = [b for b in boxes if np.nan_to_num(best[b[0]:b[1], b[2]:b[3]], posinf=0.0).max() >= 1.0]
    if not moving:
        return mv  # no box changed: no symbol to save
    v, rr, cc, bid, cost = _search_boxes(state.y, y, moving, step=step, mv_range=mv_range)
    idx = np.nonzero(roi[rr, cc] & v[bid].any(1))[0]
    if idx.size == 0:
        return mv
    cell = rr[idx] * roi.shape[1] + cc[idx]
    order = np.lexsort((cost[idx], cell))  # by cell, then cost: where boxes overlap, the cheapest first
    first = idx[order[np.r_[True, cell[order][1:] != cell[order][:-1]]]]
    win = first[cost[first] < best[rr[first], cc[first]]]
    mv[:, rr[win], cc[win]] = v[bid[win]].T
    return mv


def _box_mask(box: tuple[int, int, int, int], shape: tuple[int, int]) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[box[0]:box[1], box[2]:box[3]] = True
    return m


def _mv_context(modes: np.ndarray) -> np.ndarray:
    """(n,) row of :data:`_MV_KIND_FREQS` of each CODE cell (raster order): is the cell above, the cell to the
    left, a CODE cell too. Known from the modes, so a frame's vector kinds decode in one call."""
    code = modes == CODE
    above = np.zeros_like(code)
    above[1:] = code[:-1]
    left = np.zeros_like(code)
    left[:, 1:] = code[:, :-1]
    return (above.astype(np.int64) * 2 + left.astype(np.int64))[code]


def _mv_walk(modes: np.ndarray, mv: np.ndarray, kinds: np.ndarray | None = None,
             new: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CODE cells' vectors in raster order as symbols: each one's kind (0: no motion, 1: the same as its
    predictor, the nonzero vector of the CODE cell above, else left, else the last nonzero one; 2: a new
    vector, one symbol of ``(dy + R) * (2R + 1) + dx + R``). Encoder: from ``mv``; decoder (fills ``mv``):
    from the decoded ``kinds`` and ``new`` symbols. Returns (vectors (n, 2), kinds (n,), new symbols)."""
    cells = np.argwhere(modes == CODE)
    side = 2 * MV_RANGE + 1
    vec = np.zeros((len(cells), 2), dtype=np.int64)
    out_kinds = np.zeros(len(cells), dtype=np.int64)
    out_new: list[int] = []
    last: tuple[int, int] | None = None
    k = 0
    for i, (r, c) in enumerate(cells):
        pred = last
        if r > 0 and modes[r - 1, c] == CODE and (mv[0, r - 1, c] or mv[1, r - 1, c]):
            pred = (int(mv[0, r - 1, c]), int(mv[1, r - 1, c]))
        elif c > 0 and modes[r, c - 1] == CODE and (mv[0, r, c - 1] or mv[1, r, c - 1]):
            pred = (int(mv[0, r, c - 1]), int(mv[1, r, c - 1]))
        if kinds is None:  # encoder
            v = (int(mv[0, r, c]), int(mv[1, r, c]))
            kind = 0 if v == (0, 0) else 1 if v == pred else 2
            if kind == 2:
                out_new.append((v[0] + MV_RANGE) * side + v[1] + MV_RANGE)
        else:  # decoder
            kind = int(kinds[i])
            if kind == 0:
                v = (0, 0)
            elif kind == 1:
                if pred is None:
                    raise TemporalError("a motion vector refers to a predictor that does not exist: corrupt Y section")
                v = pred
            else:
                dy, dx = divmod(int(new[k]), side)
                v, k = (dy - MV_RANGE, dx - MV_RANGE), k + 1
                if v == (0, 0):
                    raise TemporalError("a new motion vector of zero: corrupt Y section")
            mv[0, r, c], mv[1, r, c] = v
        out_kinds[i] = kind
        vec[i] = v
        if v != (0, 0):
            last = v
    return vec, out_kinds, np.asarray(out_new, dtype=np.int64)


def quantize(r: np.ndarray, step: float, deadzone: float) -> np.ndarray:
    """Rounding with a dead zone: ``sign(r) floor(|r|/step + 1/2 - deadzone)``, clipped at 0."""
    if deadzone == 0.0:
        q = np.divide(r, step)  # a new array: rounded in place (the same values as floor(r / step + 0.5))
        q += 0.5
        return np.floor(q, out=q)
    return np.sign(r) * np.maximum(np.floor(np.abs(r) / step + 0.5 - deadzone), 0.0)


def interior_cells(boxes, shape: tuple[int, int], *, inset: int = 1) -> np.ndarray:
    """(h, w) bool: the cells of a grid of ``shape`` that lie ``inset`` whole cells or more inside a pixel box
    (x0, y0, x1, y1) of ``boxes``: neither on the box's border nor outside it. A box's border cells hold its
    object's outline, which places the box; its interior cells hold what the outline encloses."""
    rows, cols = shape
    out = np.zeros(shape, dtype=bool)
    for x0, y0, x1, y1 in boxes:
        r0, c0 = -(-int(y0) // 16) + inset, -(-int(x0) // 16) + inset  # first whole cell inside, then inset
        r1, c1 = int(y1) // 16 - inset, int(x1) // 16 - inset  # one past the last whole cell, then inset
        out[max(r0, 0):min(r1, rows), max(c0, 0):min(c1, cols)] = True
    return out


def choose_modes(state: TemporalState, y: np.ndarray, roi: np.ndarray, *, step: float, bg_step: float,
                 threshold: int | np.ndarray, bg_threshold: int, deadzone: float = 0.0,
                 mv: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The edge's decision for one frame: modes (h,w) and residual symbols (M,h,w).

    ``roi``: (h,w) bool cells under the grounded ROIs. A ROI cell is coded (CODE) when its change
    against the previous latent, quantized with ``step``, has at least ``threshold`` nonzero symbols
    (an int, or (h,w) ints: one per cell, e.g. higher inside boxes than on their borders).
    Elsewhere, a cell showing foreground goes back to the background (BG), and any cell whose
    change against the background, quantized with ``bg_step``, has at least ``bg_threshold``
    nonzero symbols is re-coded into the background (BGCODE). ``deadzone`` (0..0.5) widens the zero
    bin of the residual quantizer: fewer small symbols, fewer bits (the decoder is unchanged).
    ``mv`` (2,h,w, :func:`choose_motion`): a coded cell's residual is against the moved latent; whether it
    is coded still depends on its change against the previous latent (the caller keeps the vectors of
    CODE cells only)."""
    y = np.asarray(y)  # gathered cells minus the float64 state: float64, whatever y's dtype
    roi = np.asarray(roi, dtype=bool)
    modes = np.full(roi.shape, KEEP, dtype=np.int64)
    modes[~roi & state.fg] = BG
    sym = np.zeros(y.shape, dtype=np.int64)
    # each cell is quantized once, against what its mode would code it from: the foreground latent under the
    # ROIs, the background elsewhere (the same values as quantizing the whole grid both ways)
    r, c = np.nonzero(roi)
    if r.size:
        s = quantize(y[:, r, c] - state.y[:, r, c], _per_channel(step), deadzone)
        code = np.count_nonzero(s, axis=0) >= (threshold[r, c] if np.ndim(threshold) else threshold)
        r, c, s = r[code], c[code], s[:, code]
        if mv is not None and r.size:
            s = quantize(y[:, r, c] - _moved_cells(state.y, r, c, mv[0, r, c], mv[1, r, c]), _per_channel(step),
                          deadzone)
        modes[r, c] = CODE
        sym[:, r, c] = s
    r, c = np.nonzero(~roi)
    if r.size:
        s = quantize(y[:, r, c] - state.bg[:, r, c], _per_channel(bg_step), deadzone)
        bgcode = np.count_nonzero(s, axis=0) >= bg_threshold
        modes[r[bgcode], c[bgcode]] = BGCODE
        sym[:, r[bgcode], c[bgcode]] = s[:, bgcode]
    return modes, sym


def code_lengths(y_tables: TableSet) -> tuple[np.ndarray, int]:
    """(n_tables, 2R+1) bits of each value -R..R under each table (``TableSet.code_lengths``), R the widest
    table's length, and R."""
    R = max(len(f) for f in y_tables.freqs)
    return y_tables.code_lengths(R), R


def rd_prune(state: TemporalState, y: np.ndarray, modes: np.ndarray, sym: np.ndarray, *, step, weight: float,
             tables: TemporalTables, lengths: tuple[np.ndarray, int], rate_point: int,
             mv: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The rate-distortion test of CODE cells: a cell stays coded only when coding it removes at least
    ``weight * step**2`` of squared latent error per bit it costs (its residual's code length under its
    tables, from :func:`code_lengths`); the others become KEEP. ``state`` is the one the modes were chosen
    on (moved by the camera's vector if any), ``mv`` the cells' vectors. Returns the new (modes, sym)."""
    code = modes == CODE
    if weight <= 0 or not code.any():
        return modes, sym
    table_bits, R = lengths
    r, c = np.nonzero(code)
    y_c = np.asarray(y, dtype=np.float64)[:, r, c]
    pred = state.y[:, r, c] if mv is None else _moved_cells(state.y, r, c, mv[0, r, c], mv[1, r, c])
    d_keep = ((y_c - state.y[:, r, c]) ** 2).sum(0)
    s = sym[:, r, c]
    d_code = ((y_c - (pred + _per_channel(step) * s)) ** 2).sum(0)
    k = cell_classes(tables, s, rate_point)
    t = tables.res_scale[residual_context(state, code, 0, rate_point, k)].T  # (M, n) table of each symbol
    bits = table_bits[t, np.clip(s, -R, R) + R].sum(0) + 2.0  # + about a class and a mode
    scale = float(np.mean(step)) ** 2
    drop = np.zeros_like(code)
    drop[code] = (d_keep - d_code) < weight * scale * bits
    return np.where(drop, KEEP, modes), np.where(drop[None], 0, sym)


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
             y_tables: TableSet, rate_point: int, bg_rate_point: int,
             motion: Motion | None = None) -> tuple[bytes, int]:
    """The Y section of a P frame and its symbol CRC (``state`` is the one *before* this frame); ``motion``: a
    ``P_MC`` frame's (the camera's vector, and the vectors of CODE cells, each within :data:`MV_RANGE`)."""
    enc = SymbolEncoder()
    if motion is not None:
        cam = (motion.camera[0] + CAMERA_RANGE) * (2 * CAMERA_RANGE + 1) + motion.camera[1] + CAMERA_RANGE
        enc.encode(np.array([cam]), np.zeros(1, dtype=np.int64), _freq_tableset(_CAMERA_FREQS))
    m = modes.ravel()
    enc.encode(m, state.mode_context().ravel(), tables.mode_tables)
    crc = zlib.crc32(m.astype("<i4").tobytes())
    if motion is not None:
        crc = zlib.crc32(np.asarray(motion.camera, dtype="<i4").tobytes(), crc)
        mv = motion.cells if motion.cells is not None else np.zeros((2, *modes.shape), dtype=np.int64)
        if np.any(np.abs(mv[:, modes == CODE]) > MV_RANGE):
            raise ValueError(f"a motion vector is outside +-{MV_RANGE} quarter cells")
        vec, kinds, new = _mv_walk(modes, mv)
        enc.encode(kinds, _mv_context(modes), _mv_kind_tables())
        enc.encode(new, np.zeros(new.size, dtype=np.int64), _freq_tableset(_MV_FREQS))
        crc = zlib.crc32(vec.astype("<i4").tobytes(), crc)
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
             bg_rate_point: int, motion: bool = False) -> tuple[np.ndarray, np.ndarray, int, Motion | None]:
    """Inverse of :func:`encode_p`: modes (h,w), symbols (M,h,w), CRC, and for a ``P_MC`` frame (``motion``)
    its :class:`Motion` (cell vectors zero outside CODE cells), else None."""
    dec = SymbolDecoder(data)
    camera = (0, 0)
    if motion:
        cam = int(dec.decode(np.zeros(1, dtype=np.int64), _freq_tableset(_CAMERA_FREQS))[0])
        if not 0 <= cam < CAMERA_ALPHABET:
            raise TemporalError("decoded a camera vector out of range: corrupt Y section")
        cy, cx = divmod(cam, 2 * CAMERA_RANGE + 1)
        camera = (cy - CAMERA_RANGE, cx - CAMERA_RANGE)
    ctx = state.mode_context()
    m = dec.decode(ctx.ravel(), tables.mode_tables).reshape(ctx.shape).astype(np.int64)
    if np.any((m < 0) | (m > 3)):
        raise TemporalError("decoded a mode outside KEEP/CODE/BG/BGCODE: corrupt Y section")
    crc = zlib.crc32(m.astype("<i4").tobytes())
    mv = None
    if motion:
        crc = zlib.crc32(np.asarray(camera, dtype="<i4").tobytes(), crc)
        kinds = dec.decode(_mv_context(m), _mv_kind_tables())
        if np.any((kinds < 0) | (kinds > 2)):
            raise TemporalError("decoded a motion vector kind out of range: corrupt Y section")
        new = dec.decode(np.zeros(int((kinds == 2).sum()), dtype=np.int64), _freq_tableset(_MV_FREQS))
        if np.any((new < 0) | (new >= MV_ALPHABET)):
            raise TemporalError("decoded a motion vector out of range: corrupt Y section")
        mv = np.zeros((2, *m.shape), dtype=np.int64)
        vec, _, _ = _mv_walk(m, mv, kinds=kinds, new=new)
        crc = zlib.crc32(vec.astype("<i4").tobytes(), crc)
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
    return m, sym, crc, (Motion(camera=camera, cells=mv) if motion else None)
