"""The cloud gRPC service end to end on loopback (port 0), with the tiny codec and a fake detector."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402

from latentcast.cloud.analytics import Detection  # noqa: E402
from latentcast.cloud.config import CloudConfig  # noqa: E402
from latentcast.cloud.server import SERVICE_NAME, CloudServer  # noqa: E402
from latentcast.proto import latentcast_v1_pb2 as pb  # noqa: E402
from latentcast.proto import latentcast_v1_pb2_grpc as pb_grpc  # noqa: E402
from latentcast.proto.bitstream import Packet, Roi  # noqa: E402
from latentcast.proto.ids import label_set_hash  # noqa: E402

LABELS = ["person", "car"]
W, H = 96, 64
TIMEOUT = 10.0  # every wait in these tests is bounded by this


class FakeDetector:
    """One fixed box per frame; optional delay per frame and a gate that holds the first call."""

    labels = ["person", "car", "dog"]

    def __init__(self, *, delay: float = 0.0, gate: threading.Event | None = None) -> None:
        self.delay = delay
        self.gate = gate
        self.calls = 0

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        assert rgb.dtype == np.uint8 and rgb.ndim == 3
        if self.gate is not None:
            self.gate.wait(TIMEOUT)
        if self.delay:
            time.sleep(self.delay)
        self.calls += 1
        h, w = rgb.shape[:2]
        return [Detection(x0=1.0, y0=2.0, x1=w / 2, y1=h / 2, class_id=0, label="person", score=0.9)]


@pytest.fixture(scope="module")
def packets(tiny_codec) -> list[bytes]:
    rng = np.random.default_rng(0)
    lsh = label_set_hash(LABELS)
    out = []
    for i in range(4):
        img = (rng.random((H, W, 3)) * 255).astype(np.uint8)
        out.append(tiny_codec.compress(img, [Roi(x0=8 * i, y0=0, x1=8 * i + 32, y1=32, label_id=i % 2)],
                                       rate_point=1, label_set_hash=lsh))
    return out


def make_config(**server_kw) -> CloudConfig:
    cfg = CloudConfig()
    kw = dict(host="127.0.0.1", port=0, maintenance_host="127.0.0.1", maintenance_port=0, metrics_host="127.0.0.1",
              metrics_port=0, grace_s=1.0, ack_every_frames=2, ack_interval_ms=50.0)
    cfg.server = dataclasses.replace(cfg.server, **{**kw, **server_kw})
    cfg.analytics = dataclasses.replace(cfg.analytics, kind="none")
    cfg.codec = dataclasses.replace(cfg.codec, warmup_size=32)
    return cfg


@pytest.fixture
async def make_server(tiny_codec):
    servers: list[CloudServer] = []

    async def factory(cfg: CloudConfig | None = None, *, detector=None, wait: bool = True) -> CloudServer:
        srv = CloudServer(cfg or make_config(), codec=tiny_codec, detector=detector or FakeDetector())
        await srv.start()
        servers.append(srv)
        if wait:
            await srv.wait_ready(TIMEOUT)
        return srv

    yield factory
    for srv in servers:
        await srv.stop(0.5)


def header(tiny_codec, camera: str = "cam-1", **kw) -> pb.EdgeMessage:
    h = dict(camera_id=camera, task="traffic", labels=LABELS, codec_id=tiny_codec.codec_id,
             weights_hash=tiny_codec.weights_hash, width=W, height=H, fps=10.0, edge_version="test")
    h.update(kw)
    return pb.EdgeMessage(header=pb.SessionHeader(**h))


def frame(seq: int, packet: bytes) -> pb.EdgeMessage:
    return pb.EdgeMessage(frame=pb.FramePacket(seq=seq, capture_ts_us=int(time.time() * 1e6), packet=packet,
                                               edge_boxes=[pb.Box(x0=0, y0=0, x1=32, y1=32, label="person")]))


async def read(call) -> pb.CloudMessage:
    msg = await asyncio.wait_for(call.read(), TIMEOUT)
    assert msg is not grpc.aio.EOF, "stream ended early"
    return msg


async def collect(call, *, until, limit: int = 100) -> list[pb.CloudMessage]:
    """Read messages until ``until(messages)`` holds (bounded in count and time)."""
    got: list[pb.CloudMessage] = []
    deadline = time.monotonic() + TIMEOUT
    for _ in range(limit):
        msg = await asyncio.wait_for(call.read(), max(0.01, deadline - time.monotonic()))
        if msg is grpc.aio.EOF:
            break
        got.append(msg)
        if until(got):
            return got
    raise AssertionError(f"condition not met; got {[m.WhichOneof('msg') for m in got]}")


def kinds(msgs, kind):
    return [getattr(m, kind) for m in msgs if m.WhichOneof("msg") == kind]


def acked(msgs) -> int:
    acks = kinds(msgs, "ack")
    return max(a.acked_seq for a in acks) if acks else -1


async def write_then_status(call, msg: pb.EdgeMessage) -> grpc.aio.AioRpcError:
    """Send ``msg`` and return the error the call ends with (the server may end it before the write lands)."""
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await call.write(msg)
        await asyncio.wait_for(call.read(), TIMEOUT)
    return ei.value


def channel(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}")


async def test_stream_end_to_end_results_and_acks(make_server, tiny_codec, packets):
    srv = await make_server()
    async with channel(srv.ports[0]) as ch:
        call = pb_grpc.LatentcastStub(ch).Stream()
        await call.write(header(tiny_codec))
        acc = await read(call)
        assert acc.WhichOneof("msg") == "accepted" and acc.accepted.next_seq == 0 and acc.accepted.session_id
        for seq, p in enumerate(packets[:3]):
            await call.write(frame(seq, p))
        await call.done_writing()
        msgs = []
        for _ in range(50):
            m = await asyncio.wait_for(call.read(), TIMEOUT)
            if m is grpc.aio.EOF:
                break
            msgs.append(m)
        assert await call.code() == grpc.StatusCode.OK
    results = kinds(msgs, "result")
    assert sorted(r.seq for r in results) == [0, 1, 2]
    for r, p in zip(sorted(results, key=lambda r: r.seq), packets, strict=False):
        assert r.packet_bytes == len(p) and r.bpp == pytest.approx(len(p) * 8 / (W * H), rel=1e-5)
        assert r.boxes[0].label == "person" and r.boxes[0].x1 == W / 2 and r.decode_ms > 0
        assert r.capture_ts_us > 0
    assert acked(msgs) == 2 and kinds(msgs, "ack")[-1].frames_received == 3
    assert not kinds(msgs, "error")
    assert srv.metrics.value("latentcast_cloud_frames_decoded_total") == 3


async def test_resume_after_reconnect_dedupes(make_server, tiny_codec, packets):
    det = FakeDetector()
    srv = await make_server(detector=det)
    async with channel(srv.ports[0]) as ch:
        stub = pb_grpc.LatentcastStub(ch)
        call = stub.Stream()
        await call.write(header(tiny_codec, camera="cam-r"))
        assert (await read(call)).accepted.next_seq == 0
        for seq in range(3):
            await call.write(frame(seq, packets[seq]))
        await collect(call, until=lambda ms: len(kinds(ms, "result")) == 3 and acked(ms) == 2)
        call.cancel()  # the network drops

        call2 = stub.Stream()
        await call2.write(header(tiny_codec, camera="cam-r"))
        acc = await read(call2)
        assert acc.accepted.next_seq == 3
        # a careless edge resends 1 and 2; then the new frame 3
        for seq in (1, 2, 3):
            await call2.write(frame(seq, packets[seq]))
        await call2.done_writing()
        msgs = await collect(call2, until=lambda ms: acked(ms) == 3 and len(kinds(ms, "result")) == 1)
        assert [r.seq for r in kinds(msgs, "result")] == [3]
        assert kinds(msgs, "ack")[-1].frames_received == 4
    assert det.calls == 1 + 4  # warm-up + 3 + 1: duplicates are never processed twice
    assert srv.metrics.value("latentcast_cloud_frames_duplicate_total") == 2
    assert srv.metrics.value("latentcast_cloud_reconnects_total") == 1


async def test_auth_token(make_server, tiny_codec):
    srv = await make_server(make_config(tokens=["s3cret", "other"]))
    async with channel(srv.ports[0]) as ch:
        stub = pb_grpc.LatentcastStub(ch)
        for md in ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)):
            err = await write_then_status(stub.Stream(metadata=md), header(tiny_codec))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        # a refused stream that never writes is refused too, once the wait for its first message is over
        silent = stub.Stream(metadata=(("authorization", "Bearer wrong"),))
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await asyncio.wait_for(silent.read(), TIMEOUT)
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        sub = stub.Subscribe(pb.SubscribeRequest(), metadata=(("authorization", "Bearer nope"),))
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await asyncio.wait_for(sub.read(), TIMEOUT)
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        call = stub.Stream(metadata=(("authorization", "Bearer other"),))
        await call.write(header(tiny_codec))
        assert (await read(call)).WhichOneof("msg") == "accepted"
        call.cancel()
    assert srv.metrics.value("latentcast_cloud_auth_rejections_total", {"reason": "unknown"}) == 3
    # the maintenance server needs no token
    async with channel(srv.ports[1]) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("field,value,needle", [
    ("codec_id", 2, "codec_id 2 (elic-paper)"),
    ("weights_hash", b"\x01" * 8, "0101010101010101"),
])
async def test_wrong_codec_is_failed_precondition(make_server, tiny_codec, field, value, needle):
    srv = await make_server()
    async with channel(srv.ports[0]) as ch:
        err = await write_then_status(pb_grpc.LatentcastStub(ch).Stream(), header(tiny_codec, **{field: value}))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert needle in err.details()
    ours = str(tiny_codec.codec_id) if field == "codec_id" else tiny_codec.weights_hash.hex()
    assert ours in err.details()


@pytest.mark.parametrize("first,needle", [
    (pb.EdgeMessage(frame=pb.FramePacket(seq=0, packet=b"x")), "first message must be a SessionHeader"),
    (None, "camera_id must not be empty"),
    ("size", "frame size 0x64"),
])
async def test_bad_session_header_is_invalid_argument(make_server, tiny_codec, first, needle):
    srv = await make_server()
    if first is None:
        first = header(tiny_codec, camera="")
    elif first == "size":
        first = header(tiny_codec, width=0)
    async with channel(srv.ports[0]) as ch:
        err = await write_then_status(pb_grpc.LatentcastStub(ch).Stream(), first)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.details()


async def test_malformed_packet_ends_only_its_stream(make_server, tiny_codec, packets):
    srv = await make_server()
    async with channel(srv.ports[0]) as ch:
        stub = pb_grpc.LatentcastStub(ch)
        good, bad = stub.Stream(), stub.Stream()
        await good.write(header(tiny_codec, camera="good"))
        await bad.write(header(tiny_codec, camera="bad"))
        assert (await read(good)).WhichOneof("msg") == "accepted"
        assert (await read(bad)).WhichOneof("msg") == "accepted"
        await good.write(frame(0, packets[0]))
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await bad.write(frame(0, b"LCF\x00\x07" + bytes(60)))  # version 7: not an LCF v1 packet
            await collect(bad, until=lambda ms: False)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "seq 0" in ei.value.details() and "version 7" in ei.value.details()
        again = stub.Stream()  # the refused frame counts as received: resending it cannot loop
        await again.write(header(tiny_codec, camera="bad"))
        assert (await read(again)).accepted.next_seq == 1
        again.cancel()
        for seq in (1, 2):
            await good.write(frame(seq, packets[seq]))
        await good.done_writing()
        msgs = await collect(good, until=lambda ms: len(kinds(ms, "result")) == 3 and acked(ms) == 2)
        assert not kinds(msgs, "error")
        assert await good.code() == grpc.StatusCode.OK
    assert srv.metrics.value("latentcast_cloud_stream_errors_total", {"code": "INVALID_ARGUMENT"}) == 1


async def test_per_frame_errors_keep_the_stream(make_server, tiny_codec, packets):
    srv = await make_server()
    p = Packet.from_bytes(packets[1])
    bad_sym = Packet(header=dataclasses.replace(p.header, symbol_crc=(p.header.symbol_crc + 1) % 2**32),
                     sections=p.sections).to_bytes()
    bad_crc = packets[2][:-1] + bytes([packets[2][-1] ^ 0xFF])
    other_labels = Packet(header=dataclasses.replace(p.header, label_set_hash=label_set_hash(["cat"])),
                          sections=p.sections).to_bytes()
    async with channel(srv.ports[0]) as ch:
        call = pb_grpc.LatentcastStub(ch).Stream()
        await call.write(header(tiny_codec))
        await read(call)
        sent = [packets[0], bad_sym, bad_crc, other_labels, packets[3]]
        for seq, data in enumerate(sent):
            await call.write(frame(seq, data))
        await call.done_writing()
        msgs = await collect(call, until=lambda ms: len(kinds(ms, "result")) + len(kinds(ms, "error")) == 5
                             and acked(ms) == 4)
    errors = {e.seq: e for e in kinds(msgs, "error")}
    assert {s: e.code for s, e in errors.items()} == {1: "checksum_mismatch", 2: "checksum_mismatch",
                                                       3: "label_set_mismatch"}
    assert "symbol checksum" in errors[1].message and "crc32" in errors[2].message
    assert sorted(r.seq for r in kinds(msgs, "result")) == [0, 4]


async def test_frame_size_mismatch_is_a_frame_error(make_server, tiny_codec, packets):
    srv = await make_server()
    async with channel(srv.ports[0]) as ch:
        call = pb_grpc.LatentcastStub(ch).Stream()
        await call.write(header(tiny_codec, width=128))
        await read(call)
        await call.write(frame(0, packets[0]))
        msgs = await collect(call, until=lambda ms: bool(kinds(ms, "error")))
        assert kinds(msgs, "error")[0].code == "frame_size_mismatch"
        assert "96x64" in kinds(msgs, "error")[0].message and "128x64" in kinds(msgs, "error")[0].message
        call.cancel()


async def test_oversized_message_is_resource_exhausted(make_server, tiny_codec):
    srv = await make_server(make_config(max_message_bytes=64 * 1024, max_packet_bytes=32 * 1024))
    async with channel(srv.ports[0]) as ch:
        call = pb_grpc.LatentcastStub(ch).Stream()
        await call.write(header(tiny_codec))
        await read(call)
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await call.write(frame(0, bytes(100 * 1024)))
            await collect(call, until=lambda ms: False)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # the packet limit of the service itself (below the message limit): INVALID_ARGUMENT
        call = pb_grpc.LatentcastStub(ch).Stream()
        await call.write(header(tiny_codec))
        await read(call)
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await call.write(frame(0, bytes(40 * 1024)))
            await collect(call, until=lambda ms: False)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_packet_bytes" in ei.value.details()


async def test_health_turns_serving_after_warmup_and_reflection(make_server, tiny_codec):
    gate = threading.Event()
    srv = await make_server(detector=FakeDetector(gate=gate), wait=False)
    async with channel(srv.ports[1]) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", SERVICE_NAME):
            resp = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
            assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
        async with channel(srv.ports[0]) as main:  # not ready: UNAVAILABLE
            err = await write_then_status(pb_grpc.LatentcastStub(main).Stream(), header(tiny_codec))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
        gate.set()
        await srv.wait_ready(TIMEOUT)
        resp = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=TIMEOUT)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING

        refl = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo()
        await refl.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        resp = await asyncio.wait_for(refl.read(), TIMEOUT)
        names = {s.name for s in resp.list_services_response.service}
        assert {"latentcast.v1.Latentcast", "grpc.health.v1.Health"} <= names
        await refl.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol="latentcast.v1.Latentcast"))
        resp = await asyncio.wait_for(refl.read(), TIMEOUT)
        assert resp.file_descriptor_response.file_descriptor_proto
        await refl.done_writing()


async def test_metrics_endpoint(make_server, tiny_codec, packets):
    srv = await make_server()
    async with channel(srv.ports[0]) as ch:
        call = pb_grpc.LatentcastStub(ch).Stream()
        await call.write(header(tiny_codec))
        await read(call)
        await call.write(frame(0, packets[0]))
        await call.done_writing()
        await collect(call, until=lambda ms: bool(kinds(ms, "result")) and acked(ms) == 0)

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.ports[2]}/metrics", timeout=TIMEOUT) as r:
            return r.read().decode()

    text = await asyncio.to_thread(get)
    assert "latentcast_cloud_frames_received_total 1.0" in text
    assert "latentcast_cloud_frames_decoded_total 1.0" in text
    assert f"latentcast_cloud_bytes_received_total {float(len(packets[0]))}" in text
    assert 'latentcast_cloud_stage_seconds_count{stage="decode"} 1.0' in text
    assert 'latentcast_cloud_frames_dropped_total{reason="cloud_overloaded"} 0.0' in text
    assert "latentcast_cloud_packet_bpp_count 1.0" in text


async def test_subscribe_receives_jpeg_frames_and_detections(make_server, tiny_codec, packets):
    cv2 = pytest.importorskip("cv2")
    srv = await make_server()
    async with channel(srv.ports[0]) as ch:
        stub = pb_grpc.LatentcastStub(ch)
        sub = stub.Subscribe(pb.SubscribeRequest(camera_id="cam-s", format=pb.IMAGE_FORMAT_JPEG, jpeg_quality=80))
        other = stub.Subscribe(pb.SubscribeRequest(camera_id="somebody-else"))
        png = stub.Subscribe(pb.SubscribeRequest(task="traffic", format=pb.IMAGE_FORMAT_PNG))
        for _ in range(100):  # bounded: wait until the subscriptions are registered
            if len(srv.fanout) == 3:
                break
            await asyncio.sleep(0.02)
        assert len(srv.fanout) == 3
        call = stub.Stream()
        await call.write(header(tiny_codec, camera="cam-s"))
        await read(call)
        for seq in range(2):
            await call.write(frame(seq, packets[seq]))
        await call.done_writing()
        got = [await asyncio.wait_for(sub.read(), TIMEOUT) for _ in range(2)]
        assert [g.seq for g in got] == [0, 1]
        for g in got:
            assert g.camera_id == "cam-s" and g.task == "traffic" and (g.width, g.height) == (W, H)
            assert g.format == pb.IMAGE_FORMAT_JPEG and g.image[:2] == b"\xff\xd8"
            img = cv2.imdecode(np.frombuffer(g.image, np.uint8), cv2.IMREAD_COLOR)
            assert img.shape == (H, W, 3)
            assert g.boxes[0].label == "person" and g.edge_boxes[0].label == "person"
            assert g.packet_bytes == len(packets[g.seq])
            assert g.mode == "frame roi q1" and g.bpp == pytest.approx(len(packets[g.seq]) * 8 / (W * H))
            assert g.decode_ms > 0 and g.latency_ms > 0
            # the camera's counters include this frame: a subscriber derives fps and kbit/s from them
            assert g.camera.frames_analysed == g.seq + 1 and g.camera.frames_received >= g.seq + 1
            assert g.camera.bytes_received >= sum(len(p) for p in packets[:g.seq + 1])
            assert g.camera.frames_failed == 0
        p = await asyncio.wait_for(png.read(), TIMEOUT)
        assert p.format == pb.IMAGE_FORMAT_PNG and p.image[:4] == b"\x89PNG"
        await collect(call, until=lambda ms: acked(ms) == 1 and len(kinds(ms, "result")) == 2)
        with pytest.raises(asyncio.TimeoutError):  # filtered out: nothing for another camera
            await asyncio.wait_for(other.read(), 0.3)
        sub.cancel()
        other.cancel()
        png.cancel()


async def stream_frames(srv, tiny_codec, packets, n: int, *, until) -> list:
    """One stream: header, frames 0..n-1 (cycling ``packets``), half-close; the messages read until ``until``."""
    async with channel(srv.ports[0]) as ch:
        call = pb_grpc.LatentcastStub(ch).Stream()
        await call.write(header(tiny_codec))
        await read(call)
        for seq in range(n):
            await call.write(frame(seq, packets[seq % len(packets)]))
        await call.done_writing()
        return await collect(call, until=until)


async def test_slow_pipeline_drops_are_bounded_and_counted(make_server, tiny_codec, packets):
    """Without backpressure the cloud drops by its policy and says so per frame."""
    cfg = make_config(ack_every_frames=100)
    cfg.pipeline = dataclasses.replace(cfg.pipeline, max_queued_per_session=2, max_queued_total=4, max_batch=1,
                                       batch_wait_ms=0.0, backpressure=False)
    det = FakeDetector(delay=0.15)
    srv = await make_server(cfg, detector=det)
    n = 10
    msgs = await stream_frames(srv, tiny_codec, packets, n,
                               until=lambda ms: len(kinds(ms, "result")) + len(kinds(ms, "error")) == n
                               and acked(ms) == n - 1)
    errors = kinds(msgs, "error")
    results = kinds(msgs, "result")
    assert errors and all(e.code == "cloud_overloaded" for e in errors)
    assert len(results) <= 4 and len(results) + len(errors) == n
    assert results[-1].seq == n - 1  # drop_oldest: the newest frame survives
    dropped = srv.metrics.value("latentcast_cloud_frames_dropped_total", {"reason": "cloud_overloaded"})
    assert dropped == len(errors) and det.calls == len(results) + 1  # + the warm-up frame


async def test_backpressure_pauses_the_stream_instead_of_dropping(make_server, tiny_codec, packets):
    """With backpressure (the default) a full pipeline stops reading the stream: nothing is dropped
    at the cloud, every frame is analysed, and the pipeline never holds more than the limit."""
    cfg = make_config(ack_every_frames=100)
    cfg.pipeline = dataclasses.replace(cfg.pipeline, max_queued_per_session=2, max_batch=1, batch_wait_ms=0.0)
    det = FakeDetector(delay=0.05)
    srv = await make_server(cfg, detector=det)
    n, peak = 8, 0

    async def watch():
        nonlocal peak
        while True:
            peak = max(peak, srv.pipeline.queue_depth)
            await asyncio.sleep(0.005)

    w = asyncio.create_task(watch())
    msgs = await stream_frames(srv, tiny_codec, packets, n,
                               until=lambda ms: len(kinds(ms, "result")) == n and acked(ms) == n - 1)
    w.cancel()
    assert not kinds(msgs, "error") and [r.seq for r in kinds(msgs, "result")] == list(range(n))
    assert peak <= 2


async def test_newer_stream_of_a_camera_supersedes_the_older(make_server, tiny_codec, packets):
    srv = await make_server()
    async with channel(srv.ports[0]) as ch:
        stub = pb_grpc.LatentcastStub(ch)
        old = stub.Stream()
        await old.write(header(tiny_codec, camera="cam-x"))
        await read(old)
        await old.write(frame(0, packets[0]))
        await collect(old, until=lambda ms: bool(kinds(ms, "result")))
        new = stub.Stream()
        await new.write(header(tiny_codec, camera="cam-x"))
        assert (await read(new)).accepted.next_seq == 1
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await collect(old, until=lambda ms: False)
        assert ei.value.code() == grpc.StatusCode.ABORTED and "superseded" in ei.value.details()
        await new.write(frame(1, packets[1]))
        await new.done_writing()
        msgs = await collect(new, until=lambda ms: acked(ms) == 1 and bool(kinds(ms, "result")))
        assert [r.seq for r in kinds(msgs, "result")] == [1]


async def test_graceful_stop_ends_streams_with_unavailable(tiny_codec, packets):
    srv = CloudServer(make_config(), codec=tiny_codec, detector=FakeDetector(delay=0.05))
    await srv.start()
    await srv.wait_ready(TIMEOUT)
    try:
        async with channel(srv.ports[0]) as ch:
            stub = pb_grpc.LatentcastStub(ch)
            call = stub.Stream()
            await call.write(header(tiny_codec))
            await read(call)
            sub = stub.Subscribe(pb.SubscribeRequest())
            for seq in range(3):
                await call.write(frame(seq, packets[seq]))
            msgs = await collect(call, until=lambda ms: acked(ms) == 2)
            stopping = asyncio.create_task(srv.stop(2.0))
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                msgs += await collect(call, until=lambda ms: False)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE and "reconnect" in ei.value.details()
            for _ in range(10):  # subscribers end cleanly after their queued frames
                if await asyncio.wait_for(sub.read(), TIMEOUT) is grpc.aio.EOF:
                    break
            assert await asyncio.wait_for(sub.code(), TIMEOUT) == grpc.StatusCode.OK
            await asyncio.wait_for(stopping, TIMEOUT)
    finally:
        await srv.stop(0.5)


async def test_serve_forever_until_stop_requested(tiny_codec):
    srv = CloudServer(make_config(), codec=tiny_codec, detector=FakeDetector())
    task = asyncio.create_task(srv.serve_forever())
    await asyncio.wait_for(srv._ready.wait(), TIMEOUT)
    assert srv.ready and not task.done()
    srv.request_stop()
    await asyncio.wait_for(task, TIMEOUT)


async def test_serve_forever_raises_when_loading_fails(tiny_codec, tmp_path):
    cfg = make_config()
    cfg.codec = dataclasses.replace(cfg.codec, weights=str(tmp_path / "missing.safetensors"))
    srv = CloudServer(cfg, detector=FakeDetector())
    with pytest.raises(RuntimeError, match="missing.safetensors"):
        await asyncio.wait_for(srv.serve_forever(), TIMEOUT)


@pytest.mark.parametrize("window", [0, 2])
async def test_acks_keep_up_with_the_edge_window(make_server, tiny_codec, packets, window):
    """An edge that waits for an Ack after max_in_flight frames says so in its SessionHeader; the cloud then acks
    at least that often, so its cumulative acks (ack_every_frames, ack_interval_ms) never throttle the edge. Without
    it (an older edge, 0) acks follow the server's settings: here none comes within the test's wait."""
    srv = await make_server(make_config(ack_every_frames=100, ack_interval_ms=60_000.0))
    async with channel(srv.ports[0]) as ch:
        call = pb_grpc.LatentcastStub(ch).Stream()
        await call.write(header(tiny_codec, max_in_flight=window))
        await read(call)
        for seq in range(2):
            await call.write(frame(seq, packets[seq]))
        if window:
            msgs = await collect(call, until=lambda ms: acked(ms) == 1)
            assert [a.acked_seq for a in kinds(msgs, "ack")] == [1]
        else:
            msgs = await collect(call, until=lambda ms: len(kinds(ms, "result")) == 2)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 0.5:
                try:
                    msgs.append(await asyncio.wait_for(call.read(), 0.5))
                except asyncio.TimeoutError:
                    break
            assert not kinds(msgs, "ack")
        call.cancel()
