"""Prometheus metrics of the cloud service, on a registry of their own.

Each :class:`CloudMetrics` owns a ``CollectorRegistry`` (not prometheus_client's global one), so
several servers can live in one process (tests) without name clashes. :meth:`CloudMetrics.serve`
exposes it over HTTP at ``/metrics`` (prometheus_client's WSGI app on a threaded server).

Metric names (all prefixed ``latentcast_cloud_``):

=====================================  =========  ==============================================
frames_received_total                  counter    FramePackets accepted into a session (not duplicates)
frames_duplicate_total                 counter    FramePackets whose seq was already received (re-acked)
frames_missing_total                   counter    seqs given up as lost (gaps below newer seqs)
frames_decoded_total                   counter    frames decoded and analysed
frames_dropped_total{reason}           counter    frames never decoded: cloud_overloaded, frame_expired,
                                                  stream_ended, server_shutdown
frame_errors_total{code}               counter    FrameErrors sent: malformed_packet, wrong_codec, ...
stream_errors_total{code}              counter    streams ended with a gRPC error status (code name)
auth_rejections_total{reason}          counter    calls refused by the token check
bytes_received_total                   counter    codec packet bytes received
packet_bpp                             histogram  packet bits per frame pixel
stage_seconds{stage}                   histogram  decode, compose, analytics, queue_wait, capture_to_result
queue_depth                            gauge      frames waiting in the pipeline queue
active_sessions                        gauge      open Stream calls
reconnects_total                       counter    sessions resumed with next_seq > 0
subscribers                            gauge      open Subscribe calls
subscriber_dropped_total               counter    frames dropped for slow subscribers
engine_info{engine}                    gauge      1 for the pipeline.engine in use (embedded, ray)
remote_seconds{stage}                  histogram  engine ray: one call to a Ray Serve stage (synthesis, analytics),
                                                  queueing and batching in the deployment included (the
                                                  deployments' own metrics come from Ray: ray_serve_*)
=====================================  =========  ==============================================
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

__all__ = ["CloudMetrics", "MetricsHttpServer", "RateLimitedLog", "STAGES"]

log = logging.getLogger(__name__)

PREFIX = "latentcast_cloud"
STAGES = ("decode", "compose", "analytics", "queue_wait", "capture_to_result")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BPP_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0)


class CloudMetrics:
    """The service's counters, gauges and histograms on their own registry (thread-safe)."""

    def __init__(self, *, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        p = PREFIX
        self.frames_received = Counter(f"{p}_frames_received", "FramePackets accepted into a session", registry=r)
        self.frames_duplicate = Counter(f"{p}_frames_duplicate", "FramePackets already received (re-acked)",
                                        registry=r)
        self.frames_missing = Counter(f"{p}_frames_missing", "seqs given up as lost (gaps below newer seqs)",
                                      registry=r)
        self.frames_decoded = Counter(f"{p}_frames_decoded", "frames decoded and analysed", registry=r)
        self.frames_dropped = Counter(f"{p}_frames_dropped", "frames not processed, by reason", ["reason"],
                                      registry=r)
        self.frame_errors = Counter(f"{p}_frame_errors", "per-frame errors sent to the edge, by code", ["code"],
                                    registry=r)
        self.stream_errors = Counter(f"{p}_stream_errors", "streams ended with an error status", ["code"],
                                     registry=r)
        self.auth_rejections = Counter(f"{p}_auth_rejections", "calls refused by the token check", ["reason"],
                                       registry=r)
        self.bytes_received = Counter(f"{p}_bytes_received", "codec packet bytes received", registry=r)
        self.refresh_requests = Counter(
            f"{p}_refresh_requests", "keyframes asked of temporal edges (missing reference)", registry=r
        )
        self.bpp = Histogram(f"{p}_packet_bpp", "packet bits per frame pixel", buckets=_BPP_BUCKETS, registry=r)
        self.stage_seconds = Histogram(f"{p}_stage_seconds", "stage latency in seconds", ["stage"],
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge(f"{p}_queue_depth", "frames waiting in the pipeline queue", registry=r)
        self.active_sessions = Gauge(f"{p}_active_sessions", "open Stream calls", registry=r)
        self.reconnects = Counter(f"{p}_reconnects", "sessions resumed with next_seq > 0", registry=r)
        self.subscribers = Gauge(f"{p}_subscribers", "open Subscribe calls", registry=r)
        self.subscriber_dropped = Counter(f"{p}_subscriber_dropped", "frames dropped for slow subscribers",
                                          registry=r)
        self.engine_info = Gauge(f"{p}_engine_info", "the pipeline engine in use", ["engine"], registry=r)
        self.remote_seconds = Histogram(f"{p}_remote_seconds", "one call to a Ray Serve stage", ["stage"],
                                        buckets=_LATENCY_BUCKETS, registry=r)
        for stage in STAGES:  # export every series from the start (zero), so dashboards see them
            self.stage_seconds.labels(stage=stage)
        self.frames_dropped.labels(reason="cloud_overloaded")

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage=stage).observe(max(0.0, seconds))

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of a sample (e.g. ``latentcast_cloud_frames_dropped_total``), 0 when absent."""
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v

    def serve(self, *, host: str, port: int) -> MetricsHttpServer:
        """Serve ``/metrics`` over HTTP on ``host:port`` (0 = a free port) in a daemon thread."""
        return MetricsHttpServer(registry=self.registry, host=host, port=port)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("metrics http: " + format, *args)


class MetricsHttpServer:
    """prometheus_client's WSGI app on a threaded HTTP server (a short poll interval, so
    :meth:`close` returns at once); ``GET /metrics`` answers in the text exposition format."""

    def __init__(self, *, registry: CollectorRegistry, host: str, port: int) -> None:
        server_cls = type("_MetricsServer", (ThreadingWSGIServer,),
                          {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
        self._httpd = make_server(host.strip("[]"), port, make_wsgi_app(registry), server_cls,
                                  handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="latentcast-cloud-metrics", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._httpd.server_port)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


class RateLimitedLog:
    """Log per-frame events at most once per ``interval_s`` per key, with the count suppressed since.

    Per-frame problems (a bad packet, a drop) are counted in metrics; this keeps the log readable
    when they repeat at frame rate. Thread-safe.
    """

    def __init__(self, logger: logging.Logger, *, interval_s: float = 5.0) -> None:
        self._log = logger
        self._interval = interval_s
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(self, level: int, key: str, msg: str, *args: Any, exc_info: Any = None) -> None:
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._last.get(key, (float("-inf"), 0))
            if now - last < self._interval:
                self._last[key] = (last, suppressed + 1)
                return
            self._last[key] = (now, 0)
            if len(self._last) > 10_000:  # bounded: forget keys idle for a while
                self._last = {k: v for k, v in self._last.items() if now - v[0] < self._interval}
        if suppressed:
            msg = f"{msg} (+{suppressed} similar in the last {self._interval:g} s)"
        self._log.log(level, msg, *args, exc_info=exc_info)
