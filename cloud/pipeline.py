"""Decoding and analytics in a worker pool, off the event loop.

::

    streams ─► submit(FrameJob) ─► a queue per stream (per-stream and global limits, drop policy)
        ─► worker threads take frames across the streams by deficit round robin on pixels (with a
           composer, batches of up to max_batch, or what came within batch_wait_ms); a frame
           queued longer than max_frame_age_s is dropped
        ─► per frame: checks against the session ─► LatentCodec.decompress
        ─► composer (none: the latent decoder; controlnet: diffusion over the whole batch, across streams)
        ─► per frame: detector
        ─► AnalysedFrame | FrameFailure ─► job.deliver (the stream) and on_result (sinks, fan-out)

Per-frame problems never stop a worker; they become a :class:`FrameFailure` with a code:

====================  ======================================================================
malformed_packet      the bytes are not a valid LCF packet (BitstreamError); the server
                      parses packets before submitting and ends such a stream with
                      INVALID_ARGUMENT, so this code only appears for raw-bytes jobs
checksum_mismatch     the packet's CRC32 does not match its bytes (corrupt in transit), or the
                      decoded symbols do not match the header's symbol CRC (decoder divergence):
                      the frame is not rendered
wrong_codec           the packet names another codec id or weights hash than the loaded codec
frame_size_mismatch   the packet's frame size is not the session's
label_set_mismatch    the packet's label-set hash is not the session's label list's (an all-zero
                      hash is accepted only on a packet without ROIs), or an ROI label id is
                      outside the session's label list
invalid_edge_boxes    the frame's edge boxes are not finite, outside the frame, too many, or name a
                      label outside the session's list (checked by the server; never decoded)
decode_failed         any other decoder refusal (CodecError: rate point, missing section, ...)
missing_reference     temporal streams: the frame is predicted from a frame or keyframe the cloud
                      does not hold (lost or dropped on the way); it is not rendered and the
                      server asks the edge for a keyframe (RefreshRequest)
compose_failed        the composer (e.g. ControlNet diffusion) raised on the frame's batch
analytics_failed      the detector raised
cloud_overloaded      dropped by the queue's drop policy, never decoded
frame_expired         waited in the queue longer than ``pipeline.max_frame_age_s``, never decoded
stream_ended          still queued when its stream ended (client gone, refused or superseded),
                      never decoded (:meth:`Pipeline.cancel`)
server_shutdown       still queued when the pipeline stopped
internal_error        anything else (logged with its traceback, rate-limited)
====================  ======================================================================

Fairness and cost. Each stream has its own queue and the workers serve the streams in turn by
deficit round robin on pixels (:meth:`Pipeline._next_job`): every stream gets the same decode work,
so a 1920x1088 stream gets about one frame for every five of a 768x576 one, and a stream that sends
expensive or hostile frames delays another stream's frame by at most one of its own frames per
worker, however many it queues; the global limit drops from the longest queue. What one frame can cost is bounded before it gets here: the session's frame size
(``sessions.max_frame_pixels``) and the entropy decoder's budget checks (``proto/entropy.py``:
a forged section is refused at its first inconsistent symbol group).

``submit`` is called from the event loop and never blocks; ``deliver`` and ``on_result``
callbacks run in worker threads (or, for drops, in the caller of ``submit``) and must be
thread-safe and quick (the server hands results to the loop with ``call_soon_threadsafe``).
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from latentcast.models.codec import CodecError, LatentCodec
from latentcast.proto.bitstream import (
    CRC_BYTES,
    MAGIC,
    MAX_PACKET_BYTES,
    MIN_PACKET_BYTES,
    VERSIONS,
    BitstreamError,
    Packet,
)

from .analytics import Detection, Detector
from .config import PipelineConfig
from .metrics import CloudMetrics, RateLimitedLog
from .sessions import SessionSpec

log = logging.getLogger(__name__)
_rl = RateLimitedLog(log)

__all__ = ["FrameJob", "AnalysedFrame", "FrameFailure", "FrameOutcome", "Pipeline", "classify_parse_error",
           "ERROR_CODES", "DROP_CODES", "CLIENT_FAULT_CODES", "codec_error_code"]

_QUANTUM_PIXELS = 640 * 480  # deficit round robin: decode credit a stream gains per turn (a VGA frame)
ERROR_CODES = ("malformed_packet", "checksum_mismatch", "wrong_codec", "frame_size_mismatch", "label_set_mismatch",
               "invalid_edge_boxes", "decode_failed", "missing_reference", "compose_failed", "analytics_failed",
               "cloud_overloaded", "frame_expired", "stream_ended", "server_shutdown", "internal_error")
DROP_CODES = ("cloud_overloaded", "frame_expired", "stream_ended", "server_shutdown")  # never decoded: counted as drops
# the sender's fault: frames a correct edge never sends (a stream that keeps sending them is read more slowly)
CLIENT_FAULT_CODES = ("malformed_packet", "checksum_mismatch", "wrong_codec", "frame_size_mismatch",
                      "label_set_mismatch", "invalid_edge_boxes", "decode_failed")
_ZERO_HASH = b"\0\0\0\0"


@dataclass
class FrameJob:
    """One received frame on its way through the pipeline."""

    stream_id: str  # the stream (session id) the frame came on
    spec: SessionSpec  # that stream's validated SessionHeader
    seq: int
    capture_ts_us: int  # edge clock, microseconds since the epoch (0 = unknown)
    packet: Packet | bytes  # parsed packet (the server parses first) or raw bytes
    packet_bytes: int  # size of the packet on the wire
    edge_boxes: tuple[Detection, ...] = ()  # the edge's grounding boxes (class_id = label id)
    deliver: Callable[[FrameOutcome], None] | None = None  # thread-safe hand-back to the stream
    enqueued: float = field(default_factory=time.monotonic)
    # temporal streams: the stream's reader decoded the packet in order into its state; this renders
    # the frame from a copy of that state (``prepared(decode_frame) -> Reconstruction``)
    prepared: Callable[[bool], object] | None = None
    prepare_ms: float = 0.0  # time the reader spent decoding it into the state (part of decode_ms)


@dataclass
class AnalysedFrame:
    """A decoded and analysed frame."""

    job: FrameJob
    frame: np.ndarray  # (H, W, 3) uint8 RGB reconstruction
    detections: list[Detection]
    queue_ms: float
    decode_ms: float
    analytics_ms: float
    capture_to_result_ms: float | None  # None when the capture time is unknown (0)
    bpp: float  # packet bits per frame pixel
    compose_request: object = None  # with a composer: the ComposeRequest that made ``frame`` (recomposable)

    @property
    def seq(self) -> int:
        return self.job.seq


@dataclass
class _Decoded:
    """A frame between decoding and analytics (its ``frame`` is None until composed)."""

    job: FrameJob
    rec: object  # models.codec.Reconstruction
    frame: np.ndarray | None
    width: int
    height: int
    labels: list[str]  # the task labels of the packet's ROIs (the composer's caption)
    queue_ms: float
    decode_ms: float
    request: object = None  # the ComposeRequest, once composed


@dataclass
class FrameFailure:
    """A frame that produced no result, and why."""

    job: FrameJob
    code: str  # one of ERROR_CODES
    message: str

    @property
    def seq(self) -> int:
        return self.job.seq


FrameOutcome = AnalysedFrame | FrameFailure


def codec_error_code(exc: CodecError) -> str:
    """``checksum_mismatch`` for a decoder divergence (symbol CRC), else ``decode_failed``."""
    return "checksum_mismatch" if "checksum" in str(exc) else "decode_failed"


def classify_parse_error(exc: BitstreamError, data: bytes | memoryview) -> str:
    """``checksum_mismatch`` when the packet is whole enough to carry a CRC32 that does not match
    its bytes, else ``malformed_packet``."""
    mv = memoryview(data)
    n = mv.nbytes
    if n >= MIN_PACKET_BYTES and bytes(mv[:4]) == MAGIC and mv[4] in VERSIONS:
        stored = int.from_bytes(mv[n - CRC_BYTES:], "little")
        if stored != zlib.crc32(mv[: n - CRC_BYTES]):
            return "checksum_mismatch"
    return "malformed_packet"


class Pipeline:
    """Bounded frame queue + worker threads running decode then analytics."""

    def __init__(self, *, codec: LatentCodec, detector: Detector, config: PipelineConfig | None = None,
                 metrics: CloudMetrics | None = None, on_result: Sequence[Callable[[AnalysedFrame], None]] = (),
                 max_packet_bytes: int = MAX_PACKET_BYTES, composer=None, compose_steps: int = 8) -> None:
        """``composer``: None decodes ẑ_c with the codec's latent decoder (the embedded default); a
        ``latentcast.models.composer`` composer (e.g. ControlNet diffusion) composes each batch's frames
        together, with ``compose_steps`` sampling steps (the frames' consumers are machines)."""
        self.codec = codec
        self.detector = detector
        self.composer = composer
        self.compose_steps = compose_steps
        self.config = config or PipelineConfig()
        self.metrics = metrics
        self.on_result = list(on_result)
        self.max_packet_bytes = max_packet_bytes
        self._queues: OrderedDict[str, deque[FrameJob]] = OrderedDict()  # queued frames by stream, in serving order
        self._queued = 0  # frames in all queues
        self._credit: dict[str, int] = {}  # deficit round robin: pixels each queued stream may still decode
        self._per_stream: dict[str, int] = {}  # frames queued or being processed, by stream
        self._cond = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._threads:
            return
        if self.config.torch_threads > 0:
            import torch

            torch.set_num_threads(self.config.torch_threads)
        for i in range(self.config.workers):
            t = threading.Thread(target=self._worker, name=f"latentcast-cloud-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("pipeline: %d worker(s), batch <= %d within %.1f ms, queue <= %d (<= %d per stream), %s",
                 self.config.workers, self.config.max_batch, self.config.batch_wait_ms, self.config.max_queued_total,
                 self.config.max_queued_per_session, self.config.drop_policy)

    def stop(self, timeout: float = 10.0) -> None:
        """Fail the frames still queued (``server_shutdown``), let workers finish their batch, join them."""
        with self._cond:
            self._stopping = True
            pending = [j for q in self._queues.values() for j in q]
            self._queues.clear()
            self._queued = 0
            self._cond.notify_all()
        for job in pending:
            self._fail(job, "server_shutdown", "the server is shutting down; the frame was not decoded")
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            log.warning("pipeline: worker(s) %s still busy after %.1f s", ", ".join(alive), timeout)
        self._threads.clear()

    @property
    def queue_depth(self) -> int:
        """Frames waiting in the queues (all streams)."""
        return self._queued

    def in_flight(self, stream_id: str) -> int:
        """Frames of ``stream_id`` queued or being processed."""
        return self._per_stream.get(stream_id, 0)

    # ------------------------------------------------------------------ submission
    def submit(self, job: FrameJob) -> bool:
        """Queue ``job``; never blocks. False when the job itself was dropped. Frames dropped by the
        policy (this one or older ones) get a ``cloud_overloaded`` FrameFailure through ``deliver``."""
        cfg = self.config
        dropped: list[FrameJob] = []
        accepted = True
        with self._cond:
            if self._stopping:
                accepted = False
                dropped_reason = "server_shutdown"
            else:
                dropped_reason = "cloud_overloaded"
                if self._per_stream.get(job.stream_id, 0) >= cfg.max_queued_per_session:
                    victim = self._victim(job.stream_id) if cfg.drop_policy == "drop_oldest" else None
                    if victim is None:
                        accepted = False
                    else:
                        dropped.append(victim)
                if accepted and self._queued >= cfg.max_queued_total:
                    victim = self._victim(None) if cfg.drop_policy == "drop_oldest" else None
                    if victim is None:
                        accepted = False
                    else:
                        dropped.append(victim)
                if accepted:
                    job.enqueued = time.monotonic()
                    q = self._queues.get(job.stream_id)
                    if q is None:  # a stream with nothing queued joins the end of the rotation
                        q = self._queues[job.stream_id] = deque()
                    q.append(job)
                    self._queued += 1
                    self._per_stream[job.stream_id] = self._per_stream.get(job.stream_id, 0) + 1
                    self._cond.notify()
            if self.metrics is not None:
                self.metrics.queue_depth.set(self._queued)
        if not accepted:
            dropped.append(job)
            if dropped_reason == "server_shutdown":
                self._fail(job, "server_shutdown", "the server is shutting down; the frame was not decoded")
                return False
        for d in dropped:
            self._fail(d, "cloud_overloaded",
                       f"the cloud's decode queue is full ({self._per_stream.get(d.stream_id, 0)} frames of this "
                       f"stream, {self._queued} in all; policy {cfg.drop_policy}); the frame was dropped")
        return accepted

    def cancel(self, stream_id: str) -> int:
        """Drop the frames of ``stream_id`` still queued (its stream ended): each gets a ``stream_ended``
        FrameFailure and is counted; frames already being decoded finish. Returns how many were dropped."""
        with self._cond:
            q = self._queues.pop(stream_id, None)
            self._credit.pop(stream_id, None)
            jobs = list(q) if q else []
            self._queued -= len(jobs)
            for j in jobs:
                self._release(j)
            if self.metrics is not None:
                self.metrics.queue_depth.set(self._queued)
        for j in jobs:
            self._fail(j, "stream_ended", "the frame's stream ended before it was decoded; the frame was dropped")
        return len(jobs)

    def _victim(self, stream_id: str | None) -> FrameJob | None:
        """Remove and return the oldest queued job of ``stream_id``, or (None) of the stream with the
        most frames queued (the heaviest stream pays for a full queue); lock held."""
        if stream_id is None:
            if not self._queues:
                return None
            stream_id = max(self._queues, key=lambda s: len(self._queues[s]))
        q = self._queues.get(stream_id)
        if not q:
            return None
        j = q.popleft()
        self._dequeued(stream_id, q)
        self._release(j)
        return j

    def _dequeued(self, stream_id: str, q: deque[FrameJob]) -> None:
        """Bookkeeping after a job left ``q`` (the queue of ``stream_id``); lock held."""
        self._queued -= 1
        if not q:
            del self._queues[stream_id]
            self._credit.pop(stream_id, None)

    def _next_job(self) -> FrameJob | None:
        """The next frame by deficit round robin over the streams, a frame's cost being its pixels: each
        turn a stream gains ``_QUANTUM_PIXELS`` of credit and is served while its credit covers its next
        frame, so every stream gets the same decode work whatever its frame size (a 1080p stream does not
        get four times a 768x576 one's share); lock held."""
        while self._queues:
            stream_id, q = next(iter(self._queues.items()))
            credit = self._credit.get(stream_id, 0) + _QUANTUM_PIXELS
            cost = q[0].spec.width * q[0].spec.height
            if credit < cost:  # not yet: its credit carries over to its next turn
                self._credit[stream_id] = credit
                self._queues.move_to_end(stream_id)
                continue
            j = q.popleft()
            self._dequeued(stream_id, q)
            if q:
                self._credit[stream_id] = credit - cost
                self._queues.move_to_end(stream_id)
            else:
                self._credit.pop(stream_id, None)  # an idle stream saves no credit
            return j
        return None

    def _release(self, job: FrameJob) -> None:
        n = self._per_stream.get(job.stream_id, 0) - 1
        if n > 0:
            self._per_stream[job.stream_id] = n
        else:
            self._per_stream.pop(job.stream_id, None)

    # ------------------------------------------------------------------ workers
    def _worker(self) -> None:
        cfg = self.config
        wait_s = cfg.batch_wait_ms / 1000.0
        while True:
            expired: list[FrameJob] = []
            with self._cond:
                while not self._queues and not self._stopping:
                    self._cond.wait()
                if not self._queues:
                    return
                batch: list[FrameJob] = []
                deadline = time.monotonic() + wait_s
                # only a composer gains from a batch (it composes the frames together); without one a frame
                # is taken when a worker is free, so a stream's frame waits for at most one frame of another
                limit = cfg.max_batch if self.composer is not None else 1
                while len(batch) < limit:
                    job = self._next_job()
                    if job is not None:
                        if cfg.max_frame_age_s > 0 and time.monotonic() - job.enqueued > cfg.max_frame_age_s:
                            self._release(job)
                            expired.append(job)
                        else:
                            batch.append(job)
                        continue
                    left = deadline - time.monotonic()
                    if left <= 0 or self._stopping or not batch:
                        break
                    self._cond.wait(left)
                if self.metrics is not None:
                    self.metrics.queue_depth.set(self._queued)
            for job in expired:
                self._fail(job, "frame_expired", f"the frame waited {time.monotonic() - job.enqueued:.1f} s in the "
                           f"decode queue (pipeline.max_frame_age_s {cfg.max_frame_age_s:g}); dropped undecoded")
            if batch:
                self._run_batch(batch)

    def _run_batch(self, batch: list[FrameJob]) -> None:
        outcomes = self._safe(batch, lambda: self.process_batch(batch))
        for job, outcome in zip(batch, outcomes):
            with self._cond:
                self._release(job)
            self._emit(outcome)

    def _safe(self, jobs: list[FrameJob], fn: Callable[[], list[FrameOutcome]]) -> list[FrameOutcome]:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a worker must survive anything a frame does
            if len(jobs) > 1:  # find the frame that fails: the others still get their results
                return [self._safe([j], lambda j=j: self.process_batch([j]))[0] for j in jobs]
            job = jobs[0]
            _rl(logging.ERROR, "internal", "frame %s/%d: unexpected error", job.spec.camera_id, job.seq, exc_info=exc)
            return [FrameFailure(job=job, code="internal_error", message=f"{type(exc).__name__}: {exc}")]

    def _emit(self, outcome: FrameOutcome) -> None:
        job = outcome.job
        m = self.metrics
        if isinstance(outcome, FrameFailure):
            if m is not None:
                m.frame_errors.labels(code=outcome.code).inc()
            level = logging.WARNING if outcome.code not in DROP_CODES else logging.INFO
            _rl(level, f"fail:{outcome.code}", "frame %s/%d: %s: %s", job.spec.camera_id, job.seq, outcome.code,
                outcome.message)
        else:
            if m is not None:
                m.frames_decoded.inc()
                m.observe_stage("decode", outcome.decode_ms / 1000)
                m.observe_stage("analytics", outcome.analytics_ms / 1000)
                m.observe_stage("queue_wait", outcome.queue_ms / 1000)
                if outcome.capture_to_result_ms is not None:
                    m.observe_stage("capture_to_result", outcome.capture_to_result_ms / 1000)
            for cb in self.on_result:
                try:
                    cb(outcome)
                except Exception as exc:  # noqa: BLE001 - a broken sink must not stop the worker
                    _rl(logging.ERROR, f"sink:{getattr(cb, '__qualname__', cb)}", "result sink %r failed", cb,
                        exc_info=exc)
        if job.deliver is not None:
            try:
                job.deliver(outcome)
            except Exception as exc:  # noqa: BLE001
                _rl(logging.ERROR, "deliver", "delivering frame %s/%d failed", job.spec.camera_id, job.seq,
                    exc_info=exc)

    def _fail(self, job: FrameJob, code: str, message: str) -> None:
        if self.metrics is not None and code in DROP_CODES:
            self.metrics.frames_dropped.labels(reason=code).inc()
        self._emit(FrameFailure(job=job, code=code, message=message))

    # ------------------------------------------------------------------ one frame
    def process(self, job: FrameJob) -> FrameOutcome:
        """Check, decode and analyse one frame (synchronously, in the calling thread)."""
        return self.process_batch([job])[0]

    def process_batch(self, jobs: list[FrameJob]) -> list[FrameOutcome]:
        """Check and decode each frame, compose the decoded ones together (one batched composer call
        across streams), then analyse each; one outcome per job, in order."""
        decoded = [self._decode(job) for job in jobs]
        ok = [d for d in decoded if not isinstance(d, FrameFailure) and d.frame is None]  # to compose
        if ok and self.composer is not None:
            from latentcast.models.composer import ComposeRequest

            t0 = time.monotonic()
            requests = [ComposeRequest.from_reconstruction(d.rec, labels=d.labels, stream_id=d.job.spec.camera_id,
                                                           steps=self.compose_steps) for d in ok]
            try:
                frames = self.composer.compose(requests)
            except Exception as exc:  # noqa: BLE001 - the batch's frames fail, the worker goes on
                msg = f"{type(exc).__name__}: {exc}"
                decoded = [d if isinstance(d, FrameFailure) else FrameFailure(job=d.job, code="compose_failed",
                                                                              message=msg) for d in decoded]
                return decoded
            per_frame_ms = (time.monotonic() - t0) * 1000.0 / len(ok)
            for d, f, r in zip(ok, frames, requests):
                d.frame, d.decode_ms, d.request = f, d.decode_ms + per_frame_ms, r
        return [d if isinstance(d, FrameFailure) else self._analyse(d) for d in decoded]

    def _analyse(self, d: "_Decoded") -> FrameOutcome:
        t1 = time.monotonic()
        try:
            detections = list(self.detector.detect(d.frame))
        except Exception as exc:  # noqa: BLE001 - any detector failure is this frame's
            return FrameFailure(job=d.job, code="analytics_failed", message=f"{type(exc).__name__}: {exc}")
        t2 = time.monotonic()
        c2r = None
        if d.job.capture_ts_us > 0:
            c2r = time.time() * 1000.0 - d.job.capture_ts_us / 1000.0
        return AnalysedFrame(job=d.job, frame=d.frame, detections=detections, queue_ms=d.queue_ms,
                             decode_ms=d.decode_ms, analytics_ms=(t2 - t1) * 1000.0,
                             capture_to_result_ms=c2r, bpp=d.job.packet_bytes * 8.0 / (d.width * d.height),
                             compose_request=d.request)

    def check(self, job: FrameJob, packet: Packet) -> "FrameFailure | None":
        """The packet against the session and the loaded codec (codec, size, label set); None if it fits."""
        spec = job.spec
        hd = packet.header
        codec = self.codec
        if hd.codec_id != codec.codec_id or hd.weights_hash != codec.weights_hash:
            return FrameFailure(job=job, code="wrong_codec", message=(
                f"packet codec_id {hd.codec_id} weights {hd.weights_hash.hex()} is not the cloud's codec_id "
                f"{codec.codec_id} weights {codec.weights_hash.hex()}"))
        if (hd.width, hd.height) != (spec.width, spec.height):
            return FrameFailure(job=job, code="frame_size_mismatch", message=(
                f"packet frame size {hd.width}x{hd.height} is not the session's {spec.width}x{spec.height}"))
        if hd.label_set_hash != spec.label_set_hash and not (hd.label_set_hash == _ZERO_HASH and not hd.rois):
            return FrameFailure(job=job, code="label_set_mismatch", message=(
                f"packet label_set_hash {hd.label_set_hash.hex()} is not the session's {spec.label_set_hash.hex()} "
                f"(labels {list(spec.labels)[:8]}{'...' if len(spec.labels) > 8 else ''})"))
        bad_ids = sorted({r.label_id for r in hd.rois if r.label_id >= len(spec.labels)})
        if bad_ids:
            return FrameFailure(job=job, code="label_set_mismatch", message=(
                f"ROI label id(s) {bad_ids[:8]} outside the session's {len(spec.labels)} labels"))
        return None

    def _decode(self, job: FrameJob) -> "_Decoded | FrameFailure":
        t0 = time.monotonic()
        queue_ms = (t0 - job.enqueued) * 1000.0
        packet = job.packet
        if not isinstance(packet, Packet):
            try:
                packet = Packet.from_bytes(packet, max_packet_bytes=self.max_packet_bytes)
            except BitstreamError as exc:
                return FrameFailure(job=job, code=classify_parse_error(exc, job.packet), message=str(exc))
        failure = self.check(job, packet)
        if failure is not None:
            return failure
        hd = packet.header
        spec = job.spec
        codec = self.codec
        try:
            # a composer makes the frame from the latent: skip the latent decoder then
            if job.prepared is not None:
                # temporal: every cell of the stream's latent was transmitted, nothing is left to compose
                rec = job.prepared(True)
            elif self.composer is None:
                rec = codec.decompress(packet)
            else:
                rec = codec.decompress(packet, decode_frame=False)
        except CodecError as exc:
            return FrameFailure(job=job, code=codec_error_code(exc), message=str(exc))
        except (ValueError, IndexError, OverflowError) as exc:  # the range decoder on hostile section bytes
            return FrameFailure(job=job, code="decode_failed", message=f"{type(exc).__name__}: {exc}")
        return _Decoded(job=job, rec=rec, frame=rec.frame, width=hd.width, height=hd.height,
                        labels=[spec.labels[r.label_id] for r in hd.rois], queue_ms=queue_ms,
                        decode_ms=(time.monotonic() - t0) * 1000.0 + job.prepare_ms)
