"""Several cloud fronts: the camera-to-front rule, and a front that dies mid-stream.

A camera streams to the first front of its rendezvous-hash order; when that front dies, its next attempt is
refused and it goes to the next front, which holds no state of this camera: its first P frames are refused
(missing_reference, never rendered), it asks for a keyframe, and the stream goes on there."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from latentcast.channel import front_order

torch = pytest.importorskip("torch")

from tests.test_cloud_server import LABELS, make_config, make_server  # noqa: E402,F401
from tests.test_cloud_temporal import _frames, tables_file  # noqa: E402,F401


def test_front_order_is_stable_and_moves_only_the_cameras_of_a_removed_front():
    fronts = [f"10.0.0.{i}:50051" for i in range(1, 5)]
    cams = [f"cam-{i}" for i in range(400)]
    first = {c: front_order(c, fronts)[0] for c in cams}
    assert front_order("cam-1", fronts) == front_order("cam-1", list(reversed(fronts)))  # order of the list: no matter
    counts = {f: sum(1 for c in cams if first[c] == f) for f in fronts}
    assert min(counts.values()) > 60, counts  # spread over the fronts
    gone = fronts[0]
    rest = [f for f in fronts if f != gone]
    for c in cams:
        new = front_order(c, rest)[0]
        assert new == first[c] if first[c] != gone else new == front_order(c, fronts)[1]
    with pytest.raises(ValueError, match="at least one front"):
        front_order("cam", ["", "  "])


async def test_a_camera_moves_to_the_next_front_when_its_front_dies(make_server, tiny_codec, tiny_bundle,  # noqa: F811
                                                                   tables_file, tmp_path):  # noqa: F811
    import cv2

    from latentcast.edge.app import EdgeApp
    from latentcast.edge.config import EdgeConfig

    folder = tmp_path / "frames"
    folder.mkdir()
    n = 40
    for i, (f, _) in enumerate(_frames(n)):
        cv2.imwrite(str(folder / f"{i:03d}.png"), f[:, :, ::-1])
    cfg = make_config()
    cfg.codec = dataclasses.replace(cfg.codec, temporal_tables=str(tables_file), refresh_retry_s=0.0)
    a, b = await make_server(cfg), await make_server(cfg)
    addr = {f"127.0.0.1:{s.ports[0]}": s for s in (a, b)}
    camera = "gate-7"
    first, second = (addr[t] for t in front_order(camera, list(addr)))
    ecfg = EdgeConfig(camera_id=camera)
    ecfg.source.uri, ecfg.source.pace, ecfg.source.fps = str(folder), "realtime", 20.0
    ecfg.grounding.labels, ecfg.grounding.threads = LABELS, 1
    ecfg.codec.bundle, ecfg.codec.threads = str(tiny_bundle), 1
    ecfg.temporal = dataclasses.replace(ecfg.temporal, mode="temporal", tables=str(tables_file), refresh_s=0.0)
    ecfg.sender.queue_size = 64
    ecfg.server.fronts = list(addr)
    ecfg.server.backoff_initial_s, ecfg.server.backoff_max_s = 0.05, 0.2
    app = EdgeApp(ecfg)
    run = asyncio.create_task(app.run(max_frames=n))
    for _ in range(400):  # bounded: until the first front has analysed a few frames
        if first.metrics.value("latentcast_cloud_frames_decoded_total") >= 8:
            break
        await asyncio.sleep(0.02)
    assert first.metrics.value("latentcast_cloud_frames_decoded_total") >= 8
    assert second.metrics.value("latentcast_cloud_frames_received_total") == 0  # affinity: one front per camera
    await first.stop(0.2)  # the front dies mid-stream
    stats = await asyncio.wait_for(run, 60)
    m = second.metrics
    assert m.value("latentcast_cloud_frames_decoded_total") >= 8, "the stream went on at the next front"
    assert stats["temporal"]["key"] >= 2 and stats["refresh_requests"] >= 1  # the new front asked for a keyframe
    errors = stats["frame_errors"]
    assert set(errors) <= {"missing_reference", "server_shutdown", "stream_ended"}, errors
    assert errors.get("missing_reference", 0) >= 1  # the P frames resent to the new front before its keyframe
    assert stats["results"] + sum(errors.values()) == n  # every frame analysed or reported
    # no frame was rendered from a missing reference: every P frame the second front got before its keyframe
    # was refused, and what it analysed is exactly what it decoded
    assert m.value("latentcast_cloud_frame_errors_total", {"code": "missing_reference"}) == \
        errors.get("missing_reference", 0)
    assert stats["results"] == first.metrics.value("latentcast_cloud_frames_decoded_total") + \
        m.value("latentcast_cloud_frames_decoded_total")
