"""Per-camera session state that survives reconnects, and SessionHeader validation.

State is keyed by ``camera_id`` (proto/latentcast_v1.proto, "Session and resume semantics"):

- :meth:`SessionRegistry.open` applies the identity rules: a stream of the camera's instance (or an edge
  without an instance id) resumes its state; another instance starts it afresh (next_seq 0); while a live
  stream of another instance holds the camera and sent a message within ``takeover_after_s``, a new one is
  refused with ALREADY_EXISTS before anything changes.
- :meth:`SeqTracker.refusal` bounds a frame's seq to ``next_seq + max_seq_ahead`` (and to what uint64 can
  answer), checked before the seq is recorded.

- :class:`SeqTracker` keeps a contiguous watermark ``next_seq`` (every seq below it was received)
  and a bounded set of seqs received above it. ``accept(seq)`` is False for a seq already
  received (the stream re-acks it and does not process it again).
- Gaps. Seqs on one stream strictly increase, so when seq ``s`` arrives every missing seq below
  it will not come on this stream; with ``skip_gaps`` (default) the watermark jumps past them at
  once (counted as missing), so cumulative acks never stall on frames the edge dropped. Without
  it the watermark waits for them, and when more than ``max_out_of_order`` seqs are held above
  it the oldest gap is given up.
- "Received" means the cloud took the frame: queued for decoding, or dropped by the cloud's own
  overload policy (the edge gets a FrameError for it). Acks and ``next_seq`` report received
  frames; results follow separately.

:func:`validate_header` checks a SessionHeader against the loaded codec and raises
:class:`SessionRejected` carrying the gRPC status to end the stream with.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from latentcast.models.codec import MAX_DECODE_PIXELS
from latentcast.proto.bitstream import MAX_DIM
from latentcast.proto.ids import codec_name, label_set_hash

from .config import SessionsConfig

__all__ = ["SeqTracker", "CameraState", "SessionRegistry", "SessionRejected", "SessionSpec", "validate_header",
           "MAX_DECODE_PIXELS", "MAX_SEQ", "MAX_INSTANCE_ID_CHARS"]

MAX_INSTANCE_ID_CHARS = 64  # SessionHeader.instance_id (the edge sends 32 hex digits)
MAX_SEQ = 1 << 63  # no seq at or above this is accepted: next_seq (seq + 1) must fit the uint64 reply fields


class SessionRejected(Exception):
    """A SessionHeader the cloud cannot serve; ``code`` is the gRPC status to end the stream with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class SeqTracker:
    """Received-seq bookkeeping: contiguous watermark + bounded set of seqs above it (not thread-safe;
    used from the event loop only)."""

    def __init__(self, *, max_out_of_order: int = 1024, skip_gaps: bool = True) -> None:
        if max_out_of_order < 1:
            raise ValueError(f"max_out_of_order must be >= 1, got {max_out_of_order}")
        self._max = max_out_of_order
        self._skip_gaps = skip_gaps
        self._next = 0
        self._ahead: set[int] = set()
        self.missing = 0  # seqs given up as lost

    @property
    def next_seq(self) -> int:
        """Every seq below this was received (or given up as lost)."""
        return self._next

    @property
    def acked_seq(self) -> int | None:
        """The cumulative ack value (``next_seq - 1``), None before seq 0 is covered."""
        return self._next - 1 if self._next > 0 else None

    @property
    def pending_out_of_order(self) -> int:
        return len(self._ahead)

    def refusal(self, seq: int, max_ahead: int) -> str | None:
        """Why ``seq`` must be refused (too far ahead of ``next_seq``), or None; changes nothing."""
        limit = min(self._next + max_ahead, MAX_SEQ)
        if seq >= limit:
            return (f"seq {seq} is not below next_seq {self._next} + sessions.max_seq_ahead {max_ahead} "
                    f"(= {limit}); sequence numbers count frames from 0 per edge instance")
        return None

    def seen(self, seq: int) -> bool:
        return seq < self._next or seq in self._ahead

    def accept(self, seq: int) -> bool:
        """Record ``seq``; False when it was already received (a duplicate)."""
        if seq < 0:
            raise ValueError(f"seq must be >= 0, got {seq}")
        if self.seen(seq):
            return False
        if seq == self._next:
            self._next += 1
        elif self._skip_gaps:
            self.missing += seq - self._next - sum(1 for s in self._ahead if s < seq)
            self._ahead = {s for s in self._ahead if s > seq}
            self._next = seq + 1
        else:
            self._ahead.add(seq)
            while len(self._ahead) > self._max:  # give up the oldest gap
                low = min(self._ahead)
                self.missing += low - self._next
                self._next = low
                self._advance()
        self._advance()
        return True

    def _advance(self) -> None:
        while self._next in self._ahead:
            self._ahead.discard(self._next)
            self._next += 1


@dataclass(frozen=True)
class SessionSpec:
    """What one stream's SessionHeader said (validated)."""

    camera_id: str
    task: str
    labels: tuple[str, ...]
    label_set_hash: bytes
    width: int
    height: int
    fps: float
    edge_version: str
    instance_id: str = ""  # the edge process's random id ("" = an edge without one: resume by camera_id)


@dataclass
class CameraState:
    """Everything kept about one camera across its streams."""

    camera_id: str
    seqs: SeqTracker
    spec: SessionSpec | None = None
    frames_received: int = 0  # since the server started
    frames_analysed: int = 0  # of those, decoded and analysed (counted by the pipeline before the sinks see them)
    frames_failed: int = 0  # of those, answered with a FrameError (dropped, refused, undecodable)
    bytes_received: int = 0  # codec packet bytes of the received frames
    streams: int = 0  # streams opened for this camera
    active_stream: str | None = None  # session_id of the stream that owns the camera now
    active_peer: str = ""  # that stream's peer, for the ALREADY_EXISTS message
    active_since: float = 0.0  # time.time() the active stream opened
    instance_id: str = ""  # the edge instance the sequence state belongs to
    last_message: float = field(default_factory=time.monotonic)  # a message of the active stream arrived
    last_seen: float = field(default_factory=time.monotonic)
    temporal: object = None  # models.temporal.TemporalDecoder of a temporal stream (survives reconnects)
    refresh_asked: float = float("-inf")  # monotonic time of the last RefreshRequest sent


class SessionRegistry:
    """Camera states by ``camera_id``, bounded: beyond ``max_cameras`` the least recently seen
    camera without an active stream is forgotten (it then resumes from next_seq 0)."""

    def __init__(self, *, config: SessionsConfig | None = None) -> None:
        self.config = config or SessionsConfig()
        self._cams: OrderedDict[str, CameraState] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._cams)

    def get(self, camera_id: str) -> CameraState | None:
        return self._cams.get(camera_id)

    def _new_seqs(self) -> SeqTracker:
        return SeqTracker(max_out_of_order=self.config.max_out_of_order, skip_gaps=self.config.skip_gaps)

    def open(self, spec: SessionSpec, *, peer: str = "") -> tuple[CameraState, str, bool]:
        """The camera's state, a fresh session id, and whether the state was resumed (else it starts at
        next_seq 0); the new stream owns the camera. Raises :class:`SessionRejected` (ALREADY_EXISTS),
        changing nothing, while a live stream of another instance holds the camera."""
        with self._lock:
            now = time.monotonic()
            st = self._cams.get(spec.camera_id)
            if st is None:
                st = CameraState(camera_id=spec.camera_id, seqs=self._new_seqs())
                self._cams[spec.camera_id] = st
            elif (st.active_stream is not None and spec.instance_id != st.instance_id
                  and now - st.last_message < self.config.takeover_after_s):
                since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.active_since))
                raise SessionRejected(grpc.StatusCode.ALREADY_EXISTS, (
                    f"camera {spec.camera_id!r} is published by another edge (instance "
                    f"{st.instance_id or '(none)'} from {st.active_peer or '?'}) since {since}; two edges may not "
                    f"share a camera_id (it is taken over only after {self.config.takeover_after_s:g} s of silence)"))
            resumed = spec.instance_id == st.instance_id and st.seqs.next_seq > 0
            if spec.instance_id != st.instance_id:
                # another process of the edge: its seqs start at 0, so the camera's state starts afresh
                st.seqs = self._new_seqs()
                st.temporal = None
                st.refresh_asked = float("-inf")
            self._cams.move_to_end(spec.camera_id)
            session_id = uuid.uuid4().hex[:16]
            st.spec = spec
            st.instance_id = spec.instance_id
            st.streams += 1
            st.active_stream = session_id
            st.active_peer = peer
            st.active_since = time.time()
            st.last_message = st.last_seen = now
            self._evict()
            return st, session_id, resumed

    def close(self, camera_id: str, session_id: str) -> None:
        """The stream ``session_id`` ended; the state stays for a later resume."""
        with self._lock:
            st = self._cams.get(camera_id)
            if st is not None and st.active_stream == session_id:
                st.active_stream = None
                st.last_seen = time.monotonic()

    def _evict(self) -> None:
        over = len(self._cams) - self.config.max_cameras
        if over <= 0:
            return
        for cam in [c for c, s in self._cams.items() if s.active_stream is None][:over]:
            del self._cams[cam]


def _check_text(name: str, value: str, max_chars: int, *, required: bool) -> str:
    if required and not value:
        raise SessionRejected(grpc.StatusCode.INVALID_ARGUMENT, f"SessionHeader.{name} must not be empty")
    if len(value) > max_chars:
        raise SessionRejected(grpc.StatusCode.INVALID_ARGUMENT,
                              f"SessionHeader.{name} has {len(value)} characters (max {max_chars})")
    if any(ord(ch) < 32 for ch in value):
        raise SessionRejected(grpc.StatusCode.INVALID_ARGUMENT,
                              f"SessionHeader.{name} {value[:64]!r} contains control characters")
    return value


def _codec_desc(codec_id: int) -> str:
    try:
        return f"{codec_id} ({codec_name(codec_id)})"
    except ValueError:
        return f"{codec_id} (unknown)"


def validate_header(header, *, codec_id: int, weights_hash: bytes,
                    config: SessionsConfig | None = None) -> SessionSpec:
    """Check a ``latentcast_v1_pb2.SessionHeader`` against the loaded codec.

    Raises :class:`SessionRejected` with INVALID_ARGUMENT for a malformed header (empty or too
    long camera id, frame size outside 1..16384 or above the decoder's pixel limit, too many
    labels, bad fps) and FAILED_PRECONDITION when the codec id or weights hash is not the cloud's
    (the message names both values)."""
    cfg = config or SessionsConfig()
    camera_id = _check_text("camera_id", header.camera_id, cfg.max_id_chars, required=True)
    task = _check_text("task", header.task, cfg.max_id_chars, required=False)
    w, h = int(header.width), int(header.height)
    if not (1 <= w <= MAX_DIM and 1 <= h <= MAX_DIM):
        raise SessionRejected(grpc.StatusCode.INVALID_ARGUMENT,
                              f"SessionHeader frame size {w}x{h} out of range 1..{MAX_DIM} per side")
    max_pixels = min(cfg.max_frame_pixels, MAX_DECODE_PIXELS)
    if w * h > max_pixels:
        raise SessionRejected(grpc.StatusCode.INVALID_ARGUMENT,
                              f"SessionHeader frame size {w}x{h} ({w * h} pixels) exceeds the cloud's limit of "
                              f"{max_pixels} pixels (sessions.max_frame_pixels; 1920x1088 = {1920 * 1088})")
    fps = float(header.fps)
    if not math.isfinite(fps) or fps < 0:
        raise SessionRejected(grpc.StatusCode.INVALID_ARGUMENT, f"SessionHeader.fps {fps!r} must be finite and >= 0")
    labels: Sequence[str] = tuple(header.labels)
    if len(labels) > cfg.max_labels:
        raise SessionRejected(grpc.StatusCode.INVALID_ARGUMENT,
                              f"SessionHeader has {len(labels)} labels (max {cfg.max_labels})")
    for i, lab in enumerate(labels):
        _check_text(f"labels[{i}]", lab, cfg.max_id_chars, required=False)
    if header.codec_id != codec_id:
        raise SessionRejected(grpc.StatusCode.FAILED_PRECONDITION,
                              f"session codec_id {_codec_desc(header.codec_id)} does not match the cloud's codec "
                              f"{_codec_desc(codec_id)}")
    if bytes(header.weights_hash) != weights_hash:
        raise SessionRejected(grpc.StatusCode.FAILED_PRECONDITION,
                              f"session weights_hash {bytes(header.weights_hash).hex() or '(empty)'} does not match "
                              f"the cloud's codec weights {weights_hash.hex()}")
    return SessionSpec(camera_id=camera_id, task=task, labels=tuple(labels), label_set_hash=label_set_hash(labels),
                       width=w, height=h, fps=fps, edge_version=_check_text("edge_version", header.edge_version,
                                                                            cfg.max_id_chars, required=False),
                       instance_id=_check_text("instance_id", header.instance_id, MAX_INSTANCE_ID_CHARS,
                                               required=False))
