"""The cloud's chain, assembled: where a received frame goes, stage by stage, and where its outcome goes.

::

    server.py (gRPC, event loop)
      stream opens ─► decode.DecoderRegistry.session(header): the session's codec id picks its decoder
      each frame   ─► decoder.admit (parse + bound, no decoding) ─► [temporal: decoder.prepare, in order]
                   ─► Pipeline.submit(FrameJob)
    workers.py     ─► a queue per stream, deficit round robin on pixels, drop policy, expiry ─► a batch
    decode.py      ─► per frame: DecoderRegistry.decode (latentcast per-frame / temporal render / jpeg)
    compose.py     ─► the batch's latents ─► composer (none: the latent decoder made the frame already)
    analytics.py   ─► per frame: detector
    frames.py      ─► AnalysedFrame | FrameFailure(code)
                   ─► job.deliver (the stream: FrameAnalytics / FrameError) and on_result (sinks.py: JSON
                      lines, Subscribe fan-out, whose step-subscribers get compose.Recomposer frames)

Modules, one job each: ``server`` gRPC (streams, acks, Subscribe, lifecycle), ``sessions`` per-camera
state and SessionHeader checks, ``decode`` the decoders by codec id, ``workers`` the queues and threads,
``compose`` the composer calls, ``analytics`` the detectors, ``sinks`` where results go besides the edge,
``frames`` the records and error codes, ``pipeline`` (this module) the assembly: :class:`Pipeline` runs
decode ─► compose ─► analytics on the pool's batches and hands the outcomes on; :func:`load_and_warm` loads
the codec, detector and composer and runs one dummy frame through them.

Per-frame problems never stop a worker; they become a :class:`FrameFailure` with one of the codes of
``cloud/frames.py`` (:data:`ERROR_CODES`). What one frame can cost is bounded before it gets here: the
session's frame size (``sessions.max_frame_pixels``), the decoders' admission checks (``cloud/decode.py``)
and the entropy decoder's budget checks (``proto/entropy.py``: a forged section is refused at its first
inconsistent symbol group).

``submit`` is called from the event loop and never blocks; ``deliver`` and ``on_result`` callbacks run
in worker threads (or, for drops, in the caller of ``submit``) and must be thread-safe and quick (the
server hands results to the loop with ``call_soon_threadsafe``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from latentcast.models.codec import LatentCodec
from latentcast.proto.bitstream import MAX_PACKET_BYTES, Roi

from .analytics import Detector, make_detector
from .compose import ComposeStage, make_composer
from .config import CloudConfig, PipelineConfig
from .decode import DecoderRegistry, classify_parse_error, codec_error_code
from .frames import (
    CLIENT_FAULT_CODES,
    DROP_CODES,
    ERROR_CODES,
    AnalysedFrame,
    DecodedFrame,
    FrameFailure,
    FrameJob,
    FrameOutcome,
)
from .metrics import CloudMetrics, RateLimitedLog
from .workers import WorkerPool

log = logging.getLogger(__name__)
_rl = RateLimitedLog(log)

__all__ = ["FrameJob", "AnalysedFrame", "FrameFailure", "FrameOutcome", "Pipeline", "classify_parse_error",
           "ERROR_CODES", "DROP_CODES", "CLIENT_FAULT_CODES", "codec_error_code", "load_and_warm"]


class Pipeline:
    """The worker pool running decode ─► compose ─► analytics, and the hand-back of every outcome."""

    def __init__(self, *, codec: LatentCodec, detector: Detector, config: PipelineConfig | None = None,
                 metrics: CloudMetrics | None = None, on_result: Sequence[Callable[[AnalysedFrame], None]] = (),
                 max_packet_bytes: int = MAX_PACKET_BYTES, composer=None, compose_steps: int = 8,
                 decoders: DecoderRegistry | None = None) -> None:
        """``composer``: None decodes ẑ_c with the codec's latent decoder (the embedded default); a
        ``latentcast.models.composer`` composer (e.g. ControlNet diffusion) composes each batch's frames
        together, with ``compose_steps`` sampling steps (the frames' consumers are machines).
        ``decoders``: the accepted codecs' decoders (default: ``config.codecs`` around ``codec``)."""
        self.codec = codec
        self.detector = detector
        self.config = config or PipelineConfig()
        self.metrics = metrics
        self.on_result = list(on_result)
        self.max_packet_bytes = max_packet_bytes
        self.decoders = decoders or DecoderRegistry.for_codec(codec, names=self.config.codecs,
                                                              max_packet_bytes=max_packet_bytes)
        self.compose = ComposeStage(composer, steps=compose_steps)
        # only a composer gains from a batch (it composes the frames together); without one a frame is taken
        # when a worker is free, so a stream's frame waits for at most one frame of another
        self.workers = WorkerPool(config=self.config, metrics=metrics,
                                  max_batch=self.config.max_batch if composer is not None else 1,
                                  run_batch=lambda batch: self._run_batch(batch),
                                  fail=lambda job, code, message: self._fail(job, code, message))

    @property
    def composer(self):
        return self.compose.composer

    @property
    def compose_steps(self) -> int:
        return self.compose.steps

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self.config.torch_threads > 0:
            import torch

            torch.set_num_threads(self.config.torch_threads)
        self.workers.start()
        log.info("pipeline: %d worker(s), batch <= %d within %.1f ms, queue <= %d (<= %d per stream), %s; codecs %s",
                 self.config.worker_count, self.config.max_batch, self.config.batch_wait_ms,
                 self.config.max_queued_total, self.config.max_queued_per_session, self.config.drop_policy,
                 ", ".join(self.decoders.names))

    def stop(self, timeout: float = 10.0) -> None:
        """Fail the frames still queued (``server_shutdown``), let workers finish their batch, join them."""
        self.workers.stop(timeout)

    @property
    def queue_depth(self) -> int:
        """Frames waiting in the queues (all streams)."""
        return self.workers.queue_depth

    def in_flight(self, stream_id: str) -> int:
        """Frames of ``stream_id`` queued or being processed."""
        return self.workers.in_flight(stream_id)

    # ------------------------------------------------------------------ submission
    def submit(self, job: FrameJob) -> bool:
        """Queue ``job``; never blocks. False when the job itself was dropped. Frames dropped by the
        policy (this one or older ones) get a ``cloud_overloaded`` FrameFailure through ``deliver``."""
        return self.workers.submit(job)

    def cancel(self, stream_id: str) -> int:
        """Drop the frames of ``stream_id`` still queued (its stream ended): each gets a ``stream_ended``
        FrameFailure and is counted; frames already being decoded finish. Returns how many were dropped."""
        return self.workers.cancel(stream_id)

    # ------------------------------------------------------------------ outcomes
    def _run_batch(self, batch: list[FrameJob]) -> None:
        outcomes = self._safe(batch, lambda: self.process_batch(batch))
        for job, outcome in zip(batch, outcomes):
            self.workers.release(job)
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
            if job.camera is not None:  # before the sinks: a subscriber's counters include its own frame
                job.camera.frames_analysed += 1
            if m is not None:
                m.frames_decoded.inc()
                m.observe_stage("decode", outcome.decode_ms / 1000)
                m.observe_stage("compose", outcome.compose_ms / 1000)
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

    # ------------------------------------------------------------------ the chain
    def process(self, job: FrameJob) -> FrameOutcome:
        """Check, decode and analyse one frame (synchronously, in the calling thread)."""
        return self.process_batch([job])[0]

    def process_batch(self, jobs: list[FrameJob]) -> list[FrameOutcome]:
        """Check and decode each frame, compose the decoded ones together (one batched composer call
        across streams), then analyse each; one outcome per job, in order."""
        latent_only = self.compose.composer is not None  # a composer makes the frame: skip the latent decoder
        decoded = self.compose.compose([self.decoders.decode(job, latent_only=latent_only) for job in jobs])
        return [d if isinstance(d, FrameFailure) else self._analyse(d) for d in decoded]

    def _analyse(self, d: DecodedFrame) -> FrameOutcome:
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
                             decode_ms=d.decode_ms, analytics_ms=(t2 - t1) * 1000.0, compose_ms=d.compose_ms,
                             capture_to_result_ms=c2r, bpp=d.job.packet_bytes * 8.0 / (d.width * d.height),
                             compose_request=d.request)


def load_and_warm(config: CloudConfig, *, codec: LatentCodec | None = None, detector: Detector | None = None,
                  composer=None) -> tuple[LatentCodec, Detector, object | None]:
    """The codec, detector and composer (each loaded from ``config`` unless given), warmed with one dummy
    frame coded, decoded, composed and analysed (the first real frame must not pay for any set-up)."""
    if codec is None:
        codec = LatentCodec.load(config.codec.weights)
        codec.use_synthesis(config.codec.synthesis)
        codec.use_synthesis(config.codec.temporal_synthesis, temporal=True)
        log.info("frames render with the synthesis %s (codec.synthesis %s), temporal streams with %s "
                 "(codec.temporal_synthesis %s)", codec.synthesis_name or "of the codec", config.codec.synthesis,
                 codec.temporal_synthesis_name or "the codec's own", config.codec.temporal_synthesis)
    if detector is None:
        detector = make_detector(config.analytics)
    n = max(16, config.codec.warmup_size)
    yy, xx = np.mgrid[0:n, 0:n]
    dummy = np.stack([xx * 255 // n, yy * 255 // n, (xx + yy) * 127 // n], axis=-1).astype(np.uint8)
    data = codec.compress(dummy, [Roi(x0=0, y0=0, x1=n // 2, y1=n // 2)], rate_point=0)
    rec = codec.decompress(data)
    if composer is None:
        composer = make_composer(config.composer, codec)
    ComposeStage(composer).warm(rec)  # warm the sampler too
    detector.detect(rec.frame)
    if hasattr(codec, "temporal_g_s"):  # the render runtime's copy of g_s made now, not at the first stream
        from latentcast.models.synthesis_runtime import render_synthesis

        render_synthesis(codec.temporal_g_s, config.codec.render_runtime, threads=config.pipeline.torch_threads)
    return codec, detector, composer
