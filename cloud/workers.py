"""The worker pool: per-stream frame queues, served fairly by worker threads (it runs no stage itself).

::

    submit(FrameJob) ─► a queue per stream (per-stream and global limits, drop policy)
        ─► worker threads take frames across the streams by deficit round robin on pixels (batches of up
           to ``max_batch``, or what came within ``batch_wait_ms``); a frame queued longer than
           ``max_frame_age_s`` is dropped
        ─► run_batch(batch)  (the chain: decode ─► compose ─► analytics, see cloud/pipeline.py)

Fairness and cost. Each stream has its own queue and the workers serve the streams in turn by
deficit round robin on pixels (:meth:`WorkerPool._next_job`): every stream gets the same decode work,
so a 1920x1088 stream gets about one frame for every five of a 768x576 one, and a stream that sends
expensive or hostile frames delays another stream's frame by at most one of its own frames per
worker, however many it queues; the global limit drops from the longest queue.

Frames the pool drops (``cloud_overloaded``, ``frame_expired``, ``stream_ended``, ``server_shutdown``)
go to ``fail(job, code, message)``; ``submit`` is called from the event loop and never blocks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from .config import PipelineConfig
from .frames import FrameJob
from .metrics import CloudMetrics

log = logging.getLogger(__name__)

__all__ = ["WorkerPool", "QUANTUM_PIXELS"]

QUANTUM_PIXELS = 640 * 480  # deficit round robin: decode credit a stream gains per turn (a VGA frame)


class WorkerPool:
    """Per-stream queues + worker threads handing batches of frames to ``run_batch``.

    ``run_batch(batch)`` runs in a worker thread and must call :meth:`release` for each of its jobs
    once that job is done (before handing its outcome on); ``fail(job, code, message)`` reports a
    frame the pool dropped (in a worker thread or in the caller of :meth:`submit`)."""

    def __init__(self, *, config: PipelineConfig, run_batch: Callable[[list[FrameJob]], None],
                 fail: Callable[[FrameJob, str, str], None], max_batch: int = 1,
                 metrics: CloudMetrics | None = None) -> None:
        """``max_batch``: frames a worker takes at once (a composer gains from batches, nothing else does)."""
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch {max_batch!r} must be an integer >= 1")
        self.config = config
        self.metrics = metrics
        self.max_batch = max_batch
        self._run_batch = run_batch
        self._fail = fail
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
        for i in range(self.config.worker_count):
            t = threading.Thread(target=self._worker, name=f"latentcast-cloud-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

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
        policy (this one or older ones) get a ``cloud_overloaded`` failure through ``fail``."""
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
        failure; frames already being processed finish. Returns how many were dropped."""
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

    def release(self, job: FrameJob) -> None:
        """``job`` is done (its outcome is about to be handed on): it no longer counts for its stream."""
        with self._cond:
            self._release(job)

    # ------------------------------------------------------------------ queues (lock held)
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
        turn a stream gains ``QUANTUM_PIXELS`` of credit and is served while its credit covers its next
        frame, so every stream gets the same decode work whatever its frame size (a 1080p stream does not
        get four times a 768x576 one's share); lock held."""
        while self._queues:
            stream_id, q = next(iter(self._queues.items()))
            credit = self._credit.get(stream_id, 0) + QUANTUM_PIXELS
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
                while len(batch) < self.max_batch:
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
