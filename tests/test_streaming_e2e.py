"""The real edge (EdgeApp, ONNX Runtime) against the real cloud (CloudServer) on loopback.

- ``latentcast demo`` on vtest.avi with the shipped codec and YOLOX-nano on both sides: results for
  every frame, the cloud's detections on the reconstructions find most of the edge's boxes, the
  side-by-side video and the summary are written.
- The cloud stopped mid-stream and started again on the same port: the edge reconnects and
  resumes; every frame is analysed exactly once.
- A cloud slower than the camera: the edge's queues stay bounded and it drops by policy, counted.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time

import numpy as np
import pytest

pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

from latentcast.cloud.config import CloudConfig  # noqa: E402
from latentcast.cloud.server import CloudServer  # noqa: E402
from latentcast.detector import Detection  # noqa: E402
from latentcast.edge.app import EdgeApp  # noqa: E402
from latentcast.edge.config import EdgeConfig  # noqa: E402

from .conftest import shared_or_skip  # noqa: E402

TIMEOUT = 120.0


class BoxDetector:
    """A fixed 'person' box per frame, with an optional delay (a slow cloud)."""

    labels = ["person"]

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.calls = 0

    def detect(self, rgb):
        if self.delay:
            time.sleep(self.delay)
        self.calls += 1
        return [Detection(x0=1.0, y0=1.0, x1=20.0, y1=40.0, class_id=0, label="person", score=0.9)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cloud_config(port: int = 0) -> CloudConfig:
    cfg = CloudConfig()
    s = cfg.server
    s.host = s.maintenance_host = s.metrics_host = "127.0.0.1"
    s.port, s.maintenance_port, s.metrics_port = port, -1, -1
    s.tokens, s.grace_s = ["t0k"], 2.0
    cfg.codec.warmup_size = 64
    return cfg


def _edge_config(video, port: int, bundle, **source) -> EdgeConfig:
    cfg = EdgeConfig(camera_id="cam-e2e")
    cfg.source.uri, cfg.source.pace = str(video), "none"
    for k, v in source.items():
        setattr(cfg.source, k, v)
    cfg.grounding.labels, cfg.grounding.threads = ["person"], 1
    cfg.codec.bundle, cfg.codec.rate_point, cfg.codec.threads = str(bundle), 1, 1
    cfg.server.target, cfg.server.token = f"127.0.0.1:{port}", "t0k"
    cfg.server.backoff_initial_s, cfg.server.backoff_max_s = 0.05, 0.3
    return cfg


@pytest.fixture
def vtest():
    return shared_or_skip() / "data" / "video" / "vtest.avi"


def test_demo_streams_vtest_and_the_cloud_finds_the_edges_boxes(tmp_path, vtest, capsys):
    from latentcast.tools.cli import main

    out = tmp_path / "demo"
    assert main(["demo", str(vtest), "--frames", "8", "--pace", "none", "--every", "2", "--rate", "2",
                 "--mode", "frames", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "analysed" in printed and "side_by_side.mp4" in printed
    summary = json.loads((out / "summary.json").read_text())
    q, e = summary["quality"], summary["edge"]
    # unpaced, the edge may drop a frame by its live-first send-queue policy; every frame the cloud
    # accepted is analysed and reaches the subscriber
    assert e["frames_encoded"] == 8
    assert q["results"] == q["frames_in_video"] == e["frames_acked"] == 8 - sum(e["dropped"].values()) >= 6, e
    assert summary["cloud"]["latentcast_cloud_frames_decoded_total"] == q["results"]
    assert q["edge_boxes"] >= q["results"] * 3  # vtest has several pedestrians in every frame
    # the cloud's YOLOX on the reconstruction finds most of what the edge's YOLOX found on the original
    assert q["edge_box_recall"] >= 0.5 and q["frames_with_half_or_more_found"] >= q["results"] - 2, q
    assert q["psnr_inside_edge_boxes_db"] > q["psnr_frame_db"]  # ROIs coded, the background from the prior
    assert 0 < e["bpp"] < 0.2
    cap = cv2.VideoCapture(str(out / "side_by_side.mp4"))
    ok, frame = cap.read()
    cap.release()
    assert ok and frame.shape == (576, 2 * 768, 3)


def test_demo_defaults_to_temporal_coding_and_says_how_much_it_analysed(tmp_path, vtest, capsys):
    """With its defaults the demo codes a fixed camera temporally (temporal.mode auto finds the shipped
    P-frame tables) and prints the mode and the share of captured frames the cloud analysed."""
    from latentcast.tools.cli import main

    out = tmp_path / "demo"
    assert main(["demo", str(vtest), "--frames", "6", "--pace", "none", "--out", str(out), "--dashboard", "0"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"dashboard: http://127\.0\.0\.1:\d+/ ", printed)  # --dashboard serves the page beside it
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["mode"] == "temporal" and summary["config"]["temporal_mode_setting"] == "auto"
    e = summary["edge"]
    assert e["temporal"]["key"] >= 1 and e["temporal"]["p"] >= 1
    share = summary["analysed_fraction"]
    assert share == round(summary["quality"]["results"] / e["frames_captured"], 4) and share > 0
    assert "mode: temporal (temporal.mode auto, synthesis auto)" in printed
    assert f"{100 * share:.0f} % of the captured" in printed and summary["config"]["temporal_synthesis"] == "auto"


def test_demo_grounds_a_task_list(tmp_path, vtest, capsys):
    """``demo --task``: the task's label list is grounded (as ``edge --task``), named in the summary and
    in the session; the cloud's detections are compared under the task's labels."""
    from latentcast.edge.tasks import load_task
    from latentcast.tools.cli import main

    out = tmp_path / "demo"
    assert main(["demo", str(vtest), "--task", "people-counting", "--frames", "4", "--pace", "none", "--every", "2",
                 "--rate", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["task"] == "people-counting"
    assert summary["config"]["labels"] == list(load_task("people-counting").labels)
    q = summary["quality"]
    assert q["edge_boxes"] >= q["results"] * 2 and q["edge_boxes_found_by_cloud"] >= q["edge_boxes"] // 3, q


def test_demo_refuses_labels_and_a_task_together(tmp_path, vtest):
    from latentcast.tools.demo import run_demo

    with pytest.raises(ValueError, match="either labels or a task"):
        asyncio.run(run_demo(video=str(vtest), out_dir=tmp_path, labels=["person"], task="traffic"))


async def test_cloud_restart_mid_stream_loses_nothing_and_processes_nothing_twice(tiny_codec, tiny_bundle, vtest):
    port = _free_port()
    seen: list[tuple[str, int]] = []

    def start_cloud() -> CloudServer:
        srv = CloudServer(_cloud_config(port), codec=tiny_codec, detector=BoxDetector())
        srv._result_sinks = _spy(srv._result_sinks, seen)
        return srv

    first = start_cloud()
    await first.start()
    await first.wait_ready(TIMEOUT)
    results: list[int] = []
    cfg = _edge_config(vtest, port, tiny_bundle)
    cfg.sender.queue_size = 64  # room for the whole outage: this test is about resume, not the drop policy
    app = EdgeApp(cfg, on_result=lambda r: results.append(r.seq))
    run = asyncio.create_task(app.run(max_frames=30))
    deadline = time.monotonic() + TIMEOUT
    while len(seen) < 8 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await first.stop(grace=2.0)  # SIGTERM semantics: in-flight frames finish and are acked
    await asyncio.sleep(0.3)  # the edge keeps capturing and encoding into its queue and backlog
    second = start_cloud()
    await second.start()
    try:
        await second.wait_ready(TIMEOUT)
        stats = await asyncio.wait_for(run, TIMEOUT)
    finally:
        await second.stop(grace=1.0)
    seqs = [s for _, s in seen]
    assert stats["frames_encoded"] == 30 and stats["reconnects"] >= 1
    assert sorted(seqs) == list(range(30)), seqs  # every frame analysed, none twice
    assert stats["dropped"] == {"encoder_busy": 0, "queue_policy": 0, "queue_full_temporal": 0, "backlog_full": 0,
                                "too_large": 0, "uncodable": 0}


def _spy(make_sinks, seen):
    """Wrap CloudServer._result_sinks so every analysed frame is recorded (camera, seq)."""

    def wrapped():
        sinks = make_sinks()

        def record(item):  # an AnalysedFrame (failures never reach the sinks)
            seen.append((item.job.spec.camera_id, item.seq))

        return [record, *sinks]

    return wrapped


async def test_slow_cloud_bounded_edge_drops_by_policy(tiny_codec, tiny_bundle, vtest):
    """The cloud analyses ~5 frames/s, the camera runs at 25 fps: the edge's queue stays within its
    bound, it drops by policy and counts it, and the result latency does not grow without bound."""
    cloud = CloudServer(_cloud_config(), codec=tiny_codec, detector=BoxDetector(delay=0.2))
    port, _, _ = await cloud.start()
    try:
        await cloud.wait_ready(TIMEOUT)
        cfg = _edge_config(vtest, port, tiny_bundle, pace="realtime", fps=25.0)
        cfg.sender.queue_size, cfg.sender.backlog_frames = 4, 16
        cfg.sender.drain_timeout_s = 3.0
        cfg.grounding.every = 10
        app = EdgeApp(cfg)
        max_depth = max_in_flight = 0

        async def watch():
            nonlocal max_depth, max_in_flight
            while True:
                max_depth = max(max_depth, app.queue.stats()["queued"])
                max_in_flight = max(max_in_flight, len(app.backlog))
                await asyncio.sleep(0.02)

        w = asyncio.create_task(watch())
        stats = await asyncio.wait_for(app.run(max_frames=75), TIMEOUT)
        w.cancel()
    finally:
        await cloud.stop(grace=1.0)
    dropped = stats["dropped"]
    assert max_depth <= 4 and max_in_flight <= cfg.sender.max_in_flight == 2
    assert dropped["encoder_busy"] + dropped["queue_policy"] + dropped["backlog_full"] > 0, stats
    assert stats["results"] < stats["frames_captured"]
    lat = stats["result_latency_ms_p50"]
    assert lat is not None and lat < 10_000, lat
    assert np.isfinite(stats["kbps"])
