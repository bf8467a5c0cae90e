"""What the dashboard knows: each camera's last frame, its rates and history, and a detections timeline.

Fed by the subscription (one :class:`~latentcast.proto.latentcast_v1_pb2.FrameResult` at a time, on the
event loop) and read by the web server. Rates come from the cloud's cumulative per-camera counters
(``FrameResult.camera``), so a frame the dashboard itself skipped (a slow subscriber) changes no number:

- fps in, fps out, kbit/s: the change of frames received, frames analysed and bytes received over
  ``rate_window_s``, divided by the time between those two results' arrivals;
- bpp and p50 latency: the mean and median of the results that arrived in the window;
- drops: frames the cloud answered with a FrameError (total, and in the window).

A camera whose last result is older than ``stale_s`` is stale. No numpy: plain Python on small deques.
"""

from __future__ import annotations

import base64
import statistics
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from latentcast.proto import latentcast_v1_pb2 as pb

from .config import DashboardSection

__all__ = ["CameraView", "DashboardState", "LinkStatus", "Timeline", "box_dict"]


def box_dict(b: pb.Box) -> dict[str, Any]:
    return {"x0": round(b.x0, 1), "y0": round(b.y0, 1), "x1": round(b.x1, 1), "y1": round(b.y1, 1),
            "label": b.label, "score": round(b.score, 3)}


@dataclass
class _Sample:
    t: float  # monotonic arrival time of the result
    received: int
    analysed: int
    failed: int
    bytes: int
    bpp: float
    latency_ms: float


@dataclass
class CameraView:
    """One camera as the dashboard shows it."""

    camera_id: str
    window_s: float
    history_s: float
    task: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""
    seq: int = -1
    last_t: float = 0.0  # monotonic arrival of the last result
    jpeg: bytes = b""  # the last frame's image
    boxes: list[dict] = field(default_factory=list)
    edge_boxes: list[dict] = field(default_factory=list)
    results_seen: int = 0  # results this dashboard received (the cloud's count is in the counters)
    samples: deque[_Sample] = field(default_factory=deque)
    history: deque[dict] = field(default_factory=deque)  # one point per stats tick: t (wall s), kbps, fps_out, p50

    def add(self, r: pb.FrameResult, now: float) -> None:
        self.task, self.width, self.height, self.mode, self.seq = r.task, r.width, r.height, r.mode, r.seq
        self.last_t = now
        if r.image:
            self.jpeg = bytes(r.image)
        self.boxes = [box_dict(b) for b in r.boxes]
        self.edge_boxes = [box_dict(b) for b in r.edge_boxes]
        self.results_seen += 1
        c = r.camera
        self.samples.append(_Sample(now, c.frames_received, c.frames_analysed, c.frames_failed, c.bytes_received,
                                    r.bpp, r.latency_ms))
        while self.samples and now - self.samples[0].t > self.window_s:
            self.samples.popleft()

    def stale(self, now: float, stale_s: float) -> bool:
        return now - self.last_t > stale_s

    def stats(self, now: float, stale_s: float) -> dict[str, Any]:
        """The live numbers (rates over the window; zero rates once stale)."""
        s = [x for x in self.samples if now - x.t <= self.window_s]
        last = self.samples[-1] if self.samples else None
        kbps = fps_in = fps_out = drops_window = 0.0
        if len(s) >= 2 and s[-1].t > s[0].t:
            dt = s[-1].t - s[0].t
            kbps = (s[-1].bytes - s[0].bytes) * 8 / dt / 1000
            fps_in = (s[-1].received - s[0].received) / dt
            fps_out = (s[-1].analysed - s[0].analysed) / dt
            drops_window = float(s[-1].failed - s[0].failed)
        lat = [x.latency_ms for x in s if x.latency_ms > 0]
        return {
            "camera_id": self.camera_id, "task": self.task, "width": self.width, "height": self.height,
            "mode": self.mode, "seq": self.seq, "stale": self.stale(now, stale_s),
            "age_s": round(now - self.last_t, 2) if self.last_t else None,
            "kbps": round(kbps, 2), "fps_in": round(fps_in, 2), "fps_out": round(fps_out, 2),
            "bpp": round(statistics.fmean(x.bpp for x in s), 5) if s else 0.0,
            "p50_latency_ms": round(statistics.median(lat), 1) if lat else 0.0,
            "drops": int(last.failed) if last else 0, "drops_window": int(drops_window),
            "frames_received": int(last.received) if last else 0, "frames_analysed": int(last.analysed) if last else 0,
            "bytes_received": int(last.bytes) if last else 0, "results_seen": self.results_seen,
            "detections": len(self.boxes),
        }

    def tick(self, wall: float, stats: dict[str, Any]) -> None:
        """Append one chart point (called once per stats interval)."""
        self.history.append({"t": round(wall, 2), "kbps": stats["kbps"], "fps_out": stats["fps_out"],
                             "p50_latency_ms": stats["p50_latency_ms"]})
        while self.history and wall - self.history[0]["t"] > self.history_s:
            self.history.popleft()

    def frame_message(self) -> dict[str, Any]:
        """The WebSocket message of the last frame (the image as base64 JPEG)."""
        return {"type": "frame", "camera_id": self.camera_id, "seq": self.seq, "width": self.width,
                "height": self.height, "mode": self.mode, "boxes": self.boxes, "edge_boxes": self.edge_boxes,
                "image": base64.b64encode(self.jpeg).decode("ascii") if self.jpeg else ""}


class Timeline:
    """Cloud detections per label in fixed buckets of wall-clock time, the last ``span_s`` seconds."""

    def __init__(self, *, bucket_s: float, span_s: float) -> None:
        self.bucket_s = bucket_s
        self.span_s = span_s
        self._buckets: deque[tuple[float, Counter]] = deque()
        self.totals: Counter = Counter()

    def add(self, labels: list[str], wall: float) -> None:
        start = wall - wall % self.bucket_s
        if not self._buckets or self._buckets[-1][0] < start:
            self._buckets.append((start, Counter()))
        self._buckets[-1][1].update(labels)  # a late result lands in the newest bucket: buckets never reorder
        self.totals.update(labels)
        self._trim(wall)

    def _trim(self, wall: float) -> None:
        while self._buckets and wall - self._buckets[0][0] > self.span_s:
            self._buckets.popleft()

    def snapshot(self, wall: float) -> dict[str, Any]:
        self._trim(wall)
        return {"bucket_s": self.bucket_s, "buckets": [{"t": t, "counts": dict(c)} for t, c in self._buckets],
                "totals": dict(self.totals.most_common())}


@dataclass
class LinkStatus:
    """The subscription to the cloud, for the page's banner."""

    target: str
    connected: bool = False
    since: float = field(default_factory=time.time)  # wall time of the last change
    error: str = ""  # why it is down (the last gRPC status), "" when up
    reconnects: int = 0

    def up(self) -> None:
        if not self.connected:
            self.connected, self.error, self.since = True, "", time.time()

    def down(self, error: str) -> None:
        if self.connected:
            self.reconnects += 1
        self.connected, self.error, self.since = False, error, time.time()

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "connected": self.connected, "since": round(self.since, 3),
                "error": self.error, "reconnects": self.reconnects}


class DashboardState:
    """Every camera's view (bounded by ``max_cameras``, least recently seen forgotten), the timeline and the
    link status. Used on one event loop only."""

    def __init__(self, config: DashboardSection | None = None, *, target: str = "") -> None:
        self.config = config or DashboardSection()
        self.cameras: OrderedDict[str, CameraView] = OrderedDict()
        self.timeline = Timeline(bucket_s=self.config.timeline_bucket_s, span_s=self.config.history_s)
        self.link = LinkStatus(target=target)
        self.results = 0

    def add(self, r: pb.FrameResult, *, now: float | None = None, wall: float | None = None) -> CameraView:
        now = time.monotonic() if now is None else now
        wall = time.time() if wall is None else wall
        cam = self.cameras.get(r.camera_id)
        if cam is None:
            cam = CameraView(camera_id=r.camera_id, window_s=self.config.rate_window_s,
                             history_s=self.config.history_s)
            self.cameras[r.camera_id] = cam
            while len(self.cameras) > self.config.max_cameras:
                self.cameras.popitem(last=False)
        else:
            self.cameras.move_to_end(r.camera_id)
        cam.add(r, now)
        self.timeline.add([b.label for b in r.boxes], wall)
        self.results += 1
        return cam

    def tick(self, *, now: float | None = None, wall: float | None = None) -> dict[str, Any]:
        """The stats message pushed to the browsers once per interval (each camera gets a chart point)."""
        return {"type": "stats", **self.snapshot(now=now, wall=wall, chart_point=True)}

    def snapshot(self, *, now: float | None = None, wall: float | None = None,
                 chart_point: bool = False) -> dict[str, Any]:
        """The numbers (``GET /api/state``); ``chart_point`` also appends each camera's chart point."""
        now = time.monotonic() if now is None else now
        wall = time.time() if wall is None else wall
        cams = []
        for cam in sorted(self.cameras.values(), key=lambda c: c.camera_id):
            st = cam.stats(now, self.config.stale_s)
            if chart_point:
                cam.tick(wall, st)
            cams.append({**st, "history": list(cam.history)})
        return {"t": round(wall, 3), "link": self.link.as_dict(), "cameras": cams,
                "timeline": self.timeline.snapshot(wall), "results": self.results}
