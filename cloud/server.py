"""The cloud's gRPC service: ``Stream`` (edge frames in; acks, results, errors out) and ``Subscribe``.

This module does gRPC only: streams, acks, backpressure, client-input checks, ``Subscribe``, the servers'
lifecycle. What happens to a frame is the chain assembled in ``cloud/pipeline.py`` (its docstring has the
data-flow diagram): decoding by the session's codec in ``cloud/decode.py``, the worker pool in
``cloud/workers.py``, composition in ``cloud/compose.py``, analytics, sinks.

Two gRPC servers and one HTTP endpoint::

    port              Latentcast service (bearer-token interceptor, TLS/mTLS when configured)
    maintenance_port  grpc.health.v1.Health + server reflection (no auth: for probes and grpcurl)
    metrics_port      Prometheus /metrics

Readiness: the health status ("" and ``latentcast.v1.Latentcast``) is NOT_SERVING until the codec
and the detector are loaded and warmed with one dummy frame (coded and decoded), then SERVING;
calls before that end with UNAVAILABLE. On shutdown it turns NOT_SERVING first.

``Stream`` semantics (proto/latentcast_v1.proto has the contract):

- The first message must be a SessionHeader (else INVALID_ARGUMENT). Its codec id picks the stream's
  decoder among the codecs ``pipeline.codecs`` accepts (``decode.DecoderRegistry.session``): FAILED_PRECONDITION
  for a codec id not accepted (the message names the accepted ones) or other weights, INVALID_ARGUMENT for a
  bad header; the reply is SessionAccepted(next_seq, resumed) from the camera's state
  (``sessions.SessionRegistry.open``).
- Edge identity, one publisher per camera. The camera's sequence state belongs to the edge instance
  that made it (``SessionHeader.instance_id``, random per edge process): the same instance
  reconnecting resumes it (``resumed``), another instance (a restarted edge, whose seqs start at 0
  again) starts it afresh at next_seq 0 with no temporal decoder state, so every frame it sends is
  analysed; an edge without an instance id resumes by camera_id, as before instance ids. The stream
  that holds the camera keeps it: a stream of another instance is refused with ALREADY_EXISTS (the
  message names the holder's instance, peer and start time) while the holder sent a message within
  ``sessions.takeover_after_s`` or still has frames in the pipeline (backpressure may have stopped
  reading it: that silence is the cloud's); a holder silent longer (a killed edge whose connection
  is not yet seen dead) is superseded and ends with ABORTED. A newer stream of the same instance
  supersedes its older one at once (ABORTED); a stream that ended frees the camera at once. A
  refused stream changes nothing.
- Each FramePacket: its seq must be below ``next_seq + sessions.max_seq_ahead`` (and below 2**63, so
  every reply field fits uint64), else the stream ends with INVALID_ARGUMENT naming the seq, next_seq
  and the limit, and the camera's state is not touched (a reconnect is accepted as before).
  A seq already received is re-acknowledged at once and not processed again.
  Otherwise the packet is parsed on the event loop by the stream's decoder (``decoder.admit``: bounded
  by ``server.max_packet_bytes``, O(len), nothing decoded).
  Stream-ending errors (INVALID_ARGUMENT, this stream only): an empty packet, a packet above
  ``max_packet_bytes``, bytes that are not an LCF v1 packet (a latentcast stream; a JPEG stream gets a
  FrameError ``malformed_packet`` and goes on), a second SessionHeader or an empty
  EdgeMessage. The refused frame's seq still counts as received, so a reconnecting edge that
  resends it gets a re-ack instead of the same error again. Per-frame errors (a FrameError, the
  stream goes on): a CRC32 that does not match the packet's bytes or a symbol-checksum mismatch
  (``checksum_mismatch``), edge boxes that do not fit the session (``invalid_edge_boxes``, see
  :func:`_edge_boxes`: the frame is refused, not decoded and not written to the sinks), another codec
  in the packet, a frame size or label set other than the session's, decoder or detector failures,
  and frames dropped because the cloud is overloaded (``cloud_overloaded``); codes in
  ``cloud/frames.py``. A whole gRPC message above ``server.max_message_bytes`` is refused by gRPC
  itself with RESOURCE_EXHAUSTED.
- Bytes that are not a protobuf message of the method's request type (first message, a later one, or
  a SubscribeRequest) end the call with INVALID_ARGUMENT: the service is registered with a request
  deserializer that never raises (:func:`_lenient`), so a DecodeError is a client error, not a
  servicer exception with a traceback.
- Client errors are logged without a traceback, through the server's :class:`RateLimitedLog`
  (``CloudServer.rl``), keyed by what happened and the peer's host, with the peer in the line: a
  client that repeats a mistake (or a bad token) at line rate gets one line per interval with the
  count of the others. Tokens are never logged.
- "Received" (acks, next_seq) means the cloud took responsibility for the frame, before decoding.
- Frames go to the :class:`~latentcast.cloud.pipeline.Pipeline` (worker threads); FrameAnalytics
  results are sent as they come back, in completion order. A cumulative Ack (every seq <= acked_seq
  received) goes out after ``ack_every_frames`` frames (fewer when the edge's SessionHeader says it waits
  for an Ack after ``max_in_flight`` frames) or ``ack_interval_ms``, at once for a
  duplicate, and when the stream ends. When the edge half-closes, the stream sends the results
  still in flight and a final Ack, then ends OK.
- Backpressure: when ``stream_outbox`` messages wait for the client, the server stops reading its
  frames (gRPC flow control then slows the edge).
- Decode cost: a session declares at most ``sessions.max_frame_pixels`` (1920x1088); the pipeline
  serves streams in turn and drops frames older than ``pipeline.max_frame_age_s`` and the queued frames
  of a stream that ended (``cloud/workers.py``); the entropy decoder refuses a forged section at its
  first inconsistent group (``proto/entropy.py``). A stream whose frames keep being refused for the
  sender's fault (``CLIENT_FAULT_CODES``: undecodable, bad checksum or edge boxes, not the session's)
  is read more slowly: after 3 in a row, 10 ms before its next frame, doubling up to
  ``pipeline.refused_backoff_max_s``; an analysed frame resets it. A garbage stream then costs a few
  frames a second however fast it sends.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from latentcast.config import ConfigError
from latentcast.models.codec import LatentCodec
from latentcast.proto import latentcast_v1_pb2 as pb
from latentcast.proto import latentcast_v1_pb2_grpc as pb_grpc
from latentcast.proto.bitstream import MAX_ROIS
from latentcast.proto.ids import SUBSCRIBED_METADATA_KEY

from .analytics import Detection, Detector
from .auth import HANDLER_KINDS, NOBODY, BearerTokenInterceptor, Principal, TokenRegistry
from .config import CloudConfig, is_loopback
from .decode import Decoder, DecoderRegistry, PacketRefused, describe_packet
from .frames import CLIENT_FAULT_CODES, AnalysedFrame, FrameJob, FrameOutcome
from .metrics import CloudMetrics, MetricsHttpServer, RateLimitedLog
from .pipeline import Pipeline, load_and_warm
from .sessions import CameraState, SessionRegistry, SessionRejected, SessionSpec
from .sinks import FanOut, JsonlSink, to_proto_boxes

log = logging.getLogger(__name__)

__all__ = ["CloudServer", "SERVICE_NAME", "grpc_server_options", "MAX_EDGE_BOXES", "INVALID_EDGE_BOXES",
           "InvalidEdgeBoxes"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Latentcast"].full_name  # "latentcast.v1.Latentcast"
_HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def grpc_server_options(cfg: CloudConfig) -> list[tuple[str, Any]]:
    """The explicit channel options of the Latentcast server (message limits, keepalive)."""
    s = cfg.server
    return [
        ("grpc.max_receive_message_length", s.max_message_bytes),
        ("grpc.max_send_message_length", s.max_message_bytes),
        ("grpc.keepalive_time_ms", int(s.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", int(s.keepalive_permit_without_calls)),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", int(s.min_client_ping_interval_s * 1000)),
        ("grpc.http2.max_ping_strikes", s.max_ping_strikes),
        ("grpc.http2.max_pings_without_data", 0),  # the server's own keepalive pings need no data frames
        ("grpc.so_reuseport", 0),  # a busy port is an error, not a silently shared listener
    ]


# ---------------------------------------------------------------------------------------- streams
_BACKPRESSURE_POLL_S = 0.005  # how often a paused stream checks for room in the pipeline
_REFUSALS_FREE = 3  # frames refused in a row (the sender's fault) before the stream is read more slowly
_REFUSAL_BACKOFF_S = 0.01  # the first wait; it doubles per further refusal up to pipeline.refused_backoff_max_s

class _End:
    """Outbox marker: end the stream with this status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        self.message = message


_HALF_CLOSED = object()  # outbox marker: the edge finished sending
_SHUTDOWN = object()  # outbox marker: the server is stopping


class _Outbox:
    """Messages for one stream's client, filled by its reader task and by pipeline callbacks."""

    def __init__(self) -> None:
        self._q: deque[Any] = deque()
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def __len__(self) -> int:
        return len(self._q)

    def put(self, item: Any) -> None:
        self._q.append(item)
        self._ready.set()

    def poke(self) -> None:
        """Wake :meth:`get` without an item (e.g. an ack became due)."""
        self._ready.set()

    async def get(self, timeout: float | None) -> Any | None:
        """The next item, or None after ``timeout`` seconds or a :meth:`poke` without one."""
        if not self._q:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                return None
            if not self._q:
                return None
        item = self._q.popleft()
        self._room.set()
        return item

    async def wait_room(self, limit: int) -> None:
        while len(self._q) >= limit:
            self._room.clear()
            await self._room.wait()


class _Stream:
    """One open ``Stream`` call."""

    def __init__(self, *, server: CloudServer, state: CameraState, spec: SessionSpec, session_id: str,
                 peer: str, decoder: Decoder, edge_window: int = 0) -> None:
        self.server = server
        # a cumulative Ack at least every edge_window frames (SessionHeader.max_in_flight): an edge that waits
        # for acks after that many frames must not wait for ack_every_frames / ack_interval_ms instead
        every = server.config.server.ack_every_frames
        self.ack_every = min(every, edge_window) if edge_window > 0 else every
        self.state = state
        self.spec = spec
        self.decoder = decoder  # the session's codec's (cloud/decode.py)
        self.session_id = session_id
        self.peer = peer
        self.outbox = _Outbox()
        self.pending = 0  # frames submitted whose outcome has not come back
        self.closed = False
        self.reader: asyncio.Task | None = None
        self._unacked = 0
        self._first_unacked = 0.0
        self._ack_now = False
        self._last_acked: int | None = None
        self.frames = 0
        self.duplicates = 0
        self.outcome = "cancelled"  # how the stream ended, for the log
        self.shutting_down = False
        self.refused_in_row = 0  # frames refused in a row for the sender's fault (CLIENT_FAULT_CODES)
        self.refused = 0

    # ---------------------------------------------------------------- refused frames slow the stream down
    def frame_refused(self, code: str) -> None:
        self.state.frames_failed += 1
        if code in CLIENT_FAULT_CODES:
            self.refused_in_row += 1
            self.refused += 1

    def refused_backoff(self) -> float:
        """Seconds to wait before reading the next frame: 0 until ``_REFUSALS_FREE`` refusals in a row, then
        10 ms doubling per refusal up to ``pipeline.refused_backoff_max_s``."""
        cap = self.server.config.pipeline.refused_backoff_max_s
        k = self.refused_in_row - _REFUSALS_FREE
        if k < 0 or cap <= 0:
            return 0.0
        return min(cap, _REFUSAL_BACKOFF_S * 2.0 ** min(k, 30))

    # ---------------------------------------------------------------- acks
    def count_frame(self, *, duplicate: bool = False) -> None:
        if self._unacked == 0:
            self._first_unacked = time.monotonic()
        self._unacked += 1
        self._ack_now |= duplicate

    def ack_timeout(self) -> float | None:
        if self._unacked == 0:
            return None
        due = self._first_unacked + self.server.config.server.ack_interval_ms / 1000.0
        return max(0.0, due - time.monotonic())

    def take_ack(self, *, force: bool = False) -> pb.CloudMessage | None:
        """An Ack when one is due (or ``force`` and anything new to ack), else None."""
        cfg = self.server.config.server
        due = force or self._ack_now or self._unacked >= self.ack_every or (
            self._unacked > 0 and time.monotonic() - self._first_unacked >= cfg.ack_interval_ms / 1000.0)
        acked = self.state.seqs.acked_seq
        if not due or acked is None or (self._unacked == 0 and acked == self._last_acked and not self._ack_now):
            return None
        self._unacked = 0
        self._ack_now = False
        self._last_acked = acked
        return pb.CloudMessage(ack=pb.Ack(acked_seq=_u64(acked), frames_received=_u64(self.state.frames_received)))

    # ---------------------------------------------------------------- pipeline hand-back
    def deliver(self, outcome: FrameOutcome) -> None:
        """Called by the pipeline from any thread."""
        try:
            self.server._loop.call_soon_threadsafe(self._on_outcome, outcome)
        except RuntimeError:  # loop closed
            pass

    def _on_outcome(self, outcome: FrameOutcome) -> None:
        self.pending -= 1
        if isinstance(outcome, AnalysedFrame):
            self.refused_in_row = 0
        else:
            self.frame_refused(outcome.code)
        if self.closed:
            return
        if isinstance(outcome, AnalysedFrame):
            job = outcome.job
            self.outbox.put(pb.CloudMessage(result=pb.FrameAnalytics(
                seq=job.seq, capture_ts_us=job.capture_ts_us, boxes=to_proto_boxes(outcome.detections),
                decode_ms=outcome.decode_ms, analytics_ms=outcome.analytics_ms, packet_bytes=job.packet_bytes,
                bpp=outcome.bpp, queue_ms=outcome.queue_ms, compose_ms=outcome.compose_ms)))
        else:
            self.outbox.put(_frame_error(outcome.seq, outcome.code, outcome.message))

    # ---------------------------------------------------------------- endings
    def end(self, code: grpc.StatusCode, message: str) -> None:
        if self.reader is not None and self.reader is not asyncio.current_task():
            self.reader.cancel()
        self.outbox.put(_End(code, message))

    def shutdown(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        self.outbox.put(_SHUTDOWN)


_U64_MAX = (1 << 64) - 1


def _u64(value: int) -> int:
    """``value`` clamped to a uint64 reply field: building a reply never raises ("Value out of range"),
    whatever the state (seqs are kept below ``sessions.MAX_SEQ`` at the boundary anyway)."""
    return min(max(int(value), 0), _U64_MAX)


def _frame_error(seq: int, code: str, message: str) -> pb.CloudMessage:
    return pb.CloudMessage(error=pb.FrameError(seq=seq, code=code, message=message[:1024]))


# ------------------------------------------------------------------------------ client input
MAX_EDGE_BOXES = MAX_ROIS  # edge boxes per FramePacket: as many as a packet can carry ROIs (1024)
INVALID_EDGE_BOXES = "invalid_edge_boxes"  # FrameError code of a frame refused for its edge boxes


class InvalidEdgeBoxes(ValueError):
    """A FramePacket's edge boxes do not fit its session (the message names the first bad box)."""


def _edge_boxes(boxes, spec: SessionSpec) -> tuple[Detection, ...]:
    """The FramePacket's ``edge_boxes`` as Detections, checked against the session.

    Every box must have finite coordinates inside the session's frame (0 <= x0 <= x1 <= width,
    0 <= y0 <= y1 <= height; a zero-width box is tolerated, float32 rounding can make one), a
    ``label_id`` indexing the session's label list, a ``label`` that is empty or that label (the
    Detection always carries the session's text, so no client string reaches the sinks), and a
    finite score in [0, 1]; at most :data:`MAX_EDGE_BOXES` boxes (checked first: O(1) for a huge list).
    Raises :class:`InvalidEdgeBoxes`; the caller refuses the frame with a per-frame error.
    """
    n = len(boxes)
    if n > MAX_EDGE_BOXES:
        raise InvalidEdgeBoxes(f"{n} edge boxes in one frame (max {MAX_EDGE_BOXES})")
    w, h, labels = spec.width, spec.height, spec.labels
    out = []
    for i, b in enumerate(boxes):
        x0, y0, x1, y1, score = b.x0, b.y0, b.x1, b.y1, b.score
        if not (math.isfinite(x0) and math.isfinite(y0) and math.isfinite(x1) and math.isfinite(y1)):
            raise InvalidEdgeBoxes(f"edge box {i}: coordinates ({x0}, {y0}, {x1}, {y1}) are not finite")
        if not (0.0 <= x0 <= x1 <= w and 0.0 <= y0 <= y1 <= h):
            raise InvalidEdgeBoxes(f"edge box {i}: ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is not a box inside the "
                                   f"session's {w}x{h} frame (0 <= x0 <= x1 <= {w}, 0 <= y0 <= y1 <= {h})")
        if not (math.isfinite(score) and 0.0 <= score <= 1.0):
            raise InvalidEdgeBoxes(f"edge box {i}: score {score} is not in [0, 1]")
        label_id = int(b.label_id)
        if label_id >= len(labels):
            raise InvalidEdgeBoxes(f"edge box {i}: label_id {label_id} is outside the session's "
                                   f"{len(labels)} labels")
        if b.label and b.label != labels[label_id]:
            raise InvalidEdgeBoxes(f"edge box {i}: label {b.label[:64]!r} is not the session's label "
                                   f"{label_id} ({labels[label_id]!r})")
        out.append(Detection(x0=x0, y0=y0, x1=x1, y1=y1, class_id=label_id, label=labels[label_id], score=score))
    return tuple(out)


class _Undecodable:
    """What :func:`_lenient` hands the servicer for request bytes that are not a valid message."""

    __slots__ = ("type_name", "size", "error")

    def __init__(self, type_name: str, size: int, error: Exception) -> None:
        self.type_name = type_name
        self.size = size
        self.error = error

    def __str__(self) -> str:
        return (f"{self.size} bytes that are not a valid {self.type_name} protobuf message "
                f"({type(self.error).__name__}: {str(self.error)[:200]})")


def _lenient(message_cls):
    """A request deserializer that never raises: grpc.aio would turn a DecodeError in its own
    deserialization into UNKNOWN (unary requests) or an exception out of the request iterator,
    both with a traceback; an :class:`_Undecodable` lets the servicer answer INVALID_ARGUMENT."""
    parse = message_cls.FromString
    type_name = message_cls.DESCRIPTOR.full_name

    def deserialize(data: bytes):
        try:
            return parse(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or anything else hostile bytes make the parser raise
            return _Undecodable(type_name, len(data), exc)

    return deserialize


def _add_servicer(servicer, server: grpc.aio.Server) -> None:
    """``latentcast_v1_pb2_grpc.add_LatentcastServicer_to_server`` with :func:`_lenient` request
    deserializers; the methods, their streaming kinds and message types come from the proto's
    service descriptor, so this follows the committed stubs."""
    service = pb.DESCRIPTOR.services_by_name["Latentcast"]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        make = HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(getattr(servicer, method.name), request_deserializer=_lenient(request_cls),
                                     response_serializer=response_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _peer_host(peer: str) -> str:
    """``ipv4:10.0.0.7:53122`` -> ``ipv4:10.0.0.7`` (a client's connections share one rate-limit key)."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


class _PeerLoggingAuth(BearerTokenInterceptor):
    """The bearer-token check, with each refusal logged through the server's rate limiter with the
    peer (the interceptor itself does not know the peer: only the call's context does)."""

    def __init__(self, *, registry: TokenRegistry, on_reject, rl: RateLimitedLog) -> None:
        super().__init__(registry=registry, on_reject=on_reject)
        self._rl = rl

    def log_refusal(self, context, method: str, reason: str) -> None:
        peer = context.peer()
        self._rl(logging.INFO, f"auth:{reason}:{_peer_host(peer)}", "refused %s from %s: %s bearer token", method,
                 peer, reason)


class _LatentcastServicer(pb_grpc.LatentcastServicer):
    def __init__(self, server: CloudServer) -> None:
        self._srv = server

    async def Stream(self, request_iterator: AsyncIterator[pb.EdgeMessage],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pb.CloudMessage]:
        srv = self._srv
        m = srv.metrics

        async def fail(code: grpc.StatusCode, message: str) -> None:
            m.stream_errors.labels(code=code.name).inc()
            peer = context.peer()
            srv.rl(logging.INFO, f"stream:{code.name}:{_peer_host(peer)}", "stream from %s ended: %s: %s", peer,
                   code.name, message)
            await context.abort(code, message)

        if not srv.ready:
            await fail(grpc.StatusCode.UNAVAILABLE, "the cloud is warming up (health NOT_SERVING); retry shortly")
        it = request_iterator.__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            await fail(grpc.StatusCode.INVALID_ARGUMENT, "the stream ended before its SessionHeader")
        if isinstance(first, _Undecodable):
            await fail(grpc.StatusCode.INVALID_ARGUMENT, f"the first message is {first}")
        kind = first.WhichOneof("msg")
        if kind != "header":
            await fail(grpc.StatusCode.INVALID_ARGUMENT,
                       f"the first message must be a SessionHeader, got {kind or 'an empty EdgeMessage'}")
        try:
            spec, decoder = srv.pipeline.decoders.session(first.header, srv.config.sessions)
        except SessionRejected as exc:
            await fail(exc.code, exc.message)
        principal = srv.principal(context)
        if principal is not None and not principal.may_publish(spec.camera_id):  # before any state is touched
            await fail(grpc.StatusCode.PERMISSION_DENIED,
                       f"{principal.describe()} may not publish camera {spec.camera_id!r}")
        previous = srv._streams.get(spec.camera_id)  # the stream holding the camera, if any
        if previous is not None and srv.pipeline is not None and srv.pipeline.in_flight(previous.session_id) > 0:
            # its frames are still being decoded, and backpressure may have stopped reading it: that silence is
            # the cloud's, not the edge's (a slow decoder must not hand the camera to another edge)
            previous.state.last_message = time.monotonic()
        silent_s = time.monotonic() - previous.state.last_message if previous is not None else 0.0
        try:
            state, session_id, resumed = srv.sessions.open(spec, peer=context.peer())
        except SessionRejected as exc:  # another edge instance publishes this camera
            await fail(exc.code, exc.message)
        if previous is not None:
            if previous.spec.instance_id != spec.instance_id:  # a holder of another instance, silent too long
                log.warning("camera %r: stream %s (instance %s from %s) sent nothing for %.1f s "
                            "(sessions.takeover_after_s %g): taken over by instance %s from %s",
                            spec.camera_id, previous.session_id, previous.spec.instance_id or "(none)",
                            previous.peer, silent_s, srv.config.sessions.takeover_after_s,
                            spec.instance_id or "(none)", context.peer())
                why = (f"superseded by edge instance {spec.instance_id or '(none)'} from {context.peer()}: this "
                       f"stream sent nothing for {silent_s:.1f} s (sessions.takeover_after_s "
                       f"{srv.config.sessions.takeover_after_s:g})")
            else:
                why = f"superseded by a newer stream of the same edge instance {spec.instance_id or '(none)'}"
            previous.end(grpc.StatusCode.ABORTED, f"camera {spec.camera_id!r}: {why} (session {session_id})")
        st = _Stream(server=srv, state=state, spec=spec, session_id=session_id, peer=context.peer(),
                     decoder=decoder, edge_window=first.header.max_in_flight)
        srv._streams[spec.camera_id] = st
        m.active_sessions.inc()
        next_seq = state.seqs.next_seq
        if next_seq > 0:
            m.reconnects.inc()
        log.info("session %s: camera %r task %r %dx%d, %d labels, codec %s, edge %s instance %s from %s; "
                 "next_seq %d (%s)", session_id, spec.camera_id, spec.task, spec.width, spec.height, len(spec.labels),
                 decoder.name, spec.edge_version or "?", spec.instance_id or "(none)", context.peer(), next_seq,
                 "resumed" if resumed else "fresh")
        try:
            yield pb.CloudMessage(accepted=pb.SessionAccepted(session_id=session_id, next_seq=_u64(next_seq),
                                                              resumed=resumed))
            st.reader = asyncio.create_task(self._read(st, it), name=f"latentcast-stream-{session_id}")
            finishing = False
            while True:
                item = await st.outbox.get(st.ack_timeout())
                if isinstance(item, _End):
                    ack = st.take_ack(force=True)
                    if ack is not None:
                        yield ack
                    st.outcome = item.code.name
                    await fail(item.code, item.message)
                elif item is _HALF_CLOSED:
                    finishing = True
                elif item is _SHUTDOWN:
                    finishing = st.shutting_down = True
                elif item is not None:
                    yield item
                ack = st.take_ack()
                if ack is not None:
                    yield ack
                if finishing and st.pending <= 0 and not len(st.outbox):
                    ack = st.take_ack(force=True)
                    if ack is not None:
                        yield ack
                    if st.shutting_down:
                        st.outcome = "server shutdown"
                        await fail(grpc.StatusCode.UNAVAILABLE,
                                   "the server is shutting down; reconnect to resume from SessionAccepted.next_seq")
                    st.outcome = "finished"
                    return
        finally:
            log.info("session %s (camera %r) ended (%s): %d frames, %d refused, %d duplicates, next_seq %d",
                     session_id, spec.camera_id, st.outcome, st.frames, st.refused, st.duplicates,
                     state.seqs.next_seq)
            st.closed = True
            if st.reader is not None and not st.reader.done():
                st.reader.cancel()
            if st.outcome not in ("finished", "server shutdown") and srv.pipeline is not None:
                dropped = srv.pipeline.cancel(session_id)  # nobody waits for them: do not spend the CPU
                if dropped:
                    log.info("session %s: %d queued frame(s) dropped undecoded (stream ended)", session_id, dropped)
            if srv._streams.get(spec.camera_id) is st:
                del srv._streams[spec.camera_id]
            srv.sessions.close(spec.camera_id, session_id)
            m.active_sessions.dec()

    async def _read(self, st: _Stream, it: AsyncIterator[pb.EdgeMessage]) -> None:
        """The stream's reader task: frames in, into the pipeline."""
        srv = self._srv
        m = srv.metrics
        scfg = srv.config.server
        try:
            async for msg in it:
                st.state.last_message = time.monotonic()  # the holder is alive (sessions.takeover_after_s)
                if isinstance(msg, _Undecodable):
                    st.end(grpc.StatusCode.INVALID_ARGUMENT, f"a message after the SessionHeader is {msg}")
                    return
                await st.outbox.wait_room(scfg.stream_outbox)
                backoff = st.refused_backoff()
                if backoff > 0:  # its frames keep being refused: read it slowly (flow control slows the sender)
                    srv.rl(logging.WARNING, f"backoff:{_peer_host(st.peer)}",
                           "stream of camera %r from %s: %d frames refused in a row; its next frame is read %.2f s "
                           "later", st.spec.camera_id, st.peer, st.refused_in_row, backoff)
                    await asyncio.sleep(backoff)
                kind = msg.WhichOneof("msg")
                if kind != "frame":
                    what = "a second SessionHeader" if kind == "header" else "an empty EdgeMessage"
                    st.end(grpc.StatusCode.INVALID_ARGUMENT,
                           f"expected a FramePacket after the SessionHeader, got {what}")
                    return
                f = msg.frame
                seq = int(f.seq)
                n = len(f.packet)
                pcfg = srv.config.pipeline
                if pcfg.backpressure:
                    # stop reading this stream while its frames fill the pipeline: HTTP/2 flow control
                    # then fills the edge's send queue, which drops by its own policy (live first)
                    while (srv.pipeline.in_flight(st.session_id) >= pcfg.max_queued_per_session
                           and not (st.closed or st.shutting_down)):
                        await asyncio.sleep(_BACKPRESSURE_POLL_S)
                    if st.closed or st.shutting_down:
                        return  # this frame is not accepted, so not acked: the edge resends it after resuming
                refusal = st.state.seqs.refusal(seq, srv.config.sessions.max_seq_ahead)
                if refusal is not None:  # checked before anything is recorded: the camera's state stays as it is
                    st.end(grpc.StatusCode.INVALID_ARGUMENT, f"frame seq {seq}: {refusal}")
                    return
                if not st.state.seqs.accept(seq):
                    st.duplicates += 1
                    m.frames_duplicate.inc()
                    st.count_frame(duplicate=True)
                    st.outbox.poke()  # wake the writer: the re-ack is due now
                    continue
                # from here the seq counts as received, even if the packet is refused below: a resend of
                # it after a reconnect is re-acked, never a loop of the same error
                missing = st.state.seqs.missing
                if missing:
                    m.frames_missing.inc(missing)
                    st.state.seqs.missing = 0
                st.frames += 1
                st.state.frames_received += 1
                st.state.bytes_received += n
                m.frames_received.inc()
                m.bytes_received.inc(n)
                st.count_frame()
                if n == 0:
                    m.frame_errors.labels(code="malformed_packet").inc()
                    st.end(grpc.StatusCode.INVALID_ARGUMENT, f"frame seq {seq}: empty packet")
                    return
                if n > scfg.max_packet_bytes:
                    m.frame_errors.labels(code="malformed_packet").inc()
                    st.end(grpc.StatusCode.INVALID_ARGUMENT,
                           f"frame seq {seq}: packet of {n} bytes exceeds server.max_packet_bytes "
                           f"{scfg.max_packet_bytes}")
                    return
                try:
                    packet = st.decoder.admit(f.packet, st.spec)
                except PacketRefused as exc:
                    if exc.ends_stream:
                        m.frame_errors.labels(code=exc.code).inc()
                        st.end(grpc.StatusCode.INVALID_ARGUMENT, f"frame seq {seq}: {exc.message}")
                        return
                    self._refuse(st, seq, exc.code, exc.message)
                    continue
                try:
                    edge_boxes = _edge_boxes(f.edge_boxes, st.spec)
                except InvalidEdgeBoxes as exc:  # the edge's mistake: refuse this frame, keep the stream
                    st.frame_refused(INVALID_EDGE_BOXES)
                    m.frame_errors.labels(code=INVALID_EDGE_BOXES).inc()
                    srv.rl(logging.WARNING, f"fail:{INVALID_EDGE_BOXES}:{_peer_host(st.peer)}",
                           "frame %s/%d from %s: %s", st.spec.camera_id, seq, st.peer, exc)
                    st.outbox.put(_frame_error(seq, INVALID_EDGE_BOXES, str(exc)))
                    continue
                width, height = st.decoder.frame_size(packet)
                m.bpp.observe(n * 8.0 / (width * height))
                job = FrameJob(stream_id=st.session_id, spec=st.spec, seq=seq, capture_ts_us=int(f.capture_ts_us),
                               packet=packet, packet_bytes=n, edge_boxes=edge_boxes, deliver=st.deliver,
                               codec_id=st.decoder.codec_id, mode=describe_packet(packet), camera=st.state)
                if st.decoder.needs_prepare(packet):  # temporal: into the camera's state, in arrival order
                    try:
                        await st.decoder.prepare(job, packet, st.state)
                    except PacketRefused as exc:
                        if exc.refresh:  # a reference is missing: ask the edge for a keyframe
                            m.refresh_requests.inc()
                            st.outbox.put(pb.CloudMessage(refresh=pb.RefreshRequest(seq=seq,
                                                                                    reason=exc.message[:1024])))
                        self._refuse(st, seq, exc.code, exc.message)
                        continue
                st.pending += 1
                srv.pipeline.submit(job)
            st.outbox.put(_HALF_CLOSED)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError:  # the call is gone (cancelled by the client)
            st.outbox.put(_HALF_CLOSED)
        except Exception as exc:  # noqa: BLE001 - report, do not kill the server
            log.exception("session %s: reader failed", st.session_id)
            st.end(grpc.StatusCode.INTERNAL, f"internal error reading the stream: {type(exc).__name__}")

    def _refuse(self, st: _Stream, seq: int, code: str, message: str) -> None:
        """A frame refused before the pipeline (the stream goes on): counted, logged, a FrameError."""
        srv = self._srv
        srv.metrics.frame_errors.labels(code=code).inc()
        st.frame_refused(code)
        srv.rl(logging.WARNING, f"fail:{code}", "frame %s/%d: %s", st.spec.camera_id, seq, message)
        st.outbox.put(_frame_error(seq, code, message))

    async def Subscribe(self, request: pb.SubscribeRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[pb.FrameResult]:
        srv = self._srv
        if not srv.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the cloud is warming up (health NOT_SERVING)")
        if isinstance(request, _Undecodable):
            peer = context.peer()
            srv.rl(logging.INFO, f"subscribe:INVALID_ARGUMENT:{_peer_host(peer)}",
                   "subscription from %s refused: INVALID_ARGUMENT: %s", peer, request)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is {request}")
        principal = srv.principal(context)
        allowed = None
        if principal is not None:  # a request for any camera gets the cameras this token may see
            want = request.camera_id
            if not (principal.may_subscribe(want) if want else principal.role in ("subscribe", "admin")):
                peer = context.peer()
                what = f"camera {want!r}" if want else "any camera"
                srv.rl(logging.INFO, f"subscribe:PERMISSION_DENIED:{_peer_host(peer)}",
                       "subscription from %s refused: %s may not subscribe to %s", peer, principal.name, what)
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"{principal.describe()} may not subscribe to {what}")
            allowed = principal.may_subscribe
        try:
            sub = srv.fanout.subscribe(request, allowed=allowed)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        log.info("subscriber %s: camera %r task %r format %s", context.peer(), request.camera_id or "*",
                 request.task or "*", pb.ImageFormat.Name(request.format))
        try:
            # the subscription is registered: the client may count on it (a refused call has no such key)
            await context.send_initial_metadata(((SUBSCRIBED_METADATA_KEY, "1"),))
            while True:
                msg = await sub.get()
                if msg is None:
                    return
                yield msg
        finally:
            srv.fanout.unsubscribe(sub)
            log.info("subscriber %s left: %d frames sent, %d dropped (slow)", context.peer(), sub.sent, sub.dropped)


# ---------------------------------------------------------------------------------------- server

class CloudServer:
    """The cloud service; ``codec`` and ``detector`` may be injected (tests), else loaded from config."""

    def __init__(self, config: CloudConfig | None = None, *, codec: LatentCodec | None = None,
                 detector: Detector | None = None, metrics: CloudMetrics | None = None) -> None:
        self.config = config or CloudConfig()
        self.codec: LatentCodec | None = codec
        self.detector: Detector | None = detector
        self.composer = None  # built from config.composer when its kind is not "none"
        self.metrics = metrics or CloudMetrics()
        self.rl = RateLimitedLog(log)  # every client error and per-frame failure this server logs
        self.sessions = SessionRegistry(config=self.config.sessions)
        self.pipeline: Pipeline | None = None
        self.stages = None  # pipeline.engine ray: serve_stages.RayStages
        self.fanout: FanOut | None = None
        self.jsonl: JsonlSink | None = None
        self.health = HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._maint: grpc.aio.Server | None = None
        self._http: MetricsHttpServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, _Stream] = {}  # open streams by camera_id
        self._ready = asyncio.Event()
        self._warm_task: asyncio.Task | None = None
        self._warm_error: BaseException | None = None
        self._stopped = False
        self._stop_requested = asyncio.Event()
        self.ports: tuple[int, int, int] = (0, 0, 0)
        self.auth: TokenRegistry | None = None  # the accepted tokens (None: authentication off), set by start()

    def principal(self, context: grpc.aio.ServicerContext) -> Principal | None:
        """The caller's :class:`~latentcast.cloud.auth.Principal` (None when authentication is off). The
        interceptor already refused unknown tokens; should the metadata not resolve here anyway, the caller
        is :data:`~latentcast.cloud.auth.NOBODY`, who may do nothing (fail closed)."""
        if self.auth is None:
            return None
        return self.auth.principal(context.invocation_metadata()) or NOBODY

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    # ---------------------------------------------------------------- start
    async def start(self) -> tuple[int, int, int]:
        """Bind and start the servers; returns (port, maintenance_port, metrics_port), -1 for an
        endpoint that is off. Loading and warm-up continue in the background (see :meth:`wait_ready`)."""
        cfg = self.config
        s = cfg.server
        problem = s.exposure_problem()  # again here: the config may have been changed since it was built
        if problem:
            raise ConfigError(problem)
        try:  # before anything is bound: a bad token file leaves no port open
            self.auth = TokenRegistry.from_config(tokens=s.tokens, tokens_file=s.tokens_file)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._loop = asyncio.get_running_loop()
        self.fanout = FanOut(loop=self._loop, queue_size=cfg.sinks.subscriber_queue,
                             jpeg_quality=cfg.sinks.jpeg_quality, png_compression=cfg.sinks.png_compression,
                             metrics=self.metrics, recompose_queue=cfg.sinks.recompose_queue)
        metrics_port = -1
        if s.metrics_port >= 0:
            self._http = self.metrics.serve(host=s.metrics_host, port=s.metrics_port)
            metrics_port = self._http.port

        maint_port = -1
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if s.maintenance_port >= 0:
            self._maint = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._maint)
            reflection.enable_server_reflection((SERVICE_NAME, _HEALTH_SERVICE_NAME, reflection.SERVICE_NAME),
                                                self._maint)
            maint_port = self._maint.add_insecure_port(f"{s.maintenance_host}:{s.maintenance_port}")
            if maint_port == 0:
                raise OSError(f"cannot bind the maintenance port {s.maintenance_host}:{s.maintenance_port}")
            await self._maint.start()

        interceptors = []
        if self.auth is not None:
            interceptors.append(_PeerLoggingAuth(
                registry=self.auth, rl=self.rl,
                on_reject=lambda reason: self.metrics.auth_rejections.labels(reason=reason).inc()))
        self._server = grpc.aio.server(interceptors=interceptors, options=grpc_server_options(cfg),
                                       maximum_concurrent_rpcs=s.max_concurrent_rpcs)
        _add_servicer(_LatentcastServicer(self), self._server)
        address = f"{s.host}:{s.port}"
        if s.tls_cert_file:
            creds = grpc.ssl_server_credentials(
                [(Path(s.tls_key_file).read_bytes(), Path(s.tls_cert_file).read_bytes())],
                root_certificates=Path(s.tls_client_ca_file).read_bytes() if s.tls_client_ca_file else None,
                require_client_auth=bool(s.tls_client_ca_file))
            port = self._server.add_secure_port(address, creds)
        else:
            port = self._server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot bind the Latentcast port {address}")
        await self._server.start()
        self.ports = (port, maint_port, metrics_port)
        log.info("latentcast cloud on %s:%d (%s, auth %s), health/reflection on %d, metrics on %d", s.host, port,
                 "mTLS" if s.tls_client_ca_file else "TLS" if s.tls_cert_file else "plaintext",
                 f"on: {len(self.auth.entries)} token(s)" if self.auth else "OFF", maint_port, metrics_port)
        if self.auth is None:
            log.warning("authentication is OFF on %s:%d: anyone who reaches this port may publish and subscribe to "
                        "every camera (set server.tokens_file)", s.host, port)
        if not s.tls_cert_file and not is_loopback(s.host):
            log.warning("plaintext on %s:%d (server.insecure): tokens and frames cross the network in clear",
                        s.host, port)
        self._warm_task = asyncio.create_task(self._load_and_warm(), name="latentcast-cloud-warmup")
        return self.ports

    async def _load_and_warm(self) -> None:
        try:
            t0 = time.monotonic()
            remote = None
            if self.config.pipeline.engine == "ray":  # synthesis, compose, analytics as Ray Serve deployments
                from .serve_stages import RayStages

                self.stages = RayStages(self.config, observe=lambda stage, s: self.metrics.remote_seconds.labels(
                    stage=stage).observe(s))
                await asyncio.to_thread(self.stages.connect, threads=self.config.pipeline.torch_threads)
                self.detector, remote = self.stages.detector, self.stages.synthesis
                if self.stages.composer is not None:
                    self.composer = self.stages.composer
            self.codec, self.detector, self.composer = await asyncio.to_thread(
                load_and_warm, self.config, codec=self.codec, detector=self.detector, composer=self.composer)
            if self.stages is not None and self.stages.weights_hash != self.codec.weights_hash:
                raise ValueError(f"the Ray synthesis stage decodes codec weights {self.stages.weights_hash.hex()}, "
                                 f"this front {self.codec.weights_hash.hex()}: deploy the same codec.weights")
            self.pipeline = Pipeline(codec=self.codec, detector=self.detector, config=self.config.pipeline,
                                     metrics=self.metrics, on_result=self._result_sinks(),
                                     max_packet_bytes=self.config.server.max_packet_bytes,
                                     composer=self.composer, compose_steps=self.config.composer.steps,
                                     decoders=DecoderRegistry.from_config(self.config, self.codec, remote=remote))
            self.fanout.composer = self.composer  # subscribers may ask for their own composer steps
            self.pipeline.start()
            self.metrics.engine_info.labels(engine=self.config.pipeline.engine).set(1)
            self._ready.set()
            for name in ("", SERVICE_NAME):
                await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
            log.info("ready in %.1f s: codec %s (id %d, weights %s, synthesis %s), detector %s, accepting %s; "
                     "health SERVING", time.monotonic() - t0, getattr(self.codec, "codec_name", "?"),
                     self.codec.codec_id, self.codec.weights_hash.hex(),
                     getattr(self.codec, "synthesis_name", "") or "own", type(self.detector).__name__,
                     self.pipeline.decoders.describe())
        except Exception as exc:  # noqa: BLE001 - reported by wait_ready / serve_forever
            self._warm_error = exc
            log.error("loading or warming the codec/composer/detector failed: %s", exc)
            self._ready.set()

    def _result_sinks(self) -> list:
        sinks: list = []
        if self.config.sinks.jsonl_path:
            self.jsonl = JsonlSink(path=self.config.sinks.jsonl_path)
            sinks.append(self.jsonl)
        sinks.append(self.fanout.offer)
        return sinks

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the codec and detector are warm; raises the loading error if there was one."""
        await asyncio.wait_for(self._ready.wait(), timeout)
        if self._warm_error is not None:
            raise RuntimeError(f"the cloud could not start: {self._warm_error}") from self._warm_error

    # ---------------------------------------------------------------- stop
    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: health NOT_SERVING, subscribers end, streams finish their in-flight frames
        (up to ``grace`` seconds, default ``server.grace_s``) and end with UNAVAILABLE, then the rest."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.server.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self._warm_task is not None and not self._warm_task.done():
            self._warm_task.cancel()
        if self.fanout is not None:
            self.fanout.close()
        for st in list(self._streams.values()):
            st.shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        if self.pipeline is not None:
            await asyncio.to_thread(self.pipeline.stop, max(1.0, grace))
        if self._maint is not None:
            await self._maint.stop(0)
        if self._http is not None:
            self._http.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.stages is not None:
            await asyncio.to_thread(self.stages.close)
        log.info("latentcast cloud stopped")

    def request_stop(self) -> None:
        """Ask :meth:`serve_forever` to stop gracefully (what SIGTERM/SIGINT do)."""
        self._stop_requested.set()

    async def serve_forever(self) -> None:
        """Start, serve until SIGTERM/SIGINT (or :meth:`request_stop`), then stop gracefully.
        Raises RuntimeError if the codec or the detector cannot be loaded."""
        loop = asyncio.get_running_loop()
        stop = self._stop_requested
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
            except (NotImplementedError, RuntimeError):  # not the main thread / platform without signals
                pass
        try:
            await self.start()
            stopper = asyncio.create_task(stop.wait())
            ready = asyncio.create_task(self._ready.wait())
            try:
                await asyncio.wait({stopper, ready}, return_when=asyncio.FIRST_COMPLETED)
                if ready.done() and self._warm_error is not None:
                    await self.wait_ready()  # raises the loading error
                await stopper
            finally:
                stopper.cancel()
                ready.cancel()
            log.info("stop requested: stopping (grace %.1f s)", self.config.server.grace_s)
        finally:
            await self.stop()
            for sig in installed:
                loop.remove_signal_handler(sig)
