"""Where analysed frames go besides the edge: a JSON-lines file and ``Subscribe`` clients.

- :class:`JsonlSink`: one JSON object per analysed frame and line (camera, task, seq, capture
  time, cloud boxes, edge boxes, stage latencies, packet bytes, bpp). Written from the worker
  threads under a lock, flushed per line. Every line is strict JSON: a non-finite number (a
  detector that returns NaN) is written as null, and strings are ASCII-escaped, so control
  characters and the separators U+2028/U+0085 never split a line.
- :class:`FanOut`: the subscribers of ``Subscribe``. Each has a bounded queue; a slow subscriber
  loses its oldest frames (counted), never slows the pipeline. :meth:`FanOut.offer` runs in a
  worker thread: it encodes the frame once per (format, quality) that matching subscribers asked
  for (``cv2.imencode``), then hands the results to the event loop. A subscriber that asked for
  its own composer steps (``compose_steps``, e.g. 50 for people) gets its frames from the compose
  stage's recompose thread (:class:`~latentcast.cloud.compose.Recomposer`, backlog
  ``sinks.recompose_queue``, the oldest pending frame dropped, counted); the other subscribers get
  the analysed frame at once.

::

    worker thread: offer(fr) ─► analysed frame, encoded per (format, quality) ─► event loop ─► subscribers
                            └─► Recomposer.submit(fr, [steps ...])  (cloud/compose.py)
    recompose thread:           ─► frames by steps ─► encoded ─► event loop ─► those subscribers
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

import cv2
import numpy as np

from latentcast.proto import latentcast_v1_pb2 as pb

from .analytics import Detection
from .compose import Recomposer
from .frames import AnalysedFrame
from .metrics import CloudMetrics

log = logging.getLogger(__name__)

__all__ = ["JsonlSink", "FanOut", "Subscriber", "encode_image", "frame_record", "result_message", "to_proto_boxes"]

Encoding = tuple[int, int, int]  # (ImageFormat value, quality or PNG level, composer steps or 0)


def encode_image(rgb: np.ndarray, fmt: int, *, jpeg_quality: int = 90, png_compression: int = 1) -> bytes:
    """An RGB uint8 frame as JPEG or PNG bytes (``fmt``: ``pb.IMAGE_FORMAT_JPEG`` / ``_PNG``)."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if fmt == pb.IMAGE_FORMAT_JPEG:
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
    elif fmt == pb.IMAGE_FORMAT_PNG:
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, int(png_compression)])
    else:
        raise ValueError(f"image format {fmt} is not JPEG ({pb.IMAGE_FORMAT_JPEG}) or PNG ({pb.IMAGE_FORMAT_PNG})")
    if not ok:
        raise ValueError(f"cv2.imencode failed for a {rgb.shape} frame")
    return buf.tobytes()


def to_proto_boxes(dets: Iterable[Detection]) -> list[pb.Box]:
    return [pb.Box(x0=d.x0, y0=d.y0, x1=d.x1, y1=d.y1, label=d.label, label_id=max(0, int(d.class_id)),
                   score=d.score) for d in dets]


def _num(x: float, ndigits: int) -> float | None:
    """``x`` rounded, or None (JSON null) when it is NaN or infinite: those are not JSON."""
    x = float(x)
    return round(x, ndigits) if math.isfinite(x) else None


def _box_dict(d: Detection) -> dict:
    return {"x0": _num(d.x0, 2), "y0": _num(d.y0, 2), "x1": _num(d.x1, 2), "y1": _num(d.y1, 2),
            "label": str(d.label), "class_id": int(d.class_id), "score": _num(d.score, 4)}


def frame_record(fr: AnalysedFrame) -> dict:
    """The JSON-lines record of one analysed frame."""
    job = fr.job
    lat = {"queue_wait": _num(fr.queue_ms, 3), "decode": _num(fr.decode_ms, 3), "compose": _num(fr.compose_ms, 3),
           "analytics": _num(fr.analytics_ms, 3)}
    if fr.capture_to_result_ms is not None:
        lat["capture_to_result"] = _num(fr.capture_to_result_ms, 3)
    return {
        "camera_id": job.spec.camera_id, "task": job.spec.task, "seq": job.seq, "capture_ts_us": job.capture_ts_us,
        "result_ts_us": int(time.time() * 1e6), "width": job.spec.width, "height": job.spec.height,
        "boxes": [_box_dict(d) for d in fr.detections], "edge_boxes": [_box_dict(d) for d in job.edge_boxes],
        "latency_ms": lat, "packet_bytes": job.packet_bytes, "bpp": _num(fr.bpp, 6), "mode": job.mode,
    }


def _finite(x: float | None) -> float:
    """A proto float: non-finite and unknown (None) values become 0."""
    return float(x) if x is not None and math.isfinite(x) else 0.0


def result_message(fr: AnalysedFrame) -> pb.FrameResult:
    """The ``FrameResult`` of an analysed frame, without its image: boxes, latencies, coding mode and the
    camera's counters."""
    job, spec = fr.job, fr.job.spec
    cam = job.camera
    counters = pb.CameraCounters() if cam is None else pb.CameraCounters(
        frames_received=cam.frames_received, frames_analysed=cam.frames_analysed, frames_failed=cam.frames_failed,
        bytes_received=cam.bytes_received)
    return pb.FrameResult(camera_id=spec.camera_id, task=spec.task, seq=job.seq, capture_ts_us=job.capture_ts_us,
                          width=spec.width, height=spec.height, boxes=to_proto_boxes(fr.detections),
                          edge_boxes=to_proto_boxes(job.edge_boxes), packet_bytes=job.packet_bytes,
                          bpp=_finite(fr.bpp), queue_ms=_finite(fr.queue_ms), decode_ms=_finite(fr.decode_ms),
                          compose_ms=_finite(fr.compose_ms), analytics_ms=_finite(fr.analytics_ms),
                          latency_ms=_finite(fr.capture_to_result_ms), mode=job.mode, camera=counters)


class JsonlSink:
    """Appends :func:`frame_record` lines to ``path`` (created with its folder); thread-safe."""

    def __init__(self, *, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a", encoding="utf-8")
        self._lock = threading.Lock()
        self.lines = 0

    def __call__(self, fr: AnalysedFrame) -> None:
        # allow_nan=False: a non-finite number that got past frame_record raises (the pipeline logs the
        # failed sink) instead of writing NaN/Infinity, which no strict JSON reader accepts; ensure_ascii
        # (the default) escapes every non-ASCII character, so no line separator can split a record
        line = json.dumps(frame_record(fr), separators=(",", ":"), allow_nan=False, ensure_ascii=True) + "\n"
        with self._lock:
            if self._f.closed:
                return
            self._f.write(line)
            self._f.flush()
            self.lines += 1

    def close(self) -> None:
        with self._lock:
            self._f.close()


class Subscriber:
    """One ``Subscribe`` call: its filter, encoding and bounded queue (used on the event loop)."""

    def __init__(self, *, camera_id: str, task: str, fmt: int, quality: int, queue_size: int,
                 steps: int = 0, allowed: Callable[[str], bool] | None = None) -> None:
        self.camera_id = camera_id
        self.allowed = allowed  # the cameras the subscriber's token may see (None: any)
        self.task = task
        self.fmt = fmt
        self.quality = quality
        self.steps = steps  # composer sampling steps of this client's frames; 0 = the analysed frame
        self._q: deque[pb.FrameResult] = deque()
        self._size = queue_size
        self._ready = asyncio.Event()
        self.closed = False
        self.dropped = 0
        self.sent = 0

    def matches(self, camera_id: str, task: str) -> bool:
        return ((not self.camera_id or self.camera_id == camera_id) and (not self.task or self.task == task)
                and (self.allowed is None or self.allowed(camera_id)))

    @property
    def encoding(self) -> Encoding | None:
        return None if self.fmt == pb.IMAGE_FORMAT_UNSPECIFIED else (self.fmt, self.quality, self.steps)

    def put(self, msg: pb.FrameResult) -> bool:
        """Queue ``msg``; False when the oldest frame had to be dropped for it."""
        dropped = False
        if len(self._q) >= self._size:
            self._q.popleft()
            self.dropped += 1
            dropped = True
        self._q.append(msg)
        self._ready.set()
        return not dropped

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def get(self) -> pb.FrameResult | None:
        """The next frame, or None once closed and drained."""
        while not self._q:
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        self.sent += 1
        return self._q.popleft()


class FanOut:
    """Subscribers of analysed frames. ``subscribe``/``unsubscribe``/``close`` on the event loop,
    ``offer`` from worker threads."""

    def __init__(self, *, loop: asyncio.AbstractEventLoop, queue_size: int = 16, jpeg_quality: int = 90,
                 png_compression: int = 1, metrics: CloudMetrics | None = None, composer=None,
                 max_compose_steps: int = 200, recompose_queue: int = 4) -> None:
        """``composer``: the pipeline's diffusion composer, if any; subscribers may then ask for frames
        composed with their own number of sampling steps (``SubscribeRequest.compose_steps``), made in
        the compose stage's recompose thread with at most ``recompose_queue`` frames waiting."""
        self._loop = loop
        self.max_compose_steps = max_compose_steps
        self.recomposer = Recomposer(composer=composer, queue=recompose_queue, on_drop=self._recompose_dropped)
        self._queue_size = queue_size
        self.jpeg_quality = jpeg_quality
        self.png_compression = png_compression
        self.metrics = metrics
        self._subs: set[Subscriber] = set()
        self._lock = threading.Lock()  # guards the set for offer()'s snapshot
        self._closed = False

    @property
    def composer(self):
        """The diffusion composer subscribers' own steps are composed with (None: the analysed frame only)."""
        return self.recomposer.composer

    @composer.setter
    def composer(self, composer) -> None:
        self.recomposer.composer = composer

    @property
    def recompose_queue(self) -> int:
        return self.recomposer.queue

    @property
    def recompose_dropped(self) -> int:
        """Frames dropped from the full recompose backlog."""
        return self.recomposer.dropped

    def _recompose_dropped(self) -> None:
        if self.metrics is not None:
            self.metrics.subscriber_dropped.inc()

    def __len__(self) -> int:
        return len(self._subs)

    def subscribe(self, req: pb.SubscribeRequest, *, allowed: Callable[[str], bool] | None = None) -> Subscriber:
        """Register a subscriber for ``req`` (raises ValueError on a bad format or quality); ``allowed``
        limits it to the cameras its token may see."""
        if req.format not in (pb.IMAGE_FORMAT_UNSPECIFIED, pb.IMAGE_FORMAT_JPEG, pb.IMAGE_FORMAT_PNG):
            raise ValueError(f"SubscribeRequest.format {req.format} is not a known ImageFormat")
        if req.jpeg_quality > 100:
            raise ValueError(f"SubscribeRequest.jpeg_quality {req.jpeg_quality} out of range 1..100 (0 = default)")
        if req.format == pb.IMAGE_FORMAT_JPEG:
            quality = req.jpeg_quality or self.jpeg_quality
        elif req.format == pb.IMAGE_FORMAT_PNG:
            quality = self.png_compression
        else:
            quality = 0
        if req.compose_steps > self.max_compose_steps:
            raise ValueError(
                f"SubscribeRequest.compose_steps {req.compose_steps} out of range 0..{self.max_compose_steps}"
            )
        # without a diffusion composer the frame does not depend on steps: everyone gets the analysed frame
        steps = req.compose_steps if self.composer is not None and req.format != pb.IMAGE_FORMAT_UNSPECIFIED else 0
        sub = Subscriber(camera_id=req.camera_id, task=req.task, fmt=req.format, quality=quality,
                         queue_size=self._queue_size, steps=steps, allowed=allowed)
        if self._closed:
            sub.close()
            return sub
        with self._lock:
            self._subs.add(sub)
        if self.metrics is not None:
            self.metrics.subscribers.set(len(self._subs))
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._lock:
            self._subs.discard(sub)
        sub.close()
        if self.metrics is not None:
            self.metrics.subscribers.set(len(self._subs))

    def close(self) -> None:
        """End every subscription (their calls finish after draining) and the recompose thread."""
        self._closed = True
        self.recomposer.close()  # after the composition in progress, at most
        with self._lock:
            subs = list(self._subs)
            self._subs.clear()
        for s in subs:
            s.close()
        if self.metrics is not None:
            self.metrics.subscribers.set(0)

    # ---------------------------------------------------------------- worker side
    def offer(self, fr: AnalysedFrame) -> None:
        """Encode ``fr`` for the matching subscribers (in the calling worker thread) and publish it."""
        spec = fr.job.spec
        with self._lock:
            wanted = {s.encoding for s in self._subs if s.matches(spec.camera_id, spec.task)}
        if not wanted:
            return
        base = result_message(fr)
        now = [e for e in wanted if e is not None and e[2] == 0]
        later = [e for e in wanted if e is not None and e[2] != 0]  # clients that asked for other steps (people: 50)
        if later and (fr.compose_request is None or self.composer is None):
            now, later = now + later, []  # nothing to recompose: the analysed frame is the frame
        images = {e: self._encode(fr.frame, e) for e in now}
        self._call(self._publish, base, images, True)
        if later:
            self.recomposer.submit(fr, {e[2] for e in later}, lambda frames: self._recomposed(base, later, frames))

    def _encode(self, frame: np.ndarray, enc: Encoding) -> bytes:
        return encode_image(frame, enc[0], jpeg_quality=enc[1], png_compression=enc[1])

    def _call(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server is gone
            pass

    def _recomposed(self, base: pb.FrameResult, encs: list[Encoding], frames: dict[int, np.ndarray]) -> None:
        """In the recompose thread: the frames made with the subscribers' own steps, encoded and published."""
        images = {e: self._encode(frames[e[2]], e) for e in encs if e[2] in frames}
        if images and not self._closed:
            self._call(self._publish, base, images, False)

    def _publish(self, base: pb.FrameResult, images: dict[Encoding, bytes], results_only: bool = True) -> None:
        """Queue the frame for the matching subscribers whose encoding is in ``images``, and for the
        results-only ones when ``results_only`` (the first publication of a frame)."""
        for sub in list(self._subs):
            if not sub.matches(base.camera_id, base.task):
                continue
            enc = sub.encoding
            if enc is None and not results_only:
                continue
            msg = pb.FrameResult()
            msg.CopyFrom(base)
            if enc is not None:
                if enc not in images:  # subscribed after the frame was encoded
                    continue
                msg.format = enc[0]
                msg.image = images[enc]
            if not sub.put(msg) and self.metrics is not None:
                self.metrics.subscriber_dropped.inc()
