"""Streaming benchmark: N concurrent cameras against one cloud on loopback, latentcast vs JPEG over gRPC.

::

    latentcast bench stream [--streams 1,4,16] [--seconds 20] [--pace 10] [--out results/stream_bench.json]

For every N in ``--streams`` and every system, N edge streams (one :class:`EdgeApp` each, its own
camera_id, reading vtest.avi at ``--pace`` fps, realtime: a busy edge drops the oldest frame) run
for ``--seconds`` against ONE server on 127.0.0.1. ``--placement processes`` (the CLI's default) runs
the server in one child process and each edge in its own, as they are deployed (a cloud service, one
edge per camera gateway); ``shared`` runs them all in this process, where they also share one
interpreter lock and one event loop. Either way they share this machine's cores:

- ``latentcast``: the real edge (grounding with YOLOX-nano every 5 frames, ONNX Runtime encoder,
  ROI-only packets at the edge config's rate point) against the real :class:`CloudServer`
  (``elic-lite`` decode + YOLOX-nano analytics, the cloud config's defaults).
- ``latentcast-temporal``: the same edge with temporal coding (``temporal.mode: temporal``: a keyframe, then
  P frames of the cells that changed; the edge analyses and the cloud renders only those cells).
- ``jpeg``: the baseline. The same EdgeApp machinery (capture, pacing, send queue and drop policy,
  EdgeClient with acks) with the encoder replaced by ``cv2.imencode`` of the whole frame (quality
  ``--jpeg-quality``) and no grounding, against the same real :class:`CloudServer` with its JPEG codec
  enabled (``pipeline.codecs: [latentcast, jpeg]``; off in a production cloud): the sessions name
  ``CODEC_IDS["jpeg"]``, FramePacket.packet carries the JPEG, the cloud's decode stage bounds it by its
  frame header and decodes it with ``cv2.imdecode``, then the SAME detector object, worker pool, per-stream
  backpressure, queue bounds, drop policy and ack rule (every ``ack_every_frames`` frames or
  ``ack_interval_ms``, acking the highest unbroken seq) as latentcast's frames.

Measured per (system, N): results per second (total, per stream) over the window after
``--warmup``; capture-to-result latency p50/p99 (edge clock: receive time in the EdgeApp's
``on_result`` minus FrameAnalytics.capture_ts_us); per-stage medians per frame (edge: capture = reading
and converting a frame, grounding, encode; cloud, from FrameAnalytics: queue, decode, compose,
analytics); edge counters per stream (captured, encoded, sent, dropped by reason, frame errors);
bytes per frame up and down:

- packet: the codec packet (or JPEG) bytes, mean over the frames written to the stream;
- overhead: ``EdgeMessage(frame=FramePacket(...)).ByteSize() - len(packet)`` of the very message
  the EdgeClient writes (seq, capture_ts_us, edge_boxes, tags and lengths) plus gRPC's 5-byte
  length prefix. HTTP/2 DATA frame headers (9 bytes per DATA frame) come on top and are NOT in
  ``overhead``; ``http2_data_headers_est`` estimates them as 9 bytes per started 16,384 bytes of
  the length-prefixed message (the HTTP/2 default SETTINGS_MAX_FRAME_SIZE, one message per DATA
  frame; gRPC may coalesce small messages or split at flow-control windows). HPACK headers (once
  per RPC), TCP/IP and TLS are not counted;
- downstream: every CloudMessage the edge reads after SessionAccepted (acks, FrameAnalytics,
  FrameErrors) by kind, ``ByteSize() + 5``, and their total per result received.

Edge and cloud share this machine, so the latentcast edge's grounding and encoding compete with
the cloud's decoding for the same cores (the JPEG edge is cheap): the numbers are a lower bound on
what a cloud box alone would serve for latentcast, not for JPEG.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "GRPC_PREFIX_BYTES",
    "HTTP2_FRAME_HEADER_BYTES",
    "SYSTEMS",
    "JpegEncoder",
    "NullGrounder",
    "main",
    "markdown",
    "run_bench",
]

SYSTEMS = ("latentcast", "latentcast-temporal", "jpeg")
PLACEMENTS = ("processes", "shared")  # the cloud and each edge in its own process / all in this one
GRPC_PREFIX_BYTES = 5  # gRPC length-prefixed message: 1 compressed flag + 4 length bytes
HTTP2_FRAME_HEADER_BYTES = 9  # per HTTP/2 frame
HTTP2_DEFAULT_MAX_FRAME = 16384  # HTTP/2 default SETTINGS_MAX_FRAME_SIZE
_RUN_TIMEOUT_PAD_S = 60.0  # an edge run must end this long after its stop, else it is cancelled


# ------------------------------------------------------------------------------------ baseline edge
class JpegEncoder:
    """Stands in for the EdgeEncoder in an EdgeApp: the whole frame as one JPEG (OpenCV/libjpeg)."""

    n_rates = 1

    def __init__(self, quality: int = 75):
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"JPEG quality {quality!r} out of range 1..100")
        from latentcast.proto.ids import CODEC_IDS

        self.quality = int(quality)
        self.manifest = {"codec_id": CODEC_IDS["jpeg"]}  # the cloud's JPEG codec (pipeline.codecs must list it)
        self.weights_hash = b"\0" * 8  # a JPEG has no weights: the cloud accepts any hash

    def compress(self, rgb: np.ndarray, rois: Sequence[Any] = (), *, rate_point: int = 0, roi_only: bool = False,
                 label_set_hash: bytes = b"\0\0\0\0") -> bytes:
        import cv2

        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            raise RuntimeError("OpenCV cannot encode JPEG")
        return buf.tobytes()


class NullGrounder:
    """No grounding on the baseline edge: no ROIs, no edge boxes."""

    def __init__(self, labels: Sequence[str]):
        from latentcast.edge.grounding import Grounding

        self.labels = list(labels)
        self._g = Grounding(rois=[], boxes=[], detected=False)

    def update(self, rgb: np.ndarray):
        return self._g

    def reset(self) -> None:
        pass


# ------------------------------------------------------------------------------------ wire counting
def _http2_headers_est(message_bytes: int) -> int:
    return HTTP2_FRAME_HEADER_BYTES * max(1, math.ceil((message_bytes + GRPC_PREFIX_BYTES) / HTTP2_DEFAULT_MAX_FRAME))


@dataclass
class _Wire:
    """Bytes one edge stream put on and took off the gRPC stream (messages, not sockets)."""

    frames: int = 0
    packet_bytes: int = 0
    message_bytes: int = 0  # sum of EdgeMessage(frame=...).ByteSize()
    edge_boxes_bytes: int = 0  # of which the FramePacket.edge_boxes field (tags + lengths + boxes)
    http2_est: int = 0
    session_headers: int = 0
    session_header_bytes: int = 0  # EdgeMessage(header=...) + prefix, once per connection
    down_count: collections.Counter = field(default_factory=collections.Counter)
    down_bytes: collections.Counter = field(default_factory=collections.Counter)  # ByteSize() + prefix, by kind

    def add_frame(self, msg, packet_len: int) -> None:
        from latentcast.proto import latentcast_v1_pb2 as pb

        n = msg.ByteSize()
        self.frames += 1
        self.packet_bytes += packet_len
        self.message_bytes += n
        boxes = msg.frame.edge_boxes
        if len(boxes):
            self.edge_boxes_bytes += pb.FramePacket(edge_boxes=boxes).ByteSize()
        self.http2_est += _http2_headers_est(n)

    def add_down(self, msg) -> None:
        kind = msg.WhichOneof("msg") or "empty"
        self.down_count[kind] += 1
        self.down_bytes[kind] += msg.ByteSize() + GRPC_PREFIX_BYTES


class _CountingCall:
    """Proxy of a grpc.aio stream call that counts the messages read through it."""

    def __init__(self, call: Any, wire: _Wire):
        self._call, self._wire = call, wire

    async def read(self):
        import grpc

        msg = await self._call.read()
        if msg is not grpc.aio.EOF:
            self._wire.add_down(msg)
        return msg

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


def _bench_edge_app_class():
    from latentcast.edge.app import EdgeApp
    from latentcast.proto import latentcast_v1_pb2 as pb

    class BenchEdgeApp(EdgeApp):
        """EdgeApp whose client counts the exact messages it writes and reads."""

        def __init__(self, config, *, wire: _Wire, **kw):
            super().__init__(config, **kw)
            self.wire = wire

        def _make_client(self, width: int, height: int):
            client = super()._make_client(width, height)
            wire = self.wire
            frame_message, read_loop, connection = client._frame_message, client._read_loop, client._connection

            def counted_frame_message(f):
                msg = frame_message(f)
                wire.add_frame(msg, len(f.packet))
                return msg

            async def counted_read_loop(call):
                return await read_loop(_CountingCall(call, wire))

            async def counted_connection(stop):
                wire.session_headers += 1
                wire.session_header_bytes += pb.EdgeMessage(header=client.session).ByteSize() + GRPC_PREFIX_BYTES
                return await connection(stop)

            client._frame_message = counted_frame_message
            client._read_loop = counted_read_loop
            client._connection = counted_connection
            return client

    return BenchEdgeApp


class _Recorder:
    """A stream's results as the edge receives them."""

    def __init__(self) -> None:
        # (monotonic, latency_ms, decode_ms, analytics_ms, queue_ms, compose_ms)
        self.results: list[tuple[float, float, float, float, float, float]] = []

    def on_result(self, r) -> None:
        lat_ms = (time.time_ns() / 1e3 - r.capture_ts_us) / 1e3
        self.results.append((time.monotonic(), lat_ms, float(r.decode_ms), float(r.analytics_ms), float(r.queue_ms),
                             float(r.compose_ms)))


# ------------------------------------------------------------------------------------ statistics
def _pct(v: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(v, dtype=np.float64), q)) if len(v) else None


def _mean(v: Sequence[float]) -> float | None:
    return float(np.mean(v)) if len(v) else None


def _r(v: float | None, nd: int = 2) -> float | None:
    return None if v is None else round(float(v), nd)


def _wire_summary(wires: Sequence[_Wire], results_total: int) -> tuple[dict[str, Any], dict[str, Any]]:
    frames = sum(w.frames for w in wires)
    pk = sum(w.packet_bytes for w in wires)
    msg = sum(w.message_bytes for w in wires)
    boxes = sum(w.edge_boxes_bytes for w in wires)
    h2 = sum(w.http2_est for w in wires)
    up: dict[str, Any] = {"frames": frames}
    if frames:
        packet = pk / frames
        grpc_msg = msg / frames + GRPC_PREFIX_BYTES
        up.update({
            "packet": _r(packet, 1),
            "grpc_message": _r(grpc_msg, 1),  # EdgeMessage.ByteSize() + 5-byte gRPC prefix
            "overhead": _r(grpc_msg - packet, 2),  # protobuf fields/tags/lengths + gRPC prefix, no HTTP/2
            "overhead_of_which_edge_boxes": _r(boxes / frames, 2),
            "overhead_of_which_grpc_prefix": GRPC_PREFIX_BYTES,
            "http2_data_headers_est": _r(h2 / frames, 2),
            "overhead_incl_http2_est": _r(grpc_msg - packet + h2 / frames, 2),
            "overhead_pct_of_packet": _r(100.0 * (grpc_msg - packet) / packet, 3) if packet else None,
        })
    up["session_header_bytes"] = sum(w.session_header_bytes for w in wires)
    up["session_headers"] = sum(w.session_headers for w in wires)
    count: collections.Counter = collections.Counter()
    byts: collections.Counter = collections.Counter()
    for w in wires:
        count.update(w.down_count)
        byts.update(w.down_bytes)
    down: dict[str, Any] = {"total_bytes": int(sum(byts.values())),
                            "bytes_per_result": _r(sum(byts.values()) / results_total, 1) if results_total else None}
    for kind in ("result", "ack", "error"):
        down[kind] = {"count": int(count[kind]), "mean_bytes": _r(byts[kind] / count[kind], 1) if count[kind] else None,
                      "bytes_per_result": _r(byts[kind] / results_total, 2) if results_total else None}
    down["acks_per_result"] = _r(count["ack"] / results_total, 3) if results_total else None
    return up, down


def _summarise(system: str, n: int, *, recs: Sequence[_Recorder], wires: Sequence[_Wire],
               stats: Sequence[dict | None], errors: Sequence[str | None], camera_ids: Sequence[str],
               t_start: float, t_stop: float, warmup: float, server_counters: dict[str, Any]) -> dict[str, Any]:
    w0 = t_start + warmup
    window = max(1e-9, t_stop - w0)
    per_stream = []
    lat_all: list[float] = []
    dec_all: list[float] = []
    ana_all: list[float] = []
    queue_all: list[float] = []
    comp_all: list[float] = []
    for i, rec in enumerate(recs):
        rs = [r for r in rec.results if w0 <= r[0] <= t_stop]
        lat = [r[1] for r in rs]
        lat_all += lat
        dec_all += [r[2] for r in rs]
        ana_all += [r[3] for r in rs]
        queue_all += [r[4] for r in rs]
        comp_all += [r[5] for r in rs]
        s = stats[i] or {}
        per_stream.append({
            "camera_id": camera_ids[i],
            "results_in_window": len(rs),
            "results_per_s": _r(len(rs) / window, 3),
            "latency_ms_p50": _r(_pct(lat, 50), 1),
            "latency_ms_p99": _r(_pct(lat, 99), 1),
            "results_total": len(rec.results),
            "elapsed_s": s.get("elapsed_s"),
            "frames_captured": s.get("frames_captured"),
            "frames_encoded": s.get("frames_encoded"),
            "frames_sent": s.get("frames_sent"),
            "frames_acked": s.get("frames_acked"),
            "dropped": s.get("dropped"),
            "frame_errors": s.get("frame_errors"),
            "encode_ms_mean": _r(s.get("encode_ms_mean"), 2),
            "ground_ms_mean": _r(s.get("ground_ms_mean"), 2),
            "stage_ms_p50": {k: _r(v, 2) for k, v in (s.get("stage_ms_p50") or {}).items()},
            "rois_per_frame": _r(s.get("rois_per_frame"), 2),
            "bpp": _r(s.get("bpp"), 5),
            "reconnects": s.get("reconnects"),
            "error": errors[i],
        })
    total = len(lat_all)
    up, down = _wire_summary(wires, sum(len(r.results) for r in recs))
    dropped: collections.Counter = collections.Counter()
    frame_errors: collections.Counter = collections.Counter()
    for p in per_stream:
        dropped.update(p["dropped"] or {})
        frame_errors.update(p["frame_errors"] or {})

    def tot(key: str) -> int:
        return int(sum(p[key] or 0 for p in per_stream))

    per_s = [p["results_per_s"] for p in per_stream]
    return {
        "system": system,
        "streams": n,
        "run_s": _r(t_stop - t_start, 2),
        "window_s": _r(window, 2),
        "results_per_s": _r(total / window, 3),
        "results_per_s_per_stream": {"mean": _r(total / window / n, 3), "min": _r(min(per_s), 3),
                                     "max": _r(max(per_s), 3)},
        "latency_ms": {"p50": _r(_pct(lat_all, 50), 1), "p99": _r(_pct(lat_all, 99), 1),
                       "mean": _r(_mean(lat_all), 1), "max": _r(max(lat_all) if lat_all else None, 1),
                       "results": total},
        "cloud_ms_mean": {"decode": _r(_mean(dec_all), 2), "analytics": _r(_mean(ana_all), 2)},
        "stage_ms_p50": {  # per frame; edge stages: the mean over streams of each stream's median
            **{k: _r(_mean([p["stage_ms_p50"][k] for p in per_stream if p["stage_ms_p50"].get(k) is not None]), 2)
               for k in ("capture", "grounding", "encode")},
            "queue": _r(_pct(queue_all, 50), 2), "decode": _r(_pct(dec_all, 50), 2),
            "compose": _r(_pct(comp_all, 50), 2), "analytics": _r(_pct(ana_all, 50), 2)},
        "frames": {"captured": tot("frames_captured"), "encoded": tot("frames_encoded"), "sent": tot("frames_sent"),
                   "results": int(sum(len(r.results) for r in recs)), "dropped": dict(dropped),
                   "frame_errors": dict(frame_errors)},
        "bytes_per_frame": up,
        "downstream": down,
        "server": server_counters,
        "errors": [e for e in errors if e],
        "per_stream": per_stream,
    }


def _compare(by: dict[tuple[str, int], dict[str, Any]], streams: Sequence[int]) -> list[dict[str, Any]]:
    out = []
    for n, system in ((n, s) for n in streams for s in SYSTEMS if s != "jpeg"):
        lc, jp = by.get((system, n)), by.get(("jpeg", n))
        if lc is None or jp is None:
            continue

        def ratio(a, b):
            return _r(a / b, 4) if a is not None and b else None

        lb, jb = lc["bytes_per_frame"], jp["bytes_per_frame"]
        out.append({
            "streams": n,
            "system": system,
            "packet_bytes_ratio_latentcast_over_jpeg": ratio(lb.get("packet"), jb.get("packet")),
            "wire_bytes_ratio_latentcast_over_jpeg": ratio(lb.get("grpc_message"), jb.get("grpc_message")),
            "packet_bytes": {"latentcast": lb.get("packet"), "jpeg": jb.get("packet")},
            "wire_bytes_per_frame": {"latentcast": lb.get("grpc_message"), "jpeg": jb.get("grpc_message")},
            "results_per_s": {"latentcast": lc["results_per_s"], "jpeg": jp["results_per_s"]},
            "results_per_s_ratio_latentcast_over_jpeg": ratio(lc["results_per_s"], jp["results_per_s"]),
            "latency_ms_p50": {"latentcast": lc["latency_ms"]["p50"], "jpeg": jp["latency_ms"]["p50"]},
            "latency_ms_p99": {"latentcast": lc["latency_ms"]["p99"], "jpeg": jp["latency_ms"]["p99"]},
            "downstream_bytes_per_result": {"latentcast": lc["downstream"]["bytes_per_result"],
                                            "jpeg": jp["downstream"]["bytes_per_result"]},
        })
    return out


# ------------------------------------------------------------------------------------ the run
@dataclass
class _Ctx:
    video: str
    pace: float
    seconds: float
    warmup: float
    jpeg_quality: int
    rate_point: int | None
    labels: list[str] | None
    threads: int | None
    bundle: str | None
    codec: Any
    detector: Any  # the cloud's (and the baseline's) detector
    edge_detector: Any  # an override for the edge grounding (tests), else one YOLOX per stream
    task: str | None = None  # ground this task's label list (as `latentcast edge --task`) instead of labels
    task_labels: list[str] | None = None  # that list, loaded once
    tables: str | None = None  # temporal P-frame tables for edge and cloud (None: the codec's shipped ones)
    cloud_threads: int | None = None  # the cloud's torch and detector threads (None: as the edge's, threads)
    workers: int | None = None  # the cloud's worker threads (None: its config's default)
    analysis: str | None = None  # the edges' codec.analysis (None: their config's default)
    rdoq: float | None = None  # the edges' codec.rdoq (None: their config's, unset there: the codec's own)
    render: dict = field(default_factory=dict)  # the cloud's codec.* render settings given (temporal_render, ...)
    temporal: Any = None  # the edges' temporal settings (an edge config's TemporalConfig; None: the defaults)
    edge_pool: list[tuple[Any, Any]] = field(default_factory=list)  # (EdgeEncoder, YOLOX) per stream index
    placement: str = "shared"  # one process for all ("shared"), or the cloud and each edge in its own ("processes")
    weights: str | None = None  # what a cloud process loads: codec weights (None: elic-lite) ...
    synthesis: str | None = None  # ... and its syntheses (None: the cloud config's)
    temporal_synthesis: str | None = None

    def for_child(self) -> _Ctx:
        """The settings an edge process needs, without the loaded models (each process loads its own)."""
        return dataclasses.replace(self, codec=None, detector=None, edge_detector=None, edge_pool=[])


def _cloud_config(token: str, threads: int | None, *, jpeg: bool = False, tables: str | None = None,
                  workers: int | None = None, render: dict | None = None):
    """The loopback cloud of one configuration; ``jpeg`` enables the JPEG baseline codec; ``render``: codec.*
    render settings (temporal_render, render_runtime)."""
    from latentcast.cloud.config import CloudConfig

    cfg = CloudConfig()
    if render:
        cfg.codec = dataclasses.replace(cfg.codec, **render)  # validated as the config file's values are
    if jpeg:
        cfg.pipeline.codecs = ["latentcast", "jpeg"]
    if tables:
        cfg.codec.temporal_tables = str(tables)
    if workers:
        cfg.pipeline.workers = workers
    s = cfg.server
    s.host = s.maintenance_host = s.metrics_host = "127.0.0.1"
    s.port, s.maintenance_port, s.metrics_port = 0, -1, -1
    s.tokens, s.grace_s = [token], 2.0
    if threads:
        cfg.pipeline.torch_threads = threads
        cfg.analytics.threads = threads
    return cfg


def _edge_config(ctx: _Ctx, system: str, camera_id: str, port: int, token: str):
    from latentcast.edge.config import EdgeConfig

    cfg = EdgeConfig(camera_id=camera_id)
    cfg.source.uri, cfg.source.pace, cfg.source.fps, cfg.source.loop = ctx.video, "realtime", float(ctx.pace), True
    if ctx.labels:
        cfg.grounding.labels = list(ctx.labels)
    if ctx.task:
        cfg.grounding.use_task(ctx.task)
    if ctx.bundle:
        cfg.codec.bundle = str(ctx.bundle)
    if ctx.rate_point is not None:
        cfg.codec.rate_point = ctx.rate_point
    if system == "jpeg":
        cfg.codec.rate_point = 0
    if ctx.temporal is not None:
        cfg.temporal = dataclasses.replace(ctx.temporal)
    cfg.temporal.mode = "temporal" if system == "latentcast-temporal" else "frames"
    if system == "latentcast-temporal":
        if ctx.tables:
            cfg.temporal.tables = str(ctx.tables)
    if ctx.analysis:
        cfg.codec.analysis = ctx.analysis
    if ctx.rdoq is not None:
        cfg.codec.rdoq = ctx.rdoq
    if ctx.threads:
        cfg.codec.threads = cfg.grounding.threads = ctx.threads
    s = cfg.server
    s.target, s.token, s.tls = f"127.0.0.1:{port}", token, False
    s.backoff_initial_s, s.backoff_max_s, s.max_reconnect_attempts = 0.1, 1.0, 5  # a dead server ends the run
    return cfg


def _load_edge_parts(ctx: _Ctx, cfg, weights_hash: bytes) -> tuple[Any, Any]:
    """One stream's (EdgeEncoder, grounding detector), loaded from ``cfg``."""
    from latentcast.edge.encoder import EdgeEncoder

    enc = EdgeEncoder(bundle=cfg.codec.bundle or None, threads=cfg.codec.threads, analysis=cfg.codec.analysis,
                      rdoq=cfg.codec.rdoq)
    if enc.weights_hash != weights_hash:
        raise ValueError(f"the edge bundle {enc.bundle} was exported from other weights than the cloud's codec "
                         f"({enc.weights_hash.hex()} vs {weights_hash.hex()}); run `latentcast export edge`")
    if ctx.edge_detector is not None:
        return enc, ctx.edge_detector
    from latentcast.detector import YoloxDetector

    g = cfg.grounding
    return enc, YoloxDetector(model_path=g.model or None, labels_path=g.labels_file or None,
                              score_threshold=g.score_threshold, nms_threshold=g.nms_threshold, threads=g.threads)


def _edge_parts(ctx: _Ctx, cfg, n: int) -> None:
    """Make sure the first ``n`` streams have an encoder and an edge detector (loaded once, reused)."""
    while len(ctx.edge_pool) < n:
        ctx.edge_pool.append(_load_edge_parts(ctx, cfg, ctx.codec.weights_hash))


def _make_edge_app(ctx: _Ctx, system: str, ecfg, parts: tuple[Any, Any] | None, rec: _Recorder, wire: _Wire):
    """One bench edge: the real encoder and grounding (``parts``), or the JPEG baseline's."""
    from latentcast.edge.grounding import Grounder

    if system != "jpeg":
        enc, det = parts
        g = ecfg.grounding
        # a task list names labels the closed-set detector lacks: skipped, as on the edge
        grounder: Any = Grounder(labels=ctx.task_labels or g.labels, detector=det, every=g.every,
                                 max_missed=g.max_missed, margin=g.margin, motion=g.motion,
                                 strict_labels=not ctx.task)
    else:
        enc, grounder = JpegEncoder(ctx.jpeg_quality), NullGrounder(ecfg.grounding.labels)
    return _bench_edge_app_class()(ecfg, wire=wire, on_result=rec.on_result, encoder=enc, grounder=grounder)


# ------------------------------------------------------------------------------------ process placement
# ``placement="processes"``: the cloud in one process and every camera's edge in its own, as deployed (a
# ``latentcast cloud`` service and one ``latentcast edge`` per gateway), still sharing this machine's cores.
# In one process (``"shared"``) the edges and the cloud also share one interpreter lock and one event loop.

def _quiet_logs() -> None:
    """The cloud's and edges' per-session lines at WARNING (bench processes always; this one unless -v)."""
    for name in ("latentcast.cloud", "latentcast.edge"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _cloud_process(ccfg, load: dict[str, Any], conn) -> None:
    """The child process of :class:`_CloudProcess`: load the codec and detector, serve, report counters."""
    _quiet_logs()

    async def main() -> None:
        from latentcast.cloud.server import CloudServer
        from latentcast.tools.demo import _cloud_counters

        try:
            codec, detector = _load_cloud_models(load["weights"], load["synthesis"], load["temporal_synthesis"],
                                                 load["threads"])
            server = CloudServer(ccfg, codec=codec, detector=detector)
            port, _, _ = await server.start()
            await server.wait_ready(timeout=300)
        except Exception as exc:  # reported to the parent, which raises it
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            return
        conn.send(("port", port))
        await asyncio.to_thread(conn.recv)  # "stop"
        counters = _cloud_counters(server)
        await server.stop(grace=1.0)
        conn.send(("counters", counters))

    asyncio.run(main())


def _load_cloud_models(weights: str | None, synthesis: str | None, temporal_synthesis: str | None,
                       threads: int | None) -> tuple[Any, Any]:
    """The cloud's codec (with the cloud config's synthesis defaults) and detector, as ``latentcast cloud``
    loads them."""
    from latentcast.cloud.analytics import make_detector

    if threads:
        import torch

        torch.set_num_threads(threads)
    return (_load_codec(weights, synthesis, temporal_synthesis),
            make_detector(_cloud_config("x", threads).analytics))


def _load_codec(weights: str | None, synthesis: str | None, temporal_synthesis: str | None) -> Any:
    """The cloud's codec by name or path (default elic-lite) with its syntheses (default: the cloud config's)."""
    from latentcast.cloud.config import CodecConfig
    from latentcast.models.codec import LatentCodec

    codec = LatentCodec.load(weights or "elic-lite")
    codec.use_synthesis(synthesis or CodecConfig().synthesis)  # as the cloud's codec.synthesis would
    codec.use_synthesis(temporal_synthesis or CodecConfig().temporal_synthesis, temporal=True)
    return codec


class _CloudProcess:
    """The loopback cloud in a child process (start -> port, counters, stop)."""

    def __init__(self, ccfg, load: dict[str, Any]) -> None:
        import multiprocessing

        mp = multiprocessing.get_context("spawn")
        self._conn, self._child = mp.Pipe()
        self._proc = mp.Process(target=_cloud_process, args=(ccfg, load, self._child), name="bench-cloud",
                                daemon=True)
        self.counters: dict[str, Any] = {}
        self._stopped = False

    async def start(self) -> int:
        self._proc.start()
        self._child.close()  # only the child holds its end: its exit reads as EOF here
        kind, value = await asyncio.to_thread(_recv, self._conn, 600.0, self._proc)
        if kind != "port":
            raise RuntimeError(f"the bench cloud process failed to start: {value}")
        return int(value)

    async def stop(self) -> dict[str, Any]:
        """Ask for the counters and stop; once (later calls return the counters)."""
        if self._stopped or self._proc.pid is None:
            return self.counters
        self._stopped = True
        if self._proc.is_alive():
            try:
                self._conn.send("stop")
                kind, value = await asyncio.to_thread(_recv, self._conn, 60.0, self._proc)
                if kind == "counters":
                    self.counters = value
            except (OSError, EOFError, RuntimeError) as exc:
                log.warning("bench cloud process: no counters (%s)", exc)
        await asyncio.to_thread(self._proc.join, 10.0)
        if self._proc.is_alive():
            self._proc.terminate()
        return self.counters


def _recv(conn, timeout: float, proc) -> Any:
    """The next message on ``conn`` within ``timeout`` s, or RuntimeError (the child died or hung)."""
    if not conn.poll(timeout):
        raise RuntimeError(f"{proc.name}: no message within {timeout:g} s (exit code {proc.exitcode})")
    try:
        return conn.recv()
    except EOFError:
        raise RuntimeError(f"{proc.name} exited (code {proc.exitcode})") from None


def _edge_process(ctx: _Ctx, system: str, ecfg, index: int, n: int, weights_hash: bytes, conn) -> None:
    """The child process of one bench edge: load, say ready, run from "go" to "stop", send what it measured."""
    _quiet_logs()

    async def main() -> None:
        rec, wire = _Recorder(), _Wire()
        try:
            parts = _load_edge_parts(ctx, ecfg, weights_hash) if system != "jpeg" else None
            app = _make_edge_app(ctx, system, ecfg, parts, rec, wire)
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            return
        conn.send(("ready", None))
        await asyncio.to_thread(conn.recv)  # "go"
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def wait_stop() -> None:
            try:
                conn.recv()  # "stop"
            except (EOFError, OSError):  # the parent is gone: stop too
                pass
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=wait_stop, name="bench-edge-stop", daemon=True).start()
        await asyncio.sleep(index / (n * ctx.pace))  # cameras are not in lockstep: spread over one frame period
        error = None
        try:
            stats = await app.run(stop=stop)
        except Exception as exc:
            error, stats = f"{type(exc).__name__}: {exc}", app.stats()
        conn.send(("done", {"results": rec.results, "wire": wire, "error": error,
                            "stats": {k: v for k, v in stats.items() if k != "last_results"}}))

    asyncio.run(main())


async def _run_processes(ctx: _Ctx, system: str, n: int, ccfg, camera_ids: list[str], token: str,
                         progress: Callable[[str], None]):
    """One configuration with the cloud and each edge in its own process; returns what _summarise needs."""
    import multiprocessing
    from multiprocessing.connection import wait as mp_wait

    cloud = _CloudProcess(ccfg, {"weights": ctx.weights, "synthesis": ctx.synthesis,
                                 "temporal_synthesis": ctx.temporal_synthesis, "threads": ctx.cloud_threads})
    mp = multiprocessing.get_context("spawn")
    edges = []
    try:
        port = await cloud.start()
        for i in range(n):
            ecfg = _edge_config(ctx, system, camera_ids[i], port, token)
            conn, child = mp.Pipe()
            proc = mp.Process(target=_edge_process, args=(ctx.for_child(), system, ecfg, i, n,
                                                          ctx.codec.weights_hash, child),
                              name=f"bench-edge-{i}", daemon=True)
            proc.start()
            child.close()  # only the child holds its end: its exit reads as EOF here (the window ends early)
            edges.append((proc, conn))
        for proc, conn in edges:
            kind, value = await asyncio.to_thread(_recv, conn, 600.0, proc)
            if kind != "ready":
                raise RuntimeError(f"{proc.name} failed to start: {value}")
        progress(f"[{system} x{n}] streaming for {ctx.seconds:g} s ({n} edge processes, 1 cloud process) ...")
        t_start = time.monotonic()
        for _, conn in edges:
            conn.send("go")
        # the window ends after --seconds, or early when an edge stops on its own (an error)
        early = await asyncio.to_thread(mp_wait, [c for _, c in edges], ctx.seconds)
        t_stop = time.monotonic()
        for _, conn in edges:
            if conn not in early:
                try:
                    conn.send("stop")
                except OSError:  # it died meanwhile: reported below
                    pass
        payloads: dict[int, Any] = {}
        for i, (proc, conn) in enumerate(edges):
            try:
                payloads[i] = await asyncio.to_thread(_recv, conn, 1.0 if conn in early else _RUN_TIMEOUT_PAD_S,
                                                      proc)
            except RuntimeError as exc:  # the edge process died or hung: its stream reports the error
                payloads[i] = ("done", {"results": [], "wire": _Wire(), "stats": None, "error": str(exc)})
        counters = await cloud.stop()
    finally:
        for proc, _ in edges:
            proc.join(5.0)
            if proc.is_alive():
                proc.terminate()
        await cloud.stop()
    recs, wires, stats, errors = [], [], [], []
    for i in range(n):
        _, p = payloads[i]
        rec = _Recorder()
        rec.results = list(p["results"])
        recs.append(rec)
        wires.append(p["wire"])
        stats.append(p["stats"] or {})
        errors.append(p["error"])
    return recs, wires, stats, errors, t_start, t_stop, counters


async def _run_config(ctx: _Ctx, system: str, n: int, progress: Callable[[str], None]) -> dict[str, Any]:
    from latentcast.cloud.server import CloudServer
    from latentcast.tools.demo import _cloud_counters

    token = secrets.token_hex(16)
    ccfg = _cloud_config(token, ctx.cloud_threads, jpeg=system == "jpeg", tables=ctx.tables, workers=ctx.workers,
                         render=ctx.render)
    camera_ids = [f"bench-{system}-n{n}-{i}" for i in range(n)]
    if ctx.placement == "processes":
        recs, wires, stats, errors, t_start, t_stop, counters = await _run_processes(
            ctx, system, n, ccfg, camera_ids, token, progress)
        return _finish_row(ctx, system, n, recs=recs, wires=wires, stats=stats, errors=errors,
                           camera_ids=camera_ids, t_start=t_start, t_stop=t_stop, counters=counters,
                           progress=progress)
    server = CloudServer(ccfg, codec=ctx.codec, detector=ctx.detector)
    port, _, _ = await server.start()
    await server.wait_ready(timeout=300)
    recs = [_Recorder() for _ in range(n)]
    wires = [_Wire() for _ in range(n)]
    apps = []
    for i in range(n):
        ecfg = _edge_config(ctx, system, camera_ids[i], port, token)
        parts = None
        if system != "jpeg":
            await asyncio.to_thread(_edge_parts, ctx, ecfg, i + 1)
            parts = ctx.edge_pool[i]
        apps.append(_make_edge_app(ctx, system, ecfg, parts, recs[i], wires[i]))

    stop = asyncio.Event()

    async def run_one(i: int, app) -> dict:
        await asyncio.sleep(i / (n * ctx.pace))  # cameras are not in lockstep: spread over one frame period
        return await app.run(stop=stop)

    progress(f"[{system} x{n}] streaming for {ctx.seconds:g} s ...")
    t_start = time.monotonic()
    tasks = [asyncio.create_task(run_one(i, a), name=f"bench-{camera_ids[i]}") for i, a in enumerate(apps)]
    stats: list[dict | None] = [None] * n
    errors: list[str | None] = [None] * n
    try:
        await asyncio.wait(tasks, timeout=ctx.seconds, return_when=asyncio.FIRST_EXCEPTION)
        t_stop = time.monotonic()
        stop.set()
        _, pending = await asyncio.wait(tasks, timeout=_RUN_TIMEOUT_PAD_S)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for i, t in enumerate(tasks):
            if t.cancelled():
                errors[i] = "did not stop in time (cancelled)"
            elif t.exception() is not None:
                errors[i] = f"{type(t.exception()).__name__}: {t.exception()}"
            else:
                stats[i] = {k: v for k, v in t.result().items() if k != "last_results"}
            if stats[i] is None:
                stats[i] = {k: v for k, v in apps[i].stats().items() if k != "last_results"}
        counters = _cloud_counters(server)
    finally:
        stop.set()
        await server.stop(grace=1.0)
    return _finish_row(ctx, system, n, recs=recs, wires=wires, stats=stats, errors=errors, camera_ids=camera_ids,
                       t_start=t_start, t_stop=t_stop, counters=counters, progress=progress)


def _finish_row(ctx: _Ctx, system: str, n: int, *, recs, wires, stats, errors, camera_ids, t_start: float,
                t_stop: float, counters: dict[str, Any], progress: Callable[[str], None]) -> dict[str, Any]:
    row = _summarise(system, n, recs=recs, wires=wires, stats=stats, errors=errors, camera_ids=camera_ids,
                     t_start=t_start, t_stop=t_stop, warmup=ctx.warmup, server_counters=counters)
    row["placement"] = ctx.placement
    b = row["bytes_per_frame"]
    progress(f"[{system} x{n}] {row['results_per_s']:.2f} results/s ({row['results_per_s_per_stream']['mean']:.2f} "
             f"per stream), latency p50 {row['latency_ms']['p50']} ms p99 {row['latency_ms']['p99']} ms, "
             f"{b.get('packet')} B/frame + {b.get('overhead')} B overhead, dropped {row['frames']['dropped']}"
             + (f", errors {row['errors']}" if row["errors"] else ""))
    return row


async def run_bench(*, streams: Sequence[int] = (1, 4, 16), seconds: float = 20.0, warmup: float = 2.0,
                    pace: float = 10.0, systems: Sequence[str] = SYSTEMS, jpeg_quality: int = 75,
                    video: str | None = None, rate_point: int | None = None, labels: Sequence[str] | None = None,
                    task: str | None = None, threads: int | None = None, weights: str | None = None,
                    bundle: str | os.PathLike | None = None, tables: str | os.PathLike | None = None,
                    cloud_threads: int | None = None, workers: int | None = None, synthesis: str | None = None,
                    temporal_synthesis: str | None = None, codec: Any = None, detector: Any = None,
                    edge_detector: Any = None, analysis: str | None = None, rdoq: float | None = None,
                    render: dict | None = None,
                    temporal: Any = None, placement: str = "shared",
                    out: str | os.PathLike | None = None, command: str = "latentcast bench stream",
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every (system, N) configuration; returns the result (also written to ``out`` + ``.md``).

    ``codec`` (a LatentCodec), ``bundle`` (its edge bundle) and ``detector`` (cloud and baseline
    analytics; also the edge grounding's unless ``edge_detector`` is given) override the shipped
    ``elic-lite`` and YOLOX-nano (tests inject tiny ones). ``placement``: ``"shared"`` runs the cloud and
    every edge in this process (one interpreter lock, one event loop); ``"processes"`` runs the cloud in one
    child process and each edge in its own, as they are deployed, each loading its models by name (so
    nothing can be injected)."""
    from latentcast.tools.provenance import commit as _commit
    from latentcast.tools.provenance import machine as _machine
    from latentcast.tools.provenance import write_results

    progress = progress or (lambda s: print(s, flush=True))
    streams = [int(s) for s in streams]
    if not streams or any(s < 1 for s in streams):
        raise ValueError(f"streams {streams!r} must be integers >= 1")
    systems = list(systems)
    if not systems or any(s not in SYSTEMS for s in systems):
        raise ValueError(f"systems {systems!r} must be among {', '.join(SYSTEMS)}")
    if not seconds > 0 or not 0 <= warmup < seconds:
        raise ValueError(f"need seconds > 0 and 0 <= warmup < seconds (got {seconds}, {warmup})")
    if not 0 < pace <= 100:
        raise ValueError(f"pace {pace!r} must be in (0, 100] frames per second")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality {jpeg_quality!r} out of range 1..100")
    if threads is not None and threads < 0:
        raise ValueError(f"threads {threads!r} must be >= 0 (0 = the libraries' defaults)")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r} must be one of {', '.join(PLACEMENTS)}")
    if placement == "processes" and any(x is not None for x in (codec, detector, edge_detector)):
        raise ValueError("placement 'processes' loads the models by name in each process: codec, detector and "
                         "edge_detector objects cannot be passed (use placement 'shared')")
    cloud_threads = threads if cloud_threads is None else cloud_threads
    from latentcast.shared import portable_path, shared_path

    if video is None:
        video = str(shared_path("data", "video", "vtest.avi"))
    if not Path(video).is_file():
        raise FileNotFoundError(f"video {video} not found")
    if cloud_threads:
        import torch

        torch.set_num_threads(cloud_threads)
    t0 = time.monotonic()
    load_before = os.getloadavg()
    if edge_detector is None and detector is not None:
        edge_detector = detector  # an injected cloud detector is also the edge's (tests); else YOLOX per stream
    if codec is None:
        codec = await asyncio.to_thread(_load_codec, weights, synthesis, temporal_synthesis)
    if detector is None:
        from latentcast.cloud.analytics import make_detector

        detector = await asyncio.to_thread(make_detector, _cloud_config("x", cloud_threads).analytics)
    if task and labels:
        raise ValueError("give either labels or a task, not both (a task's label list replaces the labels)")
    task_labels = None
    if task:
        from latentcast.edge.tasks import check_task_name, load_task

        task_labels = list(load_task(check_task_name(task)).labels)  # an unknown task fails before anything starts
    ctx = _Ctx(video=str(video), pace=float(pace), seconds=float(seconds), warmup=float(warmup),
               jpeg_quality=int(jpeg_quality), rate_point=rate_point, labels=list(labels) if labels else None,
               threads=threads, bundle=str(bundle) if bundle else None, codec=codec, detector=detector,
               edge_detector=edge_detector, task=task, task_labels=task_labels,
               tables=str(tables) if tables else None,
               cloud_threads=cloud_threads, workers=workers, analysis=analysis, rdoq=rdoq, render=dict(render or {}),
               temporal=temporal, placement=placement, weights=weights, synthesis=synthesis,
               temporal_synthesis=temporal_synthesis)
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for n in streams:
        for system in systems:
            rows[(system, n)] = await _run_config(ctx, system, n, progress)
    ecfg = _edge_config(ctx, "latentcast-temporal", "x", 0, "x")  # the edges' settings (temporal: its own too)
    from latentcast.models.synthesis_runtime import resolve_render_runtime

    ccfg = _cloud_config("x", ctx.cloud_threads, workers=workers, render=ctx.render)
    result = {
        "command": command,
        "commit": _commit(),
        "machine": _machine() | {"loadavg_before": [round(v, 2) for v in load_before],
                                 "loadavg_after": [round(v, 2) for v in os.getloadavg()]},
        "duration_s": round(time.monotonic() - t0, 1),
        "options": {"streams": streams, "systems": systems, "placement": placement, "seconds": seconds,
                    "warmup_s": warmup,
                    "pace_fps": pace, "jpeg_quality": jpeg_quality, "threads": threads,
                    "cloud_threads": ctx.cloud_threads, "workers": workers, "video": portable_path(video),
                    "weights": weights, "bundle": ctx.bundle, "tables": ctx.tables,
                    "synthesis": getattr(codec, "synthesis_name", "") or "the codec's own",
                    "temporal_synthesis": _temporal_synthesis_label(codec), "analysis": ecfg.codec.analysis,
                    "rdoq": codec.rdoq if ecfg.codec.rdoq is None else ecfg.codec.rdoq,  # unset: the codec's own
                    "temporal_render": ccfg.codec.temporal_render,
                    "render_runtime": resolve_render_runtime(ccfg.codec.render_runtime),
                    "cloud_workers": ccfg.pipeline.worker_count,
                    "edge_temporal": dataclasses.asdict(ecfg.temporal)},
        "setup": {
            "codec": {"name": getattr(codec, "codec_name", "?"), "weights_hash": codec.weights_hash.hex(),
                      "latent_space": getattr(codec, "latent_space_spec", None)},
            "cloud_detector": type(getattr(detector, "inner", detector)).__name__,
            "edge_grounding": ("injected " + type(ctx.edge_detector).__name__) if ctx.edge_detector is not None
            else "YOLOX-nano per stream",
            "edge": {"task": task, "labels": ecfg.grounding.labels if not task else f"the {task!r} task list",
                     "every": ecfg.grounding.every,
                     "rate_point": ecfg.codec.rate_point, "roi_only": ecfg.codec.roi_only,
                     "queue_size": ecfg.sender.queue_size,
                     "policy": ecfg.sender.policy, "frame_queue": ecfg.source.frame_queue,
                     "encoder_threads": ecfg.codec.threads, "grounding_threads": ecfg.grounding.threads},
            "cloud": {"workers": ccfg.pipeline.worker_count, "max_batch": ccfg.pipeline.max_batch,
                      "max_queued_per_session": ccfg.pipeline.max_queued_per_session,
                      "max_queued_total": ccfg.pipeline.max_queued_total, "drop_policy": ccfg.pipeline.drop_policy,
                      "backpressure": ccfg.pipeline.backpressure, "torch_threads": ccfg.pipeline.torch_threads,
                      "analytics_threads": ccfg.analytics.threads, "ack_every_frames": ccfg.server.ack_every_frames,
                      "ack_interval_ms": ccfg.server.ack_interval_ms},
            "jpeg_baseline": "EdgeApp with cv2.imencode(quality) of the whole frame, no grounding -> the same "
                             "CloudServer with its JPEG codec enabled (pipeline.codecs latentcast, jpeg): "
                             "cv2.imdecode in the decode stage, then the same detector object, worker pool, "
                             "per-stream backpressure, queue bounds, drop policy and ack rule",
        },
        "definitions": {
            "results_per_s": "FrameAnalytics received by the edges within the window [start + warmup, stop], "
                             "divided by its length",
            "latency_ms": "edge receive time (on_result) minus FrameAnalytics.capture_ts_us, results in the window",
            "frames": "edge counters over the whole run (captured at --pace, encoded, sent, dropped by reason)",
            "bytes_per_frame.frames": "EdgeMessages the EdgeClient built to write (frames_sent, plus at most one per "
                                      "stream whose write the stop cut short)",
            "bytes_per_frame.packet": "mean codec packet (or JPEG) bytes of the frames written to the stream",
            "bytes_per_frame.grpc_message": "EdgeMessage(frame=FramePacket(...)).ByteSize() of the message written, "
                                            "+ 5 bytes gRPC length prefix",
            "bytes_per_frame.overhead": "grpc_message - packet (protobuf fields incl. edge_boxes, tags, lengths, "
                                        "gRPC prefix). HTTP/2 frame headers NOT included",
            "bytes_per_frame.http2_data_headers_est": "9 bytes per started 16384 bytes of the prefixed message "
                                                      "(HTTP/2 default max frame size, one message per DATA frame); "
                                                      "an estimate, not counted in overhead",
            "downstream": "CloudMessages read by the edge after SessionAccepted (acks, results, errors), "
                          "ByteSize() + 5 each; bytes_per_result = all of them / results received",
            "not_counted": "HPACK headers (once per RPC), SessionAccepted, HTTP/2 control frames, TCP/IP",
            "shared_machine": "edge and cloud run in one process on one machine (one asyncio loop): the latentcast "
                              "edge's grounding and encoding compete with the cloud for the same cores",
        },
        "results": list(rows.values()),
        "comparison": _compare(rows, streams),
    }
    if out is not None:
        write_results(out, result, markdown(result))
    return result


_PLACEMENT_TEXT = {"processes": "the cloud in one process and each edge in its own, as deployed",
                   "shared": "the cloud and every edge in one process"}


def _f(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _temporal_synthesis_label(codec: Any) -> str:
    name = getattr(codec, "temporal_synthesis_name", None)  # None: temporal streams render as frames do
    name = getattr(codec, "synthesis_name", "") if name is None else name
    return name or "the codec's own"


def markdown(result: dict[str, Any]) -> str:
    """The benchmark as markdown tables."""
    o = result["options"]
    m = result["machine"]
    title = (f"Streaming benchmark, commit {result['commit'][:10]}, {m.get('cpu', '?')} ({m.get('cpus')} CPUs, "
             f"load {m.get('loadavg_before')}); {o['seconds']:g} s per configuration (first {o['warmup_s']:g} s not "
             f"counted), {o['pace_fps']:g} fps per camera, codec {result['setup']['codec']['name']} "
             f"(synthesis: {o.get('synthesis') or 'own'}; temporal streams: "
             f"{o.get('temporal_synthesis') or o.get('synthesis') or 'own'}; render: "
             f"{o.get('temporal_render', 'changed')} cells on {o.get('render_runtime', 'onnx')}), edge g_a in "
             f"{o.get('analysis') or 'float32'}, {o.get('cloud_workers', 1)} cloud worker(s), JPEG quality "
             f"{o['jpeg_quality']}; placement: {_PLACEMENT_TEXT.get(o.get('placement', 'shared'))}.")
    cols = ["system", "streams", "results/s", "per stream", "latency p50 ms", "p99 ms", "packet B/frame",
            "overhead B/frame", "+ HTTP/2 est.", "downstream B/result", "captured", "sent", "dropped",
            "cloud decode / analytics ms"]
    lines = [title, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["results"]:
        b, d, fr = r["bytes_per_frame"], r["downstream"], r["frames"]
        drop = ", ".join(f"{k} {v}" for k, v in sorted(fr["dropped"].items()) if v) or "0"
        errs = sum(fr["frame_errors"].values()) if fr["frame_errors"] else 0
        if errs:
            drop += f"; frame errors {errs}"
        lines.append(
            f"| {r['system']} | {r['streams']} | {_f(r['results_per_s'], '.2f')} | "
            f"{_f(r['results_per_s_per_stream']['mean'], '.2f')} | {_f(r['latency_ms']['p50'], '.0f')} | "
            f"{_f(r['latency_ms']['p99'], '.0f')} | {_f(b.get('packet'), '.0f')} | {_f(b.get('overhead'), '.1f')} | "
            f"{_f(b.get('http2_data_headers_est'), '.1f')} | {_f(d['bytes_per_result'], '.1f')} | {fr['captured']} | "
            f"{fr['sent']} | {drop} | {_f(r['cloud_ms_mean']['decode'], '.1f')} / "
            f"{_f(r['cloud_ms_mean']['analytics'], '.1f')} |")
    if result["comparison"]:
        cols = ["system", "streams", "packet bytes latentcast/JPEG", "wire bytes latentcast/JPEG",
                "results/s latentcast vs JPEG", "latency p50 ms latentcast vs JPEG", "p99 ms latentcast vs JPEG"]
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for c in result["comparison"]:
            lines.append(
                f"| {c.get('system', 'latentcast')} | {c['streams']} | "
                f"{_f(c['packet_bytes_ratio_latentcast_over_jpeg'], '.3f')} | "
                f"{_f(c['wire_bytes_ratio_latentcast_over_jpeg'], '.3f')} | "
                f"{_f(c['results_per_s']['latentcast'], '.2f')} vs {_f(c['results_per_s']['jpeg'], '.2f')} | "
                f"{_f(c['latency_ms_p50']['latentcast'], '.0f')} vs {_f(c['latency_ms_p50']['jpeg'], '.0f')} | "
                f"{_f(c['latency_ms_p99']['latentcast'], '.0f')} vs {_f(c['latency_ms_p99']['jpeg'], '.0f')} |")
    stages = ("capture", "grounding", "encode", "queue", "decode", "compose", "analytics")
    lines += ["", "Per-stage medians per frame, ms (edge: capture = reading and converting a frame, grounding, "
              "encode; cloud: queue = waiting for a worker, decode, compose, analytics):", "",
              "| system | streams | " + " | ".join(stages) + " |", "|" + "---|" * (len(stages) + 2)]
    for r in result["results"]:
        st = r.get("stage_ms_p50") or {}
        lines.append(f"| {r['system']} | {r['streams']} | " + " | ".join(_f(st.get(k), ".1f") for k in stages) + " |")
    lines += ["", ("Overhead = protobuf EdgeMessage bytes beyond the packet + 5-byte gRPC prefix; HTTP/2 DATA "
                   "frame headers (9 B each) are not in it (estimate in its own column). Edge and cloud share the "
                   "machine.")]
    return "\n".join(lines) + "\n"


def _int_list(text: str) -> list[int]:
    try:
        v = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--streams {text!r}: expected comma-separated integers, e.g. 1,4,16") from None
    if not v:
        raise ValueError(f"--streams {text!r} is empty")
    return v


def main(args) -> int:
    from latentcast.tools.options import temporal_settings

    if not getattr(args, "verbose", False):  # one line per session start/end x 16 streams drowns the progress
        _quiet_logs()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    labels = [t.strip() for t in args.labels.split(",") if t.strip()] if args.labels else None
    result = asyncio.run(run_bench(
        streams=_int_list(args.streams), seconds=args.seconds, warmup=args.warmup, pace=args.pace, systems=systems,
        jpeg_quality=args.jpeg_quality, video=args.video, rate_point=args.rate, labels=labels,
        task=getattr(args, "task", None), threads=args.threads,
        weights=args.weights, bundle=args.bundle, tables=getattr(args, "tables", None),
        cloud_threads=getattr(args, "cloud_threads", None), workers=getattr(args, "workers", None),
        synthesis=getattr(args, "synthesis", None), temporal_synthesis=getattr(args, "temporal_synthesis", None),
        analysis=getattr(args, "analysis", None), rdoq=getattr(args, "rdoq", None),
        temporal=temporal_settings(args.edge_config) if getattr(args, "edge_config", None) else None,
        render={k: getattr(args, k) for k in ("temporal_render", "render_runtime") if getattr(args, k, None)},
        placement=getattr(args, "placement", "shared"), out=args.out,
        command=" ".join(["latentcast"] + sys.argv[1:])))
    print()
    print(markdown(result), end="")
    from latentcast.tools.provenance import results_path

    out = results_path(args.out)
    print(f"wrote {out} and {out.with_suffix('.md')} in {result['duration_s']:.0f} s")
    return 0
