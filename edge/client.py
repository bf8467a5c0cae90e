"""The edge's gRPC client: one ``Stream`` per connection, acks, resume by sequence number.

Per connection (see the session semantics in ``proto/latentcast_v1.proto``)::

    open Stream (metadata ``authorization: Bearer <token>``) ─► SessionHeader
    ◄─ SessionAccepted(next_seq) ─► Backlog.resume(next_seq): resend the unacked frames >= next_seq
    ─► then frames from the SendQueue (each enters the Backlog before it is written)
    ◄─ Ack(acked_seq) releases the Backlog; FrameAnalytics → callback / result queue;
       FrameError → counted, logged (rate-limited)

A lost network or a retryable status (UNAVAILABLE, CANCELLED, DEADLINE_EXCEEDED, INTERNAL,
ABORTED, RESOURCE_EXHAUSTED, ...) closes the channel and reconnects after an
exponential backoff with jitter (``backoff_initial_s`` doubling up to ``backoff_max_s``, times a
random factor in ``1 ± backoff_jitter``; reset after a successful SessionAccepted). Frames keep
flowing into the SendQueue meanwhile (its drop policy applies) and the Backlog keeps the written,
unacknowledged ones within its bounds. Fatal statuses (:data:`FATAL_CODES`: a bad token, a camera
the token may not publish, a session or a frame the cloud refuses) raise :class:`FatalStreamError`
at once instead of retrying forever; ALREADY_EXISTS (another edge publishes this camera_id) is
retried for ``already_exists_retry_s`` after the first refusal (a restarted edge gets in once the cloud
gives up the dead one's stream; only an accepted session restarts that clock) and UNKNOWN (a cloud
bug, not the network) ``max_unknown_retries`` times without a frame acknowledged in between, then
they are fatal too.

The session header carries an instance id (``SessionHeader.instance_id``, made once per client when
the header has none): the cloud resumes the camera's sequence state for the same instance and starts
it afresh for another one (a restarted edge numbers its frames from 0 again).

:meth:`EdgeClient.run` returns when ``stop`` is set, or once the SendQueue is closed and every
frame taken from it was acknowledged (a clean drain).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import grpc
import grpc.aio

from latentcast.channel import TlsConfig, channel_options, front_order, open_channel
from latentcast.edge.sender import Backlog, OutFrame, QueueClosed, SendQueue
from latentcast.proto import latentcast_v1_pb2 as pb
from latentcast.proto import latentcast_v1_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

__all__ = ["EdgeClient", "TlsConfig", "FatalStreamError", "GaveUpError", "FATAL_CODES", "channel_options"]

# statuses that retrying cannot fix: stop with a clear error
FATAL_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                         grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
                         grpc.StatusCode.UNIMPLEMENTED})


class FatalStreamError(RuntimeError):
    """The cloud refused the session (or the protocol was broken); retrying would not help."""

    def __init__(self, code: grpc.StatusCode | None, details: str):
        self.code, self.details = code, details
        name = code.name if code is not None else "PROTOCOL"
        super().__init__(f"stream to the cloud failed with {name}: {details}")


class GaveUpError(RuntimeError):
    """``max_reconnect_attempts`` connection attempts in a row failed."""


class _Retry(Exception):
    """A connection ended in a retryable way (message says why)."""


def _session_header(session: pb.SessionHeader | Mapping[str, Any]) -> pb.SessionHeader:
    if isinstance(session, pb.SessionHeader):
        hdr = pb.SessionHeader()
        hdr.CopyFrom(session)
    elif isinstance(session, Mapping):
        valid = [f.name for f in pb.SessionHeader.DESCRIPTOR.fields]
        unknown = sorted(set(session) - set(valid))
        if unknown:
            raise ValueError(f"unknown SessionHeader field(s) {unknown!r} (valid: {', '.join(valid)})")
        try:
            hdr = pb.SessionHeader(**session)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad SessionHeader fields {dict(session)!r}: {exc}") from None
    else:
        raise ValueError(f"session must be a SessionHeader or a mapping of its fields, got {type(session).__name__}")
    if not hdr.camera_id:
        raise ValueError("session camera_id is empty: the cloud keys resume state by it")
    return hdr


class EdgeClient:
    """Streams a :class:`SendQueue` to the cloud over one gRPC ``Stream`` at a time."""

    def __init__(self, *, target: str, session: pb.SessionHeader | Mapping[str, Any],
                 queue: SendQueue | None = None, backlog: Backlog | None = None, token: str | None = None,
                 tls: TlsConfig | None = None, keepalive_s: float = 30.0, keepalive_timeout_s: float = 10.0,
                 max_message_bytes: int = 16 * 1024 * 1024, backoff_initial_s: float = 0.5,
                 backoff_max_s: float = 30.0, backoff_jitter: float = 0.2,
                 max_reconnect_attempts: int | None = None, accept_timeout_s: float = 10.0,
                 on_result: Callable[[pb.FrameAnalytics], None] | None = None, result_queue_size: int = 0,
                 error_log_interval_s: float = 5.0, rng: random.Random | None = None, max_in_flight: int = 0,
                 on_refresh: Callable[[pb.RefreshRequest], None] | None = None,
                 already_exists_retry_s: float = 60.0, max_unknown_retries: int = 5,
                 fronts: list[str] | None = None):
        """``max_in_flight``: at most this many frames sent and not yet acknowledged (0 = no limit);
        beyond it the frames wait in the send queue, which drops by its policy, so a slow cloud
        cannot build a long queue in the transport (live first). ``on_refresh``: the cloud asks for a
        keyframe (temporal streams; called on the event loop). ``fronts``: several cloud fronts; the camera
        uses the first of :func:`~latentcast.channel.front_order` and, when an attempt is not accepted, the
        next (a front that took over asks for a keyframe: it holds no state of this camera); None = ``target``."""
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 0:
            raise ValueError(f"max_in_flight {max_in_flight!r} must be an integer >= 0 (0 = no limit)")
        self.max_in_flight = max_in_flight
        if not isinstance(target, str) or not target.strip():
            raise ValueError(f"target {target!r} must be host:port (e.g. '127.0.0.1:50051')")
        for name, v in (("keepalive_s", keepalive_s), ("keepalive_timeout_s", keepalive_timeout_s),
                        ("backoff_initial_s", backoff_initial_s), ("accept_timeout_s", accept_timeout_s)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} {v!r} must be a number > 0")
        if not backoff_max_s >= backoff_initial_s:
            raise ValueError(f"backoff_max_s {backoff_max_s!r} must be >= backoff_initial_s {backoff_initial_s!r}")
        if not 0.0 <= backoff_jitter < 1.0:
            raise ValueError(f"backoff_jitter {backoff_jitter!r} out of range 0 <= value < 1")
        if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int) or max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes {max_message_bytes!r} must be an integer >= 1024")
        if max_reconnect_attempts is not None and (not isinstance(max_reconnect_attempts, int)
                                                   or max_reconnect_attempts < 0):
            raise ValueError(f"max_reconnect_attempts {max_reconnect_attempts!r} must be an integer >= 0 or None")
        if isinstance(already_exists_retry_s, bool) or not isinstance(already_exists_retry_s, (int, float)) \
                or not already_exists_retry_s >= 0:
            raise ValueError(f"already_exists_retry_s {already_exists_retry_s!r} must be a number >= 0")
        if isinstance(max_unknown_retries, bool) or not isinstance(max_unknown_retries, int) or max_unknown_retries < 0:
            raise ValueError(f"max_unknown_retries {max_unknown_retries!r} must be an integer >= 0")
        self.already_exists_retry_s = float(already_exists_retry_s)
        self.max_unknown_retries = max_unknown_retries
        self._already_exists_since: float | None = None  # first ALREADY_EXISTS since a session was last accepted
        self._unknown_in_row = 0  # streams ended with UNKNOWN since a frame was last acknowledged
        if token is not None and (not isinstance(token, str) or not token or any(c.isspace() for c in token)):
            raise ValueError("token must be a non-empty string without whitespace (or None)")
        self.target = target.strip()
        self.session = _session_header(session)
        # the fronts in this camera's order (rendezvous hash of its id); the first is where it streams to
        self.fronts = front_order(self.session.camera_id, fronts) if fronts else [self.target]
        self.target = self.fronts[0]
        if not self.session.instance_id:
            self.session.instance_id = uuid.uuid4().hex
        self.session.max_in_flight = self.max_in_flight  # the cloud acks at least this often
        self.queue = queue if queue is not None else SendQueue(maxsize=8)
        self.backlog = backlog if backlog is not None else Backlog(max_frames=300, max_bytes=64 * 1024 * 1024)
        self.tls = tls
        # read once: a missing or half-set certificate fails here, not at the first connection
        self._creds = tls.credentials() if tls is not None else None
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if token and tls is None and not self.target.startswith(("127.", "localhost", "[::1]", "unix:")):
            log.warning("sending a bearer token to %s without TLS", self.target)
        self.keepalive_s, self.keepalive_timeout_s = float(keepalive_s), float(keepalive_timeout_s)
        self.max_message_bytes = max_message_bytes
        self.backoff_initial_s, self.backoff_max_s = float(backoff_initial_s), float(backoff_max_s)
        self.backoff_jitter, self.max_reconnect_attempts = float(backoff_jitter), max_reconnect_attempts
        self.accept_timeout_s = float(accept_timeout_s)
        self.on_result = on_result
        self.on_refresh = on_refresh
        self.refresh_requests = 0
        self.results: asyncio.Queue[pb.FrameAnalytics] | None = (
            asyncio.Queue(maxsize=result_queue_size) if result_queue_size > 0 else None)
        self.error_log_interval_s = float(error_log_interval_s)
        self._rng = rng or random.Random()
        self._acked: asyncio.Event | None = None
        # counters
        self.connect_attempts = 0
        self.connects = 0  # sessions accepted
        self.reconnects = 0  # sessions accepted after the first
        self.connect_failures = 0
        self.frames_written = 0  # first transmissions
        self.frames_resent = 0
        self.bytes_written = 0  # codec packet bytes of first transmissions
        self.dropped_too_large = 0
        self.acks = 0
        self.results_received = 0
        self.results_dropped = 0  # result queue full
        self.frame_errors: collections.Counter[str] = collections.Counter()
        self.last_result: pb.FrameAnalytics | None = None
        self.last_error: str | None = None
        self.session_id: str | None = None
        self.next_seq_from_cloud: int | None = None
        self._err_log_t = 0.0
        self._err_suppressed = 0

    # ------------------------------------------------------------------ public

    def stats(self) -> dict[str, Any]:
        return {"connect_attempts": self.connect_attempts, "connects": self.connects, "reconnects": self.reconnects,
                "connect_failures": self.connect_failures, "frames_written": self.frames_written,
                "bytes_written": self.bytes_written,
                "frames_resent": self.frames_resent, "dropped_too_large": self.dropped_too_large, "acks": self.acks,
                "results": self.results_received, "results_dropped": self.results_dropped,
                "frame_errors": dict(self.frame_errors), "last_error": self.last_error,
                "session_id": self.session_id, "instance_id": self.session.instance_id,
                "queue": self.queue.stats(), "backlog": self.backlog.stats()}

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Stream until ``stop`` is set or the queue is closed and drained (every frame acknowledged).
        Raises :class:`FatalStreamError` on a fatal status, :class:`GaveUpError` after
        ``max_reconnect_attempts`` failed attempts in a row."""
        self._acked = asyncio.Event()
        failures = 0
        while True:
            if stop is not None and stop.is_set():
                return
            accepted_before = self.connects
            try:
                if await self._connection(stop):
                    return
                reason = "the cloud ended the stream"
            except FatalStreamError as exc:
                self.last_error = str(exc)
                log.error("%s; not retrying", exc)
                raise
            except grpc.aio.AioRpcError as exc:
                reason = self._classify(exc.code(), exc.details() or "")
            except _Retry as exc:
                reason = str(exc)
            except (OSError, asyncio.TimeoutError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            self.last_error = reason
            if self.connects > accepted_before:
                failures = 0  # this connection worked: start the backoff over
            else:
                self.connect_failures += 1
                if len(self.fronts) > 1:  # not accepted here: the camera's next front (it will ask for a keyframe)
                    self.target = self.fronts[(self.fronts.index(self.target) + 1) % len(self.fronts)]
                    reason += f"; next front {self.target}"
            failures += 1
            if self.max_reconnect_attempts is not None and failures > self.max_reconnect_attempts:
                raise GaveUpError(f"giving up on {self.target} after {failures} failed attempt(s) in a row "
                                  f"(max_reconnect_attempts={self.max_reconnect_attempts}); last error: {reason}")
            delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (failures - 1))
            delay *= 1.0 + self.backoff_jitter * self._rng.uniform(-1.0, 1.0)
            log.warning("stream to %s lost (%s); reconnecting in %.2f s", self.target, reason, delay)
            if stop is None:
                await asyncio.sleep(delay)
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)

    # ------------------------------------------------------------------ one connection

    def _classify(self, code: grpc.StatusCode, details: str) -> str:
        """The reason to retry after a stream ended with ``code``, or :class:`FatalStreamError`."""
        if code in FATAL_CODES:
            raise FatalStreamError(code, details)
        if code == grpc.StatusCode.ALREADY_EXISTS:
            now = time.monotonic()
            if self._already_exists_since is None:
                self._already_exists_since = now
            waited = now - self._already_exists_since
            if waited >= self.already_exists_retry_s:
                raise FatalStreamError(code, f"{details} (another edge publishes camera_id "
                                             f"{self.session.camera_id!r}: still refused after {waited:.0f} s, "
                                             f"server.already_exists_retry_s {self.already_exists_retry_s:g}; give "
                                             f"each edge its own camera_id)")
            return (f"{code.name}: {details} (retrying for up to {self.already_exists_retry_s - waited:.0f} s more: "
                    f"the cloud takes the camera over from a stream that has gone silent)")
        if code == grpc.StatusCode.UNKNOWN:  # reset only by an acknowledged frame (_read_loop), not by other codes
            self._unknown_in_row += 1
            if self._unknown_in_row > self.max_unknown_retries:
                raise FatalStreamError(code, f"{details} ({self._unknown_in_row} streams ended with UNKNOWN without "
                                             f"a frame acknowledged in between, max_unknown_retries "
                                             f"{self.max_unknown_retries}: a cloud fault retrying does not fix)")
        return f"{code.name}: {details}"

    def _channel(self) -> grpc.aio.Channel:
        return open_channel(self.target, tls=self.tls, keepalive_s=self.keepalive_s,
                            keepalive_timeout_s=self.keepalive_timeout_s, max_message_bytes=self.max_message_bytes,
                            credentials=self._creds)

    async def _connection(self, stop: asyncio.Event | None) -> bool:
        """One Stream; True when done (stop set, or drained), False/raise when it must reconnect."""
        self.connect_attempts += 1
        channel = self._channel()
        call = None
        tasks: list[asyncio.Task] = []
        try:
            stub = pb_grpc.LatentcastStub(channel)
            call = stub.Stream(metadata=self._metadata)
            await call.write(pb.EdgeMessage(header=self.session))
            first = await asyncio.wait_for(call.read(), self.accept_timeout_s)
            if first is grpc.aio.EOF:
                code, details = await call.code(), await call.details()
                if code == grpc.StatusCode.OK:
                    raise _Retry("the cloud closed the stream before accepting the session")
                raise _Retry(self._classify(code, details or ""))
            if first.WhichOneof("msg") != "accepted":
                raise FatalStreamError(None, f"expected SessionAccepted first, got {first.WhichOneof('msg')!r}")
            acc = first.accepted
            self.connects += 1
            if self.connects > 1:
                self.reconnects += 1
            self.session_id, self.next_seq_from_cloud = acc.session_id, acc.next_seq
            self._already_exists_since = None  # in: the camera is ours (UNKNOWN counts until a frame is acked)
            resend = self.backlog.resume(acc.next_seq)
            log.info("session %s accepted by %s (instance %s, %s): next_seq %d, resending %d frame(s)",
                     acc.session_id or "?", self.target, self.session.instance_id,
                     "resumed" if acc.resumed else "fresh state", acc.next_seq, len(resend))
            reader = asyncio.create_task(self._read_loop(call), name="edge-client-read")
            writer = asyncio.create_task(self._write_loop(call, resend), name="edge-client-write")
            tasks = [reader, writer]
            if stop is not None:
                tasks.append(asyncio.create_task(stop.wait(), name="edge-client-stop"))
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if stop is not None and stop.is_set():
                return True
            if writer in done and writer.exception() is None:  # drained: every frame acknowledged
                await call.done_writing()
                with contextlib.suppress(asyncio.TimeoutError, grpc.aio.AioRpcError):
                    await asyncio.wait_for(asyncio.shield(reader), self.accept_timeout_s)
                return True
            for t in (reader, writer):  # the reader carries the real status; prefer it
                if t in done and t.exception() is not None:
                    exc = t.exception()
                    if isinstance(exc, asyncio.InvalidStateError) and call.done():
                        code, details = await call.code(), await call.details()
                        if code == grpc.StatusCode.OK:
                            raise _Retry("the cloud ended the stream")
                        raise _Retry(self._classify(code, details or ""))
                    raise exc
            return False  # reader hit EOF with status OK while frames were still due
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            if call is not None and not call.done():
                call.cancel()
            await channel.close(grace=None)

    def _frame_message(self, f: OutFrame) -> pb.EdgeMessage:
        return pb.EdgeMessage(frame=pb.FramePacket(seq=f.seq, capture_ts_us=f.capture_ts_us, packet=f.packet,
                                                   edge_boxes=list(f.boxes)))

    async def _write_loop(self, call: Any, resend: list[OutFrame]) -> None:
        for f in resend:
            await call.write(self._frame_message(f))
            self.frames_resent += 1
        while True:
            while self.max_in_flight and len(self.backlog) >= self.max_in_flight:
                self._acked.clear()
                if len(self.backlog) < self.max_in_flight:
                    break
                await self._acked.wait()
            try:
                f = await self.queue.get()
            except QueueClosed:
                break
            msg = self._frame_message(f)
            size = msg.ByteSize()
            if size > self.max_message_bytes:
                self.dropped_too_large += 1
                log.error("frame seq %d is %d bytes, over max_message_bytes %d: dropped", f.seq, size,
                          self.max_message_bytes)
                continue
            self.backlog.add(f)  # before writing: a failed write leaves it for the resend
            await call.write(msg)
            self.frames_written += 1
            self.bytes_written += f.nbytes
        while len(self.backlog):  # drained queue: wait for the last acks
            self._acked.clear()
            if not len(self.backlog):
                break
            await self._acked.wait()

    async def _read_loop(self, call: Any) -> None:
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:  # status OK (a non-OK status raises from read())
                return
            kind = msg.WhichOneof("msg")
            if kind == "ack":
                self.backlog.ack(msg.ack.acked_seq)
                self.acks += 1
                self._unknown_in_row = 0  # the cloud took a frame: earlier UNKNOWN endings were not a loop
                self._acked.set()
            elif kind == "result":
                self._deliver(msg.result)
            elif kind == "error":
                self._frame_error(msg.error)
            elif kind == "refresh":
                self.refresh_requests += 1
                if self.on_refresh is not None:
                    try:
                        self.on_refresh(msg.refresh)
                    except Exception:
                        log.exception("on_refresh callback failed for seq %d", msg.refresh.seq)
            else:
                log.warning("unexpected %r message from the cloud mid-stream; ignored", kind)

    def _deliver(self, result: pb.FrameAnalytics) -> None:
        self.results_received += 1
        self.last_result = result
        if self.results is not None:
            if self.results.full():
                self.results.get_nowait()
                self.results_dropped += 1
            self.results.put_nowait(result)
        if self.on_result is not None:
            try:
                self.on_result(result)
            except Exception:
                log.exception("on_result callback failed for seq %d", result.seq)

    def _frame_error(self, err: pb.FrameError) -> None:
        self.frame_errors[err.code or "unknown"] += 1
        now = time.monotonic()
        if now - self._err_log_t >= self.error_log_interval_s:
            more = f" ({self._err_suppressed} more since the last report)" if self._err_suppressed else ""
            log.warning("cloud rejected frame seq %d: %s: %s%s", err.seq, err.code, err.message, more)
            self._err_log_t, self._err_suppressed = now, 0
        else:
            self._err_suppressed += 1
