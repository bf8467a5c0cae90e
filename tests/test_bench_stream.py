"""``latentcast bench stream`` machinery, in a few seconds: the tiny codec and bundle, a trivial
detector on the cloud, the baseline and the edge, 1 and 2 streams for 2 s each, both systems, on
vtest at 10 fps. Checks the JSON's structure and that its numbers are sane (not their values)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("cv2")

from latentcast.detector import Detection  # noqa: E402
from latentcast.tools import bench_stream  # noqa: E402

from .conftest import shared_or_skip  # noqa: E402


class FakeDetector:
    """One 'person' box per frame, no model."""

    labels = ["person"]
    nms_threshold = 0.45

    def detect(self, rgb):
        return [Detection(x0=100.0, y0=100.0, x1=160.0, y1=260.0, class_id=0, label="person", score=0.9)]


def test_jpeg_encoder_and_wire_sizes():
    import numpy as np

    from latentcast.proto import latentcast_v1_pb2 as pb

    rgb = np.zeros((48, 64, 3), np.uint8)
    data = bench_stream.JpegEncoder(75).compress(rgb)
    assert data[:2] == b"\xff\xd8"
    w = bench_stream._Wire()
    w.add_frame(pb.EdgeMessage(frame=pb.FramePacket(seq=3, capture_ts_us=10**15, packet=data)), len(data))
    assert w.frames == 1 and w.message_bytes > len(data) and w.http2_est == 9
    w.add_down(pb.CloudMessage(ack=pb.Ack(acked_seq=3, frames_received=4)))
    assert w.down_count["ack"] == 1 and w.down_bytes["ack"] > 5


async def test_bench_stream_smoke(tmp_path, tiny_codec, tiny_bundle):
    video = shared_or_skip() / "data" / "video" / "vtest.avi"
    out = tmp_path / "stream_bench.json"
    lines: list[str] = []
    from latentcast.proto.temporal import TemporalTables

    tables = tmp_path / "tiny-temporal.safetensors"  # flat P-frame tables for the tiny codec, for edge and cloud
    TemporalTables.flat(M=tiny_codec.M, n_rates=tiny_codec.n_rates).save(tables, weights_hash=tiny_codec.weights_hash)
    result = await bench_stream.run_bench(
        streams=[1, 2], seconds=2.0, warmup=0.5, pace=10.0, video=str(video), labels=["person"], threads=1,
        codec=tiny_codec, bundle=tiny_bundle, tables=tables, detector=FakeDetector(), out=out, progress=lines.append)
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(result["results"]))
    assert out.with_suffix(".md").read_text().startswith("Streaming benchmark")
    for key in ("command", "commit", "machine", "duration_s", "options", "setup", "definitions", "results",
                "comparison"):
        assert key in saved, key
    assert saved["options"]["streams"] == [1, 2] and saved["options"]["pace_fps"] == 10.0
    assert len(lines) == 2 * 6  # a start and an end line per configuration

    rows = {(r["system"], r["streams"]): r for r in saved["results"]}
    assert set(rows) == {(s, n) for s in ("latentcast", "latentcast-temporal", "jpeg") for n in (1, 2)}
    for (system, n), r in rows.items():
        assert not r["errors"], r["errors"]
        assert len(r["per_stream"]) == n
        assert r["results_per_s"] > 0, (system, n)
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p99"] < 10_000, lat
        fr = r["frames"]
        assert fr["captured"] >= n * 10 and fr["sent"] > 0 and fr["results"] > 0
        assert fr["captured"] >= fr["encoded"] >= fr["sent"]
        assert set(fr["dropped"]) >= {"encoder_busy", "queue_policy"}
        b = r["bytes_per_frame"]
        assert fr["sent"] <= b["frames"] <= fr["sent"] + n and b["packet"] > 0  # + a write cut by the stop
        assert b["overhead"] > bench_stream.GRPC_PREFIX_BYTES  # seq, capture time, tags: more than the prefix
        assert b["grpc_message"] == pytest.approx(b["packet"] + b["overhead"], abs=0.2)
        assert b["http2_data_headers_est"] >= 9 and b["session_headers"] == n
        d = r["downstream"]
        assert d["result"]["count"] == fr["results"] and d["result"]["mean_bytes"] > 0
        assert d["ack"]["count"] > 0 and d["bytes_per_result"] > 0
        for s in r["per_stream"]:
            assert s["frames_captured"] > 0 and s["results_total"] > 0 and s["error"] is None
            if s["results_in_window"]:
                assert s["latency_ms_p50"] <= s["latency_ms_p99"]
    lc, jp = rows[("latentcast", 1)], rows[("jpeg", 1)]
    assert lc["bytes_per_frame"]["overhead_of_which_edge_boxes"] > 0  # the edge's grounding boxes ride along
    assert jp["bytes_per_frame"]["overhead_of_which_edge_boxes"] == 0
    assert lc["server"]["latentcast_cloud_frames_decoded_total"] > 0
    assert jp["server"]["latentcast_cloud_frames_decoded_total"] > 0  # the JPEG frames went through the real cloud
    refused = {"malformed_packet", "frame_size_mismatch", "decode_failed", "wrong_codec"}
    assert not refused & {k for k, v in jp["frames"]["frame_errors"].items() if v}, jp["frames"]["frame_errors"]
    tm = rows[("latentcast-temporal", 1)]
    assert tm["per_stream"][0]["frames_encoded"] > 0 and not tm["frames"]["frame_errors"].get("decode_failed")
    for r in rows.values():  # every stage has a per-frame median (compose: 0 without a composer)
        st = r["stage_ms_p50"]
        assert set(st) == {"capture", "grounding", "encode", "queue", "decode", "compose", "analytics"}, st
        assert st["capture"] > 0 and st["encode"] > 0 and st["decode"] > 0 and st["compose"] == 0, st
    assert "| latentcast-temporal | 1 |" in out.with_suffix(".md").read_text()
    comp = {(c["system"], c["streams"]): c for c in saved["comparison"]}
    assert set(comp) == {(s, n) for s in ("latentcast", "latentcast-temporal") for n in (1, 2)}
    for c in comp.values():
        assert c["packet_bytes_ratio_latentcast_over_jpeg"] > 0 and c["wire_bytes_ratio_latentcast_over_jpeg"] > 0
        assert c["results_per_s"]["latentcast"] > 0 and c["results_per_s"]["jpeg"] > 0


async def test_bench_stream_grounds_a_task_list(tmp_path, tiny_codec, tiny_bundle):
    """``bench stream --task``: the edges ground the task's label list (labels the detector lacks are
    skipped, as on the edge) and the session names the task."""
    video = shared_or_skip() / "data" / "video" / "vtest.avi"
    out = tmp_path / "bench.json"
    result = await bench_stream.run_bench(
        streams=[1], seconds=1.5, warmup=0.3, pace=10.0, video=str(video), task="people-counting", threads=1,
        systems=["latentcast"], codec=tiny_codec, bundle=tiny_bundle, detector=FakeDetector(), out=out,
        progress=lambda _line: None)
    assert result["setup"]["edge"]["task"] == "people-counting"
    (row,) = result["results"]
    assert not row["errors"] and row["frames"]["results"] > 0
    assert row["bytes_per_frame"]["overhead_of_which_edge_boxes"] > 0  # 'person' of the task list was grounded
    with pytest.raises(ValueError, match="either labels or a task"):
        await bench_stream.run_bench(streams=[1], task="traffic", labels=["person"], codec=tiny_codec,
                                     bundle=tiny_bundle, detector=FakeDetector(), out=out)


async def test_bench_stream_codes_with_an_edge_configs_temporal_settings(tmp_path, tiny_codec, tiny_bundle):
    """``bench stream --edge-config``: the edges' temporal settings come from the file (to measure one lever),
    the result records them; a bad file is an error naming it."""
    from latentcast.proto.temporal import TemporalTables
    from latentcast.tools.options import temporal_settings

    video = shared_or_skip() / "data" / "video" / "vtest.avi"
    tables = tmp_path / "tiny-temporal.safetensors"
    TemporalTables.flat(M=tiny_codec.M, n_rates=tiny_codec.n_rates).save(tables, weights_hash=tiny_codec.weights_hash)
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("temporal:\n  motion: false\n  deadzone: 0.25\n")
    result = await bench_stream.run_bench(
        streams=[1], seconds=1.5, warmup=0.3, pace=10.0, video=str(video), labels=["person"], threads=1,
        systems=["latentcast-temporal"], codec=tiny_codec, bundle=tiny_bundle, tables=tables, detector=FakeDetector(),
        temporal=temporal_settings(str(cfg)), out=tmp_path / "bench.json", progress=lambda _line: None)
    t = result["options"]["edge_temporal"]
    assert t["motion"] is False and t["deadzone"] == 0.25 and t["mode"] == "temporal"
    (row,) = result["results"]
    assert not row["errors"] and row["frames"]["results"] > 0
    cfg.write_text("temporal:\n  rd: -1\n")
    with pytest.raises(SystemExit, match="--edge-config .*edge.yaml.*rd"):
        temporal_settings(str(cfg))


def test_bench_stream_in_processes(tmp_path, tiny_codec_path, tiny_bundle):
    """``placement="processes"``: the cloud and each edge in their own processes, loading their models by name
    (the tiny codec's file, its bundle and tables; the shared YOLOX on both sides); what the edges measured
    comes back to the report."""
    import asyncio

    from latentcast.models.codec import LatentCodec
    from latentcast.proto.temporal import TemporalTables

    video = shared_or_skip() / "data" / "video" / "vtest.avi"
    codec = LatentCodec.from_file(tiny_codec_path)
    tables = tmp_path / "tiny-temporal.safetensors"
    TemporalTables.flat(M=codec.M, n_rates=codec.n_rates).save(tables, weights_hash=codec.weights_hash)
    lines: list[str] = []
    result = asyncio.run(bench_stream.run_bench(
        streams=[2], seconds=3.0, warmup=0.5, pace=10.0, video=str(video), labels=["person"], threads=1,
        systems=["latentcast-temporal", "jpeg"], weights=str(tiny_codec_path), bundle=tiny_bundle, tables=tables,
        temporal_synthesis="own", placement="processes", out=tmp_path / "bench.json", progress=lines.append))
    assert result["options"]["placement"] == "processes"
    assert "each edge in its own" in (tmp_path / "bench.md").read_text()
    assert any("2 edge processes" in line for line in lines)
    for row in result["results"]:
        assert row["placement"] == "processes" and not row["errors"], row["errors"]
        assert len(row["per_stream"]) == 2 and row["results_per_s"] > 0
        assert row["server"]["latentcast_cloud_frames_decoded_total"] > 0  # counted in the cloud's process
        for s in row["per_stream"]:
            assert s["frames_captured"] > 0 and s["results_total"] > 0 and s["error"] is None
        assert row["bytes_per_frame"]["frames"] > 0 and row["downstream"]["ack"]["count"] > 0


async def test_bench_stream_placement_is_checked(tmp_path, tiny_codec, tiny_codec_path):
    """Objects cannot be injected into other processes; an edge process that cannot start is an error that
    names it and its cause (here: the shipped bundle was exported from other weights than the tiny codec)."""
    with pytest.raises(ValueError, match="placement 'processes' loads the models by name"):
        await bench_stream.run_bench(streams=[1], codec=tiny_codec, placement="processes", out=None)
    with pytest.raises(ValueError, match="placement 'elsewhere' must be one of processes, shared"):
        await bench_stream.run_bench(streams=[1], placement="elsewhere", out=None)
    video = shared_or_skip() / "data" / "video" / "vtest.avi"
    with pytest.raises(RuntimeError, match="bench-edge-0 failed to start: ValueError: the edge bundle .* other "
                                           "weights"):
        await bench_stream.run_bench(streams=[1], seconds=1.0, warmup=0.1, video=str(video), threads=1,
                                     systems=["latentcast-temporal"], weights=str(tiny_codec_path),
                                     temporal_synthesis="own", placement="processes", out=None,
                                     progress=lambda _line: None)
