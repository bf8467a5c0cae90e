"""The edge service: capture → grounding → encoding → send queue → gRPC stream.

::

    FrameSource (capture thread) ─► frame mailbox (``source.frame_queue``; live sources and
    realtime pacing drop the oldest waiting frame when the encoder is busy, ``pace: none`` waits)
    ─► Grounder + EdgeEncoder.compress (one worker thread, never on the event loop)
    ─► OutFrame(seq) ─► SendQueue (drop policy) ─► EdgeClient (backlog, acks, resume)

Sequence numbers count encoded frames from 0 for this process (the cloud resumes by them).
:meth:`EdgeApp.run` ends at ``max_frames`` captured frames, at the end of a non-looping file,
or when ``stop`` is set; at a natural end it waits up to ``sender.drain_timeout_s`` for the
cloud to acknowledge every frame sent.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import latentcast
from latentcast.edge.capture import CapturedFrame, FrameSource
from latentcast.edge.client import EdgeClient, FatalStreamError, GaveUpError, TlsConfig
from latentcast.edge.config import EdgeConfig
from latentcast.edge.grounding import Grounder, Grounding
from latentcast.edge.sender import Backlog, OutFrame, SendQueue
from latentcast.edge.tasks import TaskList, load_task
from latentcast.proto import latentcast_v1_pb2 as pb
from latentcast.proto.entropy import UncodableSymbols
from latentcast.proto.ids import label_set_hash

log = logging.getLogger(__name__)

__all__ = ["EdgeApp"]

_RECENT_RESULTS = 8  # results kept for stats()


def _box_dict(b: pb.Box) -> dict[str, Any]:
    return {"label": b.label, "label_id": b.label_id, "score": round(b.score, 3),
            "box": [round(b.x0, 1), round(b.y0, 1), round(b.x1, 1), round(b.y1, 1)]}



def _median(values) -> float | None:
    return float(np.median(np.fromiter(values, dtype=np.float64))) if len(values) else None

class EdgeApp:
    """One camera's edge pipeline. Components may be injected (tests, custom sources)."""

    def __init__(self, config: EdgeConfig, *, on_result: Callable[[pb.FrameAnalytics], None] | None = None,
                 on_frame: Callable[[OutFrame, np.ndarray, Grounding], None] | None = None,
                 source: FrameSource | None = None, grounder: Grounder | None = None, encoder: Any = None):
        """``on_result`` gets every cloud result; ``on_frame`` every encoded frame with the original
        RGB frame and its grounding (on the event loop: keep it cheap; the demo keeps originals)."""
        if not isinstance(config, EdgeConfig):
            raise ValueError(f"config must be an EdgeConfig, got {type(config).__name__}")
        self.config = config
        self.on_result = on_result
        self.on_frame = on_frame
        self._source, self._grounder, self._encoder = source, grounder, encoder
        sc = config.sender
        self.queue = SendQueue(maxsize=sc.queue_size, policy=sc.policy)
        self.backlog = Backlog(max_frames=sc.backlog_frames, max_bytes=sc.backlog_bytes)
        self.client: EdgeClient | None = None
        self.task_list: TaskList | None = None  # with grounding.labels_from_task: the resolved task list
        if config.grounding.labels_from_task:
            self.task_list = load_task(config.grounding.task)
            self.labels = list(self.task_list.labels)
            log.info("task %r: %d labels from %s (%s, label set hash %s)", self.task_list.name, len(self.labels),
                     self.task_list.path, self.task_list.source.model, self.task_list.hash)
        else:
            self.labels = list(config.grounding.labels)
        self._label_hash = label_set_hash(self.labels)
        self.frame_size: tuple[int, int] | None = None
        self._next_seq = 0
        # this process's identity: the cloud resumes the camera's sequence state only for the same instance
        # (a restarted edge numbers its frames from 0 again and starts the camera's state afresh)
        self.instance_id = uuid.uuid4().hex
        self._t_start: float | None = None
        self._t_end: float | None = None
        self.frames_captured = 0
        self.frames_encoded = 0
        self.dropped_encoder_busy = 0
        self.dropped_uncodable = 0
        self._uncodable_logged = float("-inf")
        self.dropped_queue_full_new = 0  # refused by drop-newest (also in the queue's dropped_by_policy)
        self.dropped_queue_full_temporal = 0  # temporal: not encoded because the send queue was full
        self.bytes_encoded = 0
        self.rois_total = 0
        self.detector_runs = 0
        self._ground_ms = 0.0
        self._encode_ms = 0.0
        self._latency_ms: collections.deque[float] = collections.deque(maxlen=100)
        self._stage_ms = {"grounding": collections.deque(maxlen=1000), "encode": collections.deque(maxlen=1000)}
        self.recent_results: collections.deque[dict[str, Any]] = collections.deque(maxlen=_RECENT_RESULTS)
        self.error: BaseException | None = None
        self.temporal = None  # the TemporalEncoder in temporal mode
        self.mode: str | None = None  # "temporal" or "frames", once built (temporal.mode auto picks one)
        self.frame_rate = None  # independent frames with codec.target_kbps: RateController over background_ladder
        self.refresh_requests = 0  # keyframes the cloud asked for (a reference it lacks)
        self.refresh_ignored = 0  # requests about frames older than a keyframe already sent
        self._keys_sent = 0
        self._last_key_seq: int | None = None

    # ------------------------------------------------------------------ building

    def _build(self) -> None:
        """Create the source, detector/grounder and encoder (blocking: runs in a worker thread)."""
        cfg = self.config
        if self._source is None:
            s = cfg.source
            self._source = FrameSource(source=s.uri, pace=s.pace, fps=s.fps or None, loop=s.loop,
                                       resize=tuple(s.resize) if s.resize else None,
                                       reconnect_attempts=s.reconnect_attempts,
                                       backoff_initial_s=s.backoff_initial_s, backoff_max_s=s.backoff_max_s)
        if self._encoder is None:
            from latentcast.edge.encoder import EdgeEncoder

            self._encoder = EdgeEncoder(bundle=cfg.codec.bundle or None, threads=cfg.codec.threads,
                                        analysis=cfg.codec.analysis, rdoq=cfg.codec.rdoq)
        n_rates = int(self._encoder.n_rates)
        if not 0 <= cfg.codec.rate_point < n_rates:
            raise ValueError(f"codec.rate_point {cfg.codec.rate_point} out of range 0..{n_rates - 1} for this bundle")
        c = cfg.codec
        if c.background_level is not None and c.background_level >= n_rates:
            raise ValueError(f"codec.background {c.background_level} out of range 0..{n_rates - 1} for this bundle")
        if self.temporal is None and cfg.temporal.mode != "frames" and self.mode is None:
            self.temporal = self._temporal_encoder()
        self.mode = "temporal" if self.temporal is not None else "frames"
        if c.target_kbps > 0 and self.temporal is None and self.frame_rate is None:
            from latentcast.edge.rate_control import RateController, background_ladder

            ladder = background_ladder(c.rate_point, c.background_level if c.roi_only else None)
            self.frame_rate = RateController(target_kbps=c.target_kbps, fps=float(self._source.fps or 10.0), level=0,
                                             levels=ladder)
            log.info("rate control: %.0f kbit/s over levels (rate point, background) %s", c.target_kbps, ladder)
        if self._grounder is None:
            g = cfg.grounding
            if g.backend == "open-vocab":
                det = self._open_vocab_detector()
                strict = True  # the bundle grounds exactly the task's labels
            else:
                from latentcast.detector import YoloxDetector

                det = YoloxDetector(model_path=g.model or None, labels_path=g.labels_file or None,
                                    score_threshold=g.score_threshold, nms_threshold=g.nms_threshold,
                                    threads=g.threads)
                # a task list names far more labels than a closed-set detector knows: skip those (logged once)
                strict = self.task_list is None
            self._grounder = Grounder(labels=self.labels, detector=det, every=g.every, max_missed=g.max_missed,
                                      margin=g.margin, motion=g.motion, strict_labels=strict)
        elif list(self._grounder.labels) != self.labels:
            what = f"task list {self.task_list.name!r}" if self.task_list is not None else "grounding.labels"
            raise ValueError(f"the grounder's labels {self._grounder.labels!r} differ from the {what} "
                             f"{self.labels!r}")

    def _open_vocab_detector(self):
        """The exported Grounding DINO bundle; its label list must be the task's (same label-set hash)."""
        from latentcast.edge.open_vocab import OpenVocabDetector

        g = self.config.grounding
        det = OpenVocabDetector(bundle=g.bundle, box_threshold=g.box_threshold or None,
                                text_threshold=g.text_threshold or None, nms_threshold=g.nms_threshold,
                                threads=g.threads, provider=g.provider)
        if label_set_hash(det.labels) != self._label_hash:
            what = f"the task list {self.task_list.name!r}" if self.task_list is not None else "grounding.labels"
            raise ValueError(
                f"grounding bundle {g.bundle} was exported for {len(det.labels)} labels (label set hash "
                f"{label_set_hash(det.labels).hex()}), not for {what} ({len(self.labels)} labels, hash "
                f"{self._label_hash.hex()}); export it for these labels: latentcast export grounding --labels "
                f"{self.task_list.name if self.task_list is not None else ','.join(self.labels)} --out {g.bundle}")
        return det

    def _session(self, width: int, height: int) -> pb.SessionHeader:
        enc = self._encoder
        return pb.SessionHeader(camera_id=self.config.camera_id, task=self.config.grounding.task, labels=self.labels,
                                codec_id=int(enc.manifest["codec_id"]), weights_hash=bytes(enc.weights_hash),
                                width=width, height=height, fps=float(self._source.fps),
                                edge_version=latentcast.__version__, instance_id=self.instance_id)

    def _make_client(self, width: int, height: int) -> EdgeClient:
        s = self.config.server
        tls = None
        if s.tls or s.tls_root_certs or s.tls_client_cert:
            tls = TlsConfig(root_certs=s.tls_root_certs or None, client_cert=s.tls_client_cert or None,
                            client_key=s.tls_client_key or None, server_name=s.tls_server_name or None)
        return EdgeClient(target=s.target, session=self._session(width, height), queue=self.queue,
                          backlog=self.backlog, token=s.resolved_token(), tls=tls, keepalive_s=s.keepalive_s,
                          keepalive_timeout_s=s.keepalive_timeout_s, max_message_bytes=s.max_message_bytes,
                          backoff_initial_s=s.backoff_initial_s, backoff_max_s=s.backoff_max_s,
                          backoff_jitter=s.backoff_jitter,
                          max_reconnect_attempts=s.max_reconnect_attempts or None,
                          accept_timeout_s=s.accept_timeout_s, already_exists_retry_s=s.already_exists_retry_s,
                          max_unknown_retries=s.max_unknown_retries, on_result=self._on_result,
                          max_in_flight=self.config.sender.max_in_flight, on_refresh=self._on_refresh,
                          fronts=list(s.fronts) or None)

    def _on_refresh(self, r: pb.RefreshRequest) -> None:
        """The cloud lacks a reference: the next packet is a keyframe (on the event loop; the encoder
        thread picks the flag up before its next frame)."""
        self.refresh_requests += 1
        if self._last_key_seq is not None and self._last_key_seq > r.seq:
            self.refresh_ignored += 1  # a keyframe newer than the refused frame is already on its way
        elif self.temporal is not None:
            self.temporal.request_refresh()
        else:
            log.warning("the cloud asked for a keyframe (seq %d: %s) but temporal coding is off", r.seq, r.reason)

    def _temporal_encoder(self):
        """The TemporalEncoder of ``temporal.mode`` temporal, or auto when the bundle has P-frame tables for
        its weights (else None: independent frames, and the log says why)."""
        from latentcast.edge.temporal import TemporalEncoder, tables_path
        from latentcast.proto.temporal import TemporalTables

        t = self.config.temporal
        auto = t.mode == "auto"
        path = tables_path(t, Path(getattr(self._encoder, "bundle", "")))
        if auto and not path.is_file():
            log.info("mode: independent frames (temporal.mode auto: the bundle has no P-frame tables at %s)", path)
            return None
        try:
            tables = TemporalTables.load(path, weights_hash=self._encoder.weights_hash)
        except ValueError as exc:  # tables of other weights
            if not auto:
                raise
            log.warning("mode: independent frames (temporal.mode auto: %s)", exc)
            return None
        enc = TemporalEncoder(compressor=self._encoder, tables=tables, config=t, fps=float(self._source.fps or 10.0))
        log.info("mode: temporal coding (%s): keyframes at rate point %d every %.0f s, ROI cells at %s, tables %s",
                 "temporal.mode auto, the mode of a fixed camera; temporal.mode frames codes every frame on its own"
                 if auto else "temporal.mode temporal", t.key_rate_point, t.refresh_s,
                 f"{t.target_kbps} kbit/s (rate control)" if t.target_kbps else f"rate point {t.rate_point}", path)
        return enc

    # ------------------------------------------------------------------ per frame

    def _process(self, rgb: np.ndarray) -> tuple[bytes, Grounding, float, float]:
        """Ground and encode one frame (worker thread)."""
        t0 = time.perf_counter()
        g = self._grounder.update(rgb)
        t1 = time.perf_counter()
        if self.temporal is not None:  # (never dropped from the send queue: skipped before encoding instead)
            packet = self.temporal.encode(rgb, g.rois, label_set_hash=self._label_hash)
        else:
            c = self.config.codec
            rate_point, background = c.rate_point, c.background_level
            if self.frame_rate is not None:
                rate_point, background = self.frame_rate.levels[self.frame_rate.level]
            kw = {} if background is None else {"background": background}  # (baseline encoders lack it)
            packet = self._encoder.compress(rgb, g.rois, rate_point=rate_point, roi_only=c.roi_only,
                                            label_set_hash=self._label_hash, **kw)
            if self.frame_rate is not None:
                self.frame_rate.update(len(packet))
        t2 = time.perf_counter()
        return packet, g, (t1 - t0) * 1e3, (t2 - t1) * 1e3

    def _on_result(self, r: pb.FrameAnalytics) -> None:
        lat = time.time_ns() / 1e3 - r.capture_ts_us
        self._latency_ms.append(lat / 1e3)
        self.recent_results.append({"seq": r.seq, "capture_ts_us": r.capture_ts_us, "bpp": round(r.bpp, 5),
                                    "packet_bytes": r.packet_bytes, "decode_ms": round(r.decode_ms, 1),
                                    "analytics_ms": round(r.analytics_ms, 1), "latency_ms": round(lat / 1e3, 1),
                                    "boxes": [_box_dict(b) for b in r.boxes]})
        if self.on_result is not None:
            try:
                self.on_result(r)
            except Exception:
                log.exception("on_result callback failed for seq %d", r.seq)

    # ------------------------------------------------------------------ running

    async def run(self, max_frames: int | None = None, stop: asyncio.Event | None = None) -> dict[str, Any]:
        """Run the pipeline (see the module doc); returns :meth:`stats`. Raises the client's
        :class:`FatalStreamError` / :class:`GaveUpError`, or a capture error, after cleaning up."""
        if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int)
                                       or max_frames < 1):
            raise ValueError(f"max_frames {max_frames!r} must be an integer >= 1 or None")
        loop = asyncio.get_running_loop()
        stop = stop if stop is not None else asyncio.Event()
        client_stop = asyncio.Event()
        cap_exec = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edge-capture")
        work_exec = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edge-encode")
        self._t_start = time.monotonic()
        log.info("edge instance %s: camera %r to %s (the cloud resumes this camera's frames for this instance "
                 "only; seqs start at 0)", self.instance_id, self.config.camera_id, self.config.server.target)
        tasks: list[asyncio.Task] = []
        client_task: asyncio.Task | None = None
        try:
            await loop.run_in_executor(work_exec, self._build)
            src = self._source
            drop_when_busy = src.live or src.pace == "realtime"
            mailbox: asyncio.Queue[CapturedFrame | None] = asyncio.Queue(maxsize=self.config.source.frame_queue)
            frames = iter(src)
            stop_wait = asyncio.ensure_future(stop.wait())
            tasks.append(stop_wait)

            async def capture() -> None:
                while not stop.is_set() and (max_frames is None or self.frames_captured < max_frames):
                    fut = loop.run_in_executor(cap_exec, next, frames, None)
                    await asyncio.wait({fut, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                    if not fut.done():
                        break  # stopped while reading: the frame is abandoned
                    f = fut.result()
                    if f is None:
                        break
                    self.frames_captured += 1
                    if drop_when_busy:
                        if mailbox.full():
                            mailbox.get_nowait()
                            self.dropped_encoder_busy += 1
                        mailbox.put_nowait(f)
                    else:
                        await mailbox.put(f)
                await mailbox.put(None)  # the processor drains the mailbox, so this never blocks for long

            async def process() -> None:
                nonlocal client_task
                while True:
                    f = await mailbox.get()
                    if f is None:
                        break
                    if stop.is_set():
                        continue  # drain without processing
                    if self.temporal is not None and len(self.queue) >= self.config.sender.queue_size:
                        # temporal: an encoded P frame dropped from a full queue breaks the chain and costs a
                        # keyframe; a frame skipped before encoding costs nothing
                        self.dropped_queue_full_temporal += 1
                        continue
                    h, w = f.rgb.shape[:2]
                    if client_task is None:
                        self.frame_size = (w, h)
                        self.client = self._make_client(w, h)
                        client_task = asyncio.create_task(self.client.run(client_stop), name="edge-client")
                        client_task.add_done_callback(lambda t: stop.set() if not t.cancelled() and t.exception()
                                                      else None)
                    try:
                        packet, g, g_ms, e_ms = await loop.run_in_executor(work_exec, self._process, f.rgb)
                    except UncodableSymbols as exc:  # a frame far outside what the codec was trained on: skip it
                        self.dropped_uncodable += 1
                        now = time.monotonic()
                        if now - self._uncodable_logged >= 10.0:
                            self._uncodable_logged = now
                            log.warning("frame not coded (%d so far): %s", self.dropped_uncodable, exc)
                        continue
                    self.frames_encoded += 1
                    self.bytes_encoded += len(packet)
                    self.rois_total += len(g.rois)
                    self.detector_runs += int(g.detected)
                    self._ground_ms += g_ms
                    self._encode_ms += e_ms
                    self._stage_ms["grounding"].append(g_ms)
                    self._stage_ms["encode"].append(e_ms)
                    out = OutFrame(seq=self._next_seq, capture_ts_us=f.capture_ts_us, packet=packet, boxes=g.boxes)
                    self._next_seq += 1
                    if self.temporal is not None and self.temporal.counts["key"] != self._keys_sent:
                        self._keys_sent, self._last_key_seq = self.temporal.counts["key"], out.seq
                    if self.on_frame is not None:
                        try:
                            self.on_frame(out, f.rgb, g)
                        except Exception:
                            log.exception("on_frame callback failed for seq %d", out.seq)
                    if not self.queue.put(out):
                        self.dropped_queue_full_new += 1
                self.queue.close()

            cap_task = asyncio.create_task(capture(), name="edge-capture")
            proc_task = asyncio.create_task(process(), name="edge-process")
            tasks += [cap_task, proc_task]
            await asyncio.gather(cap_task, proc_task)
            if client_task is not None and not stop.is_set():
                try:
                    await asyncio.wait_for(asyncio.shield(client_task), self.config.sender.drain_timeout_s)
                except asyncio.TimeoutError:
                    log.warning("drain: %d frame(s) still unacknowledged after %.1f s", len(self.backlog),
                                self.config.sender.drain_timeout_s)
            client_stop.set()
            if client_task is not None:
                await asyncio.wait({client_task}, timeout=5.0)
                if client_task.done() and not client_task.cancelled() and client_task.exception() is not None:
                    raise client_task.exception()
            return self.stats()
        except (FatalStreamError, GaveUpError) as exc:
            self.error = exc
            raise
        finally:
            client_stop.set()
            self._t_end = time.monotonic()
            for t in [*tasks, *([client_task] if client_task is not None else [])]:
                if not t.done():
                    t.cancel()
            await asyncio.gather(*tasks, *([client_task] if client_task is not None else []),
                                 return_exceptions=True)
            if self._source is not None:
                cap_exec.submit(self._source.close)  # after any read still running in that thread
            cap_exec.shutdown(wait=False, cancel_futures=False)
            work_exec.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, Any]:
        """Counters of the run so far (plain data, JSON-friendly)."""
        end = self._t_end if self._t_end is not None else time.monotonic()
        elapsed = max(1e-9, end - self._t_start) if self._t_start is not None else 0.0
        c = self.client
        cs = c.stats() if c is not None else {}
        qs, bs = self.queue.stats(), self.backlog.stats()
        px = self.frame_size[0] * self.frame_size[1] if self.frame_size else 0
        n = self.frames_encoded
        lat = sorted(self._latency_ms)
        return {
            "task": self.config.grounding.task,
            "label_count": len(self.labels),
            "label_set_hash": self._label_hash.hex(),
            "elapsed_s": round(elapsed, 3),
            "frame_size": list(self.frame_size) if self.frame_size else None,
            "frames_captured": self.frames_captured,
            "frames_encoded": n,
            "frames_sent": cs.get("frames_written", 0),
            "frames_resent": cs.get("frames_resent", 0),
            "frames_acked": bs["acked"],
            "frames_pending": qs["queued"] + bs["pending"],
            "dropped": {
                "encoder_busy": self.dropped_encoder_busy,  # captured while the encoder was busy (live first)
                "queue_policy": qs["dropped_by_policy"],  # send queue full (slow cloud)
                "queue_full_temporal": self.dropped_queue_full_temporal,  # temporal: skipped before encoding
                "backlog_full": bs["lost_to_backlog"],  # unacked frames dropped during an outage
                "too_large": cs.get("dropped_too_large", 0),  # over server.max_message_bytes
                "uncodable": self.dropped_uncodable,  # the entropy coder refused the frame's values
            },
            "bytes_encoded": self.bytes_encoded,
            "bytes_sent": cs.get("bytes_written", 0),
            "bpp": (8.0 * self.bytes_encoded / (n * px)) if n and px else 0.0,
            "kbps": 8.0 * self.bytes_encoded / 1e3 / elapsed if elapsed else 0.0,
            "rois_per_frame": self.rois_total / n if n else 0.0,
            "detector_runs": self.detector_runs,
            "ground_ms_mean": self._ground_ms / n if n else 0.0,
            "encode_ms_mean": self._encode_ms / n if n else 0.0,
            "stage_ms_p50": {  # per frame, over the last 1000 frames: reading the source, grounding, encoding
                "capture": _median(getattr(self._source, "read_ms", ())),
                **{k: _median(v) for k, v in self._stage_ms.items()}},
            "result_latency_ms_p50": lat[len(lat) // 2] if lat else None,
            "results": cs.get("results", 0),
            "frame_errors": cs.get("frame_errors", {}),
            "reconnects": cs.get("reconnects", 0),
            "connect_failures": cs.get("connect_failures", 0),
            "capture_reconnects": self._source.reconnects if self._source is not None else 0,
            "refresh_requests": self.refresh_requests,
            "refresh_ignored": self.refresh_ignored,
            "mode": self.mode,
            "temporal": dict(self.temporal.counts) if self.temporal is not None else None,
            "rate_control": None if self.frame_rate is None else {
                "target_kbps": self.frame_rate.target_kbps, "level": self.frame_rate.level,
                "rate_point": self.frame_rate.levels[self.frame_rate.level][0],
                "background": self.frame_rate.levels[self.frame_rate.level][1]},
            "last_error": cs.get("last_error") or (str(self.error) if self.error else None),
            "last_results": list(self.recent_results),
        }
