"""``latentcast demo``: the edge and the cloud in one process on loopback, streaming a video.

::

    FrameSource(video) ─► EdgeApp (grounding, ONNX encoder) ─gRPC Stream─► CloudServer (decode, YOLOX)
          │ originals by seq                                                   │ Subscribe (JPEG + boxes)
          └──────────────────────────► side_by_side.mp4 ◄──────────────────────┘
                                       original + edge ROIs | reconstruction + cloud boxes

While it runs it prints one line per second (fps in/out, kbps, bpp, dropped frames, detections);
at the end it writes ``side_by_side.mp4`` and ``summary.json`` (the command, machine, commit,
edge stats, cloud counters, and quality of the reconstructions: PSNR over the frame and inside the
edge's boxes, and how many of the edge's boxes the cloud's detector found again on the
reconstruction, IoU >= 0.5).

The cloud listens on 127.0.0.1 with a random bearer token; the edge connects with it. Both
configs may be given as YAML (the same files as ``latentcast edge`` / ``latentcast cloud``);
the demo then overrides only the addresses, ports and token.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from latentcast.boxes import greedy_match
from latentcast.tools.eval.metrics import psnr

log = logging.getLogger(__name__)

__all__ = ["run_demo", "box_recall"]

_KEEP_ORIGINALS = 512  # originals waiting for their result (frames dropped later are evicted)


def box_recall(edge_boxes: list, cloud_boxes: list, *, iou: float = 0.5,
               cloud_to_task: dict[int, str] | None = None) -> tuple[int, int]:
    """(matched, total): edge boxes for which the cloud found a box of the same task label with
    IoU >= ``iou`` (greedy, each cloud box used once). Boxes have x0..y1, label, label_id, score;
    ``cloud_to_task`` maps the cloud detector's class ids to task labels (e.g. car, truck ->
    vehicle); without it the labels are compared as they are."""
    def label(c) -> str | None:
        return c.label if cloud_to_task is None else cloud_to_task.get(c.label_id)

    pairs = greedy_match(
        [(e.x0, e.y0, e.x1, e.y1) for e in edge_boxes],
        [(c.x0, c.y0, c.x1, c.y1) for c in cloud_boxes],
        iou=iou,
        scores=[e.score for e in edge_boxes],
        compatible=lambda i, j: label(cloud_boxes[j]) == edge_boxes[i].label,
    )
    return len(pairs), len(edge_boxes)


def _psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR (dB) of a region; None for an empty one."""
    return psnr(a, b) if a.size else None


def _draw(img_bgr: np.ndarray, boxes, color: tuple[int, int, int]) -> None:
    import cv2

    for b in boxes:
        p0, p1 = (int(b.x0), int(b.y0)), (int(b.x1), int(b.y1))
        cv2.rectangle(img_bgr, p0, p1, color, 2)
        cv2.putText(img_bgr, f"{b.label} {b.score:.2f}", (p0[0], max(10, p0[1] - 4)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4, color, 1, cv2.LINE_AA)


class _Collector:
    """Receives the cloud's FrameResults, pairs them with the originals, writes the video."""

    def __init__(self, *, out_video: Path, fps: float, cloud_to_task: dict[int, str] | None = None):
        self.out_video, self.fps, self.cloud_to_task = out_video, fps, cloud_to_task
        self.originals: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self.writer = None
        self.frames_written = 0
        self.results = 0
        self.detections = 0
        self.psnr_frame: list[float] = []
        self.psnr_roi: list[float] = []
        self.matched = 0
        self.edge_boxes = 0
        self.frames_with_boxes = 0
        self.frames_mostly_matched = 0

    def keep_original(self, seq: int, rgb: np.ndarray) -> None:
        self.originals[seq] = rgb
        while len(self.originals) > _KEEP_ORIGINALS:
            self.originals.popitem(last=False)

    def add(self, r) -> None:
        import cv2

        self.results += 1
        self.detections += len(r.boxes)
        orig = self.originals.pop(r.seq, None)
        rec_bgr = cv2.imdecode(np.frombuffer(r.image, np.uint8), cv2.IMREAD_COLOR) if r.image else None
        m, n = box_recall(list(r.edge_boxes), list(r.boxes), cloud_to_task=self.cloud_to_task)
        self.matched += m
        self.edge_boxes += n
        if n:
            self.frames_with_boxes += 1
            self.frames_mostly_matched += int(m * 2 >= n)
        if orig is None or rec_bgr is None:
            return
        rec_rgb = rec_bgr[:, :, ::-1]
        p = _psnr(rec_rgb, orig)
        if p is not None:
            self.psnr_frame.append(p)
        for b in r.edge_boxes:
            x0, y0, x1, y1 = int(b.x0), int(b.y0), int(b.x1), int(b.y1)
            p = _psnr(rec_rgb[y0:y1, x0:x1], orig[y0:y1, x0:x1])
            if p is not None:
                self.psnr_roi.append(p)
        left = np.ascontiguousarray(orig[:, :, ::-1])
        right = np.ascontiguousarray(rec_bgr)
        _draw(left, r.edge_boxes, (0, 220, 255))
        _draw(right, r.boxes, (0, 255, 0))
        cv2.putText(left, f"original #{r.seq} + edge ROIs", (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255),
                    1, cv2.LINE_AA)
        cv2.putText(right, f"reconstruction {r.packet_bytes} B + cloud detections", (8, 20),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
        frame = np.hstack([left, right])
        if self.writer is None:
            self.writer = cv2.VideoWriter(str(self.out_video), cv2.VideoWriter_fourcc(*"mp4v"), self.fps,
                                          (frame.shape[1], frame.shape[0]))
            if not self.writer.isOpened():
                raise RuntimeError(f"cannot write {self.out_video} (OpenCV mp4v writer)")
        self.writer.write(frame)
        self.frames_written += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()

    def summary(self) -> dict[str, Any]:
        def mean(v):
            return float(np.mean(v)) if v else None

        return {"results": self.results, "frames_in_video": self.frames_written,
                "detections_per_result": self.detections / self.results if self.results else 0.0,
                "psnr_frame_db": mean(self.psnr_frame), "psnr_inside_edge_boxes_db": mean(self.psnr_roi),
                "edge_boxes": self.edge_boxes, "edge_boxes_found_by_cloud": self.matched,
                "edge_box_recall": self.matched / self.edge_boxes if self.edge_boxes else None,
                "frames_with_edge_boxes": self.frames_with_boxes,
                "frames_with_half_or_more_found": self.frames_mostly_matched}


def _live_line(t: float, edge: dict, prev: dict | None, dt: float, col: _Collector, prev_results: int) -> str:
    cap = edge["frames_captured"] - (prev["frames_captured"] if prev else 0)
    byt = edge["bytes_encoded"] - (prev["bytes_encoded"] if prev else 0)
    drop = sum(edge["dropped"].values())
    out = col.results - prev_results
    lat = edge.get("result_latency_ms_p50")
    return (f"t={t:5.1f}s  in {cap / dt:4.1f} fps  out {out / dt:4.1f} fps  {8 * byt / 1e3 / dt:7.1f} kbps  "
            f"{edge['bpp']:.4f} bpp  dropped {drop} {dict((k, v) for k, v in edge['dropped'].items() if v)}  "
            f"det {col.detections / col.results if col.results else 0:.1f}/frame  "
            f"latency p50 {'-' if lat is None else f'{lat:.0f} ms'}")


# edge and cloud share the machine in the demo: one thread per library, so the edge's ONNX Runtime and the
# cloud's torch do not fight over the cores (on 2 cores: 6.2 against 4.6 temporal results/s, stream bench)
SHARED_MACHINE_THREADS = 1

async def run_demo(*, video: str, out_dir: Path, max_frames: int | None = None, edge_config: str | None = None,
                   cloud_config: str | None = None, labels: list[str] | None = None, rate_point: int | None = None,
                   pace: str | None = None, every: int | None = None, live: bool = True,
                   temporal: bool = False, target_kbps: float | None = None, task: str | None = None,
                   mode: str | None = None, threads: int | None = SHARED_MACHINE_THREADS,
                   command: str = "latentcast demo", dashboard_port: int | None = None) -> dict[str, Any]:
    """Run edge and cloud on loopback over ``video``; returns the summary (also written to disk).

    ``task``: ground that task's label list (``latentcast task list``) instead of ``labels``, as
    ``latentcast edge --task`` does; an unknown task is an error before anything starts. ``threads``: the
    threads of every library on both sides (ONNX Runtime encoder and detectors, torch), which share this
    machine; None or 0 leaves the configs' values. ``dashboard_port``: also serve the web dashboard
    (``latentcast dashboard``) on 127.0.0.1 at this port (0 = a free one) while the demo runs."""
    import grpc

    from latentcast.cloud.config import load_cloud_config
    from latentcast.cloud.server import CloudServer
    from latentcast.edge.app import EdgeApp
    from latentcast.edge.config import load_edge_config
    from latentcast.proto import latentcast_v1_pb2 as pb
    from latentcast.proto import latentcast_v1_pb2_grpc as pb_grpc
    from latentcast.shared import portable_path
    from latentcast.tools.provenance import commit as _commit
    from latentcast.tools.provenance import machine as _machine

    out_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    ccfg = load_cloud_config(cloud_config)
    ccfg.server.host = ccfg.server.maintenance_host = ccfg.server.metrics_host = "127.0.0.1"
    ccfg.server.port = ccfg.server.maintenance_port = ccfg.server.metrics_port = 0
    ccfg.server.tokens = [token]
    ecfg = load_edge_config(edge_config)
    ecfg.source.uri = video
    ecfg.server.token, ecfg.server.tls = token, False
    ecfg.camera_id = ecfg.camera_id if edge_config else "demo-camera"
    if labels and task:
        raise ValueError("give either labels or a task, not both (a task's label list replaces the labels)")
    if labels:
        ecfg.grounding.labels = list(labels)
    if task:
        ecfg.grounding.use_task(task)
    if rate_point is not None:
        ecfg.codec.rate_point = rate_point
    if pace:
        ecfg.source.pace = pace
    if every:
        ecfg.grounding.every = every
    if mode is not None:
        ecfg.temporal.mode = mode
    if threads:
        ecfg.codec.threads = ecfg.grounding.threads = int(threads)
        ccfg.pipeline.torch_threads = ccfg.analytics.threads = int(threads)
    if temporal or target_kbps:
        ecfg.temporal.mode = "temporal"
    if target_kbps:
        ecfg.temporal.target_kbps = float(target_kbps)

    cloud = CloudServer(ccfg)
    port, _maint, metrics_port = await cloud.start()
    t_ready = time.monotonic()
    await cloud.wait_ready(timeout=300)
    log.info("cloud ready on 127.0.0.1:%d in %.1f s (metrics on %d)", port, time.monotonic() - t_ready, metrics_port)
    ecfg.server.target = f"127.0.0.1:{port}"
    dash = None
    if dashboard_port is not None:
        from latentcast.cloud.dashboard.config import CloudLinkConfig, DashboardConfig, DashboardSection
        from latentcast.cloud.dashboard.server import DashboardServer

        dash = DashboardServer(DashboardConfig(cloud=CloudLinkConfig(target=ecfg.server.target, token=token),
                                               dashboard=DashboardSection(host="127.0.0.1", port=dashboard_port)))
        try:
            await dash.start()
        except BaseException:
            await cloud.stop(grace=0)
            raise
        print(f"dashboard: {dash.url} (open it in a browser; it stops with the demo)", flush=True)

    import cv2

    cap = cv2.VideoCapture(video)
    fps = cap.get(cv2.CAP_PROP_FPS) or 10.0
    cap.release()
    app = EdgeApp(ecfg, on_frame=lambda out, rgb, g: col.keep_original(out.seq, rgb))
    task_labels = list(app.labels)  # grounding.labels, or the task list's
    classes = list(getattr(cloud.detector, "labels", []) or [])
    cloud_to_task = None
    if classes:
        from latentcast.edge.grounding import map_labels

        # a task list names labels the closed-set detector lacks: those are skipped, as the edge does
        cloud_to_task = {c: task_labels[k] for c, k in
                         map_labels(task_labels, classes, strict=app.task_list is None).items()}
    col = _Collector(out_video=out_dir / "side_by_side.mp4", fps=float(ecfg.source.fps or fps),
                     cloud_to_task=cloud_to_task)
    stop = asyncio.Event()

    channel = grpc.aio.insecure_channel(ecfg.server.target, options=[
        ("grpc.max_receive_message_length", ccfg.server.max_message_bytes)])
    sub_ready = asyncio.Event()

    async def subscribe() -> None:
        stub = pb_grpc.LatentcastStub(channel)
        call = stub.Subscribe(pb.SubscribeRequest(camera_id=ecfg.camera_id, format=pb.IMAGE_FORMAT_JPEG,
                                                  jpeg_quality=95),
                              metadata=(("authorization", f"Bearer {token}"),))
        sub_ready.set()
        try:
            async for r in call:
                col.add(r)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE):
                raise

    async def ticker() -> None:
        prev, prev_results, t0 = None, 0, time.monotonic()
        last = t0
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            s = app.stats()
            if live:
                print(_live_line(now - t0, s, prev, now - last, col, prev_results), flush=True)
            prev, prev_results, last = s, col.results, now

    sub_task = asyncio.create_task(subscribe(), name="demo-subscribe")
    await sub_ready.wait()
    await asyncio.sleep(0.2)  # let the subscription reach the server before the first frame
    tick = asyncio.create_task(ticker(), name="demo-ticker")
    t0 = time.monotonic()
    try:
        edge_stats = await app.run(max_frames=max_frames, stop=stop)
        # the edge stops once its frames are acknowledged (= accepted by the cloud's pipeline); the
        # subscriber still gets the results of the frames in flight: wait for them (bounded)
        deadline = time.monotonic() + 10.0
        while col.results < edge_stats.get("frames_acked", 0) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
    finally:
        tick.cancel()
        cloud_counters = _cloud_counters(cloud)
        await cloud.stop(grace=2.0)
        if dash is not None:
            await dash.stop()
        await asyncio.wait({sub_task}, timeout=5.0)
        sub_task.cancel()
        await channel.close()
        col.close()
    elapsed = time.monotonic() - t0
    quality = col.summary()
    summary = {
        "command": command,
        "commit": _commit(),
        "machine": _machine(),
        "video": portable_path(video),
        "elapsed_s": round(elapsed, 2),
        "edge": {k: v for k, v in edge_stats.items() if k != "last_results"},
        "cloud": cloud_counters,
        "quality": quality,
        "analysed_fraction": (round(quality["results"] / edge_stats["frames_captured"], 4)
                              if edge_stats.get("frames_captured") else None),
        "outputs": {"video": portable_path(out_dir / "side_by_side.mp4"),
                    "summary": portable_path(out_dir / "summary.json")},
        "config": {"task": ecfg.grounding.task if ecfg.grounding.labels_from_task else None,
                   "labels": task_labels, "rate_point": ecfg.codec.rate_point, "pace": ecfg.source.pace,
                   "grounding_every": ecfg.grounding.every, "roi_only": ecfg.codec.roi_only,
                   "mode": edge_stats.get("mode"), "temporal_mode_setting": ecfg.temporal.mode,
                   "target_kbps": ecfg.temporal.target_kbps or None,
                   "synthesis": ccfg.codec.synthesis, "temporal_synthesis": ccfg.codec.temporal_synthesis},
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _cloud_counters(cloud) -> dict[str, Any]:
    """A few cloud counters from its Prometheus registry (plain numbers)."""
    out: dict[str, Any] = {}
    reg = cloud.metrics.registry
    for fam in reg.collect():
        for s in fam.samples:
            if s.name.endswith(("_total",)) and not s.name.startswith("python_"):
                key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}"
                                if s.labels else "")
                out[key] = s.value
    return out


def add_arguments(m: argparse.ArgumentParser) -> None:
    """The options of ``latentcast demo``."""
    m.add_argument("video", nargs="?", help="video file or URL (default: vtest.avi in the shared folder)")
    m.add_argument("--out", default="demo_out", help="output folder for side_by_side.mp4 and summary.json")
    m.add_argument("--frames", type=int, help="stop after this many captured frames (default: the whole video)")
    m.add_argument("--labels", help="task labels, e.g. person,car (default: the edge config's)")
    m.add_argument("--task", help="ground this task's label list instead of --labels (latentcast task list), as "
                                  "`latentcast edge --task` does")
    m.add_argument("--rate", type=int, help="codec rate point (default: the edge config's, 1)")
    m.add_argument("--pace", choices=["realtime", "none"],
                   help="realtime: frames arrive at the video's fps and a busy edge drops (default); none: every frame")
    m.add_argument("--every", type=int, help="run the detector every N frames, track in between (default 5)")
    m.add_argument("--mode", choices=["auto", "temporal", "frames"],
                   help="temporal: a keyframe, then only the cells that changed (the mode of a fixed camera); frames: "
                        "every frame on its own; auto: temporal when the bundle has P-frame tables (default: the "
                        "edge config's temporal.mode, auto)")
    m.add_argument("--temporal", action="store_true", help="the same as --mode temporal")
    m.add_argument("--target-kbps", type=float, help="temporal coding with rate control at this bitrate")
    m.add_argument("--threads", type=int, default=SHARED_MACHINE_THREADS,
                   help="threads of every library on edge and cloud, which share this machine (default "
                        f"{SHARED_MACHINE_THREADS}; 0 = the configs' values)")
    m.add_argument("--dashboard", nargs="?", type=int, const=8080, metavar="PORT",
                   help="also serve the live web dashboard on 127.0.0.1:PORT (default 8080; 0 = a free port) and "
                        "print its URL")
    m.add_argument("--edge-config", help="edge YAML config (addresses and token are set by the demo)")
    m.add_argument("--cloud-config", help="cloud YAML config (addresses and token are set by the demo)")
    m.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from latentcast.shared import shared_path

    video = args.video or str(shared_path("data", "video", "vtest.avi"))
    if not Path(video).exists() and "://" not in video:
        raise FileNotFoundError(f"video {video} not found")
    labels = [t.strip() for t in args.labels.split(",") if t.strip()] if args.labels else None
    summary = asyncio.run(run_demo(video=video, out_dir=Path(args.out), max_frames=args.frames,
                                   edge_config=args.edge_config, cloud_config=args.cloud_config, labels=labels,
                                   rate_point=args.rate, pace=args.pace, every=args.every,
                                   temporal=getattr(args, "temporal", False), mode=getattr(args, "mode", None),
                                   threads=getattr(args, "threads", SHARED_MACHINE_THREADS),
                                   target_kbps=getattr(args, "target_kbps", None), task=getattr(args, "task", None),
                                   command=" ".join(["latentcast"] + sys.argv[1:]),
                                   dashboard_port=getattr(args, "dashboard", None)))
    q, e = summary["quality"], summary["edge"]
    share = summary["analysed_fraction"]
    c = summary["config"]
    synthesis = c["temporal_synthesis"] if e.get("mode") == "temporal" else c["synthesis"]
    print(f"\nmode: {e.get('mode')} (temporal.mode {c['temporal_mode_setting']}, synthesis {synthesis}); "
          f"{e['frames_captured']} frames captured, {e['frames_encoded']} encoded, {q['results']} analysed "
          f"({'n/a' if share is None else f'{100 * share:.0f} %'} of the captured) in {summary['elapsed_s']:.1f} s; "
          f"{e['bpp']:.4f} bpp, {e['kbps']:.1f} kbps; dropped {e['dropped']}")
    if q["psnr_frame_db"] is not None:
        print(f"PSNR {q['psnr_frame_db']:.2f} dB (frame), "
              f"{q['psnr_inside_edge_boxes_db'] or float('nan'):.2f} dB (inside the edge's boxes); "
              f"cloud found {q['edge_boxes_found_by_cloud']}/{q['edge_boxes']} edge boxes")
    print(f"wrote {summary['outputs']['video']} and {summary['outputs']['summary']}")
    return 0
