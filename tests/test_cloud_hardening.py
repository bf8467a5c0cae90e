"""Issue 15, items 5 and 6: hostile or careless clients against a loopback cloud (port 0, tiny codec).

- Bytes that are not a protobuf message end their call with INVALID_ARGUMENT (first message, a later
  one, a Subscribe request), with one rate-limited log line naming the peer and no traceback.
- Refused bearer tokens are logged a few times per interval with the peer, not once per call.
- Edge boxes are checked at the boundary: a frame with a non-finite, out-of-frame, unknown-label or
  bad-score box, or too many boxes, gets a per-frame ``invalid_edge_boxes`` error; the stream and
  the other streams go on, and the JSON-lines sink only ever holds valid JSON.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time

import grpc
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from google.protobuf.message import DecodeError  # noqa: E402

from latentcast.cloud.analytics import Detection  # noqa: E402
from latentcast.cloud.config import CloudConfig  # noqa: E402
from latentcast.cloud.pipeline import AnalysedFrame, FrameJob  # noqa: E402
from latentcast.cloud.server import MAX_EDGE_BOXES, CloudServer  # noqa: E402
from latentcast.cloud.sessions import SessionSpec  # noqa: E402
from latentcast.cloud.sinks import JsonlSink  # noqa: E402
from latentcast.proto import latentcast_v1_pb2 as pb  # noqa: E402
from latentcast.proto import latentcast_v1_pb2_grpc as pb_grpc  # noqa: E402
from latentcast.proto.bitstream import MAX_ROIS, Roi  # noqa: E402
from latentcast.proto.ids import label_set_hash  # noqa: E402

LABELS = ["person", "car"]
W, H = 96, 64
TIMEOUT = 10.0
STREAM = "/latentcast.v1.Latentcast/Stream"
SUBSCRIBE = "/latentcast.v1.Latentcast/Subscribe"


class FakeDetector:
    labels = ["person", "car"]

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        h, w = rgb.shape[:2]
        return [Detection(x0=1.0, y0=2.0, x1=w / 2, y1=h / 2, class_id=0, label="person", score=0.9)]


@pytest.fixture(scope="module")
def packets(tiny_codec) -> list[bytes]:
    rng = np.random.default_rng(0)
    lsh = label_set_hash(LABELS)
    return [tiny_codec.compress((rng.random((H, W, 3)) * 255).astype(np.uint8),
                                [Roi(x0=8 * i, y0=0, x1=8 * i + 32, y1=32, label_id=i % 2)], rate_point=1,
                                label_set_hash=lsh) for i in range(2)]


def make_config(**server_kw) -> CloudConfig:
    cfg = CloudConfig()
    kw = dict(host="127.0.0.1", port=0, maintenance_port=-1, metrics_port=-1, grace_s=0.5, ack_every_frames=1,
              ack_interval_ms=20.0)
    cfg.server = dataclasses.replace(cfg.server, **{**kw, **server_kw})
    cfg.analytics = dataclasses.replace(cfg.analytics, kind="none")
    cfg.codec = dataclasses.replace(cfg.codec, warmup_size=32)
    cfg.pipeline = dataclasses.replace(cfg.pipeline, batch_wait_ms=0.0)
    return cfg


@pytest.fixture
async def make_server(tiny_codec):
    servers: list[CloudServer] = []

    async def factory(cfg: CloudConfig | None = None) -> CloudServer:
        srv = CloudServer(cfg or make_config(), codec=tiny_codec, detector=FakeDetector())
        await srv.start()
        servers.append(srv)
        await srv.wait_ready(TIMEOUT)
        return srv

    yield factory
    for srv in servers:
        await srv.stop(0.5)


@pytest.fixture
def logs(caplog) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO)
    return caplog


# grpc.aio's client reports this INTERNAL status instead of the server's when one of its writes loses the race
# with the server ending the call (grpc/grpc#36066, fix proposed in grpc/grpc#43486): a client-side artefact
CLIENT_WRITE_RACE = "Internal error from Core"


def _grpc_multi_loop_noise(r: logging.LogRecord) -> bool:
    """grpc.aio's poller, bound to the event loops of earlier tests in this process (pytest-asyncio makes one
    per test), logs a spurious BlockingIOError through asyncio when another loop took its wake-up byte
    (grpc/grpc#25364; harmless, fix proposed in grpc/grpc#36096). Not the server's traceback."""
    exc = r.exc_info[1] if r.exc_info else None
    return r.name == "asyncio" and isinstance(exc, BlockingIOError) and "PollerCompletionQueue" in r.getMessage()


def assert_no_traceback(caplog) -> None:
    tracebacks = [r for r in caplog.records if (r.exc_info or r.exc_text) and not _grpc_multi_loop_noise(r)]
    assert not tracebacks, [f"{r.name}: {r.getMessage()}" for r in tracebacks]


def lines_with(caplog, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]


def header(tiny_codec, camera: str = "cam-1") -> pb.EdgeMessage:
    return pb.EdgeMessage(header=pb.SessionHeader(
        camera_id=camera, task="traffic", labels=LABELS, codec_id=tiny_codec.codec_id,
        weights_hash=tiny_codec.weights_hash, width=W, height=H, fps=10.0, edge_version="test"))


def frame(seq: int, packet: bytes, boxes=None) -> pb.EdgeMessage:
    if boxes is None:
        boxes = [pb.Box(x0=0, y0=0, x1=32, y1=32, label="person", label_id=0, score=0.5)]
    return pb.EdgeMessage(frame=pb.FramePacket(seq=seq, capture_ts_us=int(time.time() * 1e6), packet=packet,
                                               edge_boxes=boxes))


def garbage(seed: int = 0, n: int = 64) -> bytes:
    """Random bytes that are not an EdgeMessage / SubscribeRequest (checked, so the test means what it says)."""
    rng = np.random.default_rng(seed)
    data = b"\xff" + rng.integers(0, 256, n, dtype=np.uint8).tobytes()  # a tag of wire type 7: never valid
    for cls in (pb.EdgeMessage, pb.SubscribeRequest):
        with pytest.raises(DecodeError):
            cls.FromString(data)
    return data


def raw_stream(ch: grpc.aio.Channel, metadata=()):
    """A Stream call that sends bytes as they are and reads CloudMessages."""
    return ch.stream_stream(STREAM, request_serializer=lambda b: b,
                            response_deserializer=pb.CloudMessage.FromString)(metadata=metadata)


async def status_of(call, *writes) -> grpc.aio.AioRpcError:
    """Write ``writes``, then read until the call ends; the error it ends with (the server may end the
    call before a write lands)."""
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        for msg in writes:
            await call.write(msg)
        for _ in range(100):
            if await asyncio.wait_for(call.read(), TIMEOUT) is grpc.aio.EOF:
                break
    return ei.value


async def collect(call, *, until, limit: int = 200) -> list[pb.CloudMessage]:
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


def channel(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}")


def strict_json(line: str):
    """json.loads that refuses NaN/Infinity (not JSON), as every other JSON parser does."""
    def no_constants(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(line, parse_constant=no_constants)


# ------------------------------------------------------------------------------- item 5: bad protobuf

async def test_garbage_first_message_is_invalid_argument(make_server, logs):
    srv = await make_server()
    async with channel(srv.ports[0]) as ch:
        err = await status_of(raw_stream(ch), garbage())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert "EdgeMessage" in err.details()
    assert_no_traceback(logs)
    ended = lines_with(logs, ": INVALID_ARGUMENT: ")
    assert len(ended) == 1 and "127.0.0.1" in ended[0], ended  # the peer is named
    assert srv.metrics.value("latentcast_cloud_stream_errors_total", {"code": "INVALID_ARGUMENT"}) == 1


async def test_garbage_after_header_is_invalid_argument_and_spares_other_streams(make_server, tiny_codec,
                                                                                 packets, logs):
    srv = await make_server()
    async with channel(srv.ports[0]) as ch:
        good = pb_grpc.LatentcastStub(ch).Stream()
        await good.write(header(tiny_codec, camera="good"))
        assert (await collect(good, until=lambda ms: True))[0].WhichOneof("msg") == "accepted"
        await good.write(frame(0, packets[0]))

        bad = raw_stream(ch)
        await bad.write(header(tiny_codec, camera="bad").SerializeToString())
        assert (await asyncio.wait_for(bad.read(), TIMEOUT)).WhichOneof("msg") == "accepted"
        await bad.write(frame(0, packets[0]).SerializeToString())
        err = await status_of(bad, garbage(1))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
        assert "EdgeMessage" in err.details()

        await good.write(frame(1, packets[1]))
        await good.done_writing()
        msgs = await collect(good, until=lambda ms: len(kinds(ms, "result")) == 2)
        assert not kinds(msgs, "error")
    assert_no_traceback(logs)
    ended = lines_with(logs, ": INVALID_ARGUMENT: ")
    assert len(ended) == 1 and "127.0.0.1" in ended[0], ended


async def test_garbage_subscribe_request_is_invalid_argument(make_server, logs):
    srv = await make_server()
    async with channel(srv.ports[0]) as ch:
        call = ch.unary_stream(SUBSCRIBE, request_serializer=lambda b: b,
                               response_deserializer=pb.FrameResult.FromString)(garbage(2))
        err = await status_of(call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert "SubscribeRequest" in err.details()
    assert_no_traceback(logs)
    assert any("127.0.0.1" in s for s in lines_with(logs, ": INVALID_ARGUMENT: "))


async def test_garbage_flood_is_logged_a_few_times(make_server, logs):
    srv = await make_server()
    n = 40
    async with channel(srv.ports[0]) as ch:
        for i in range(n):
            assert (await status_of(raw_stream(ch), garbage(i))).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_no_traceback(logs)
    ended = lines_with(logs, ": INVALID_ARGUMENT: ")
    assert 1 <= len(ended) <= 3 and "127.0.0.1" in ended[0], ended
    assert srv.metrics.value("latentcast_cloud_stream_errors_total", {"code": "INVALID_ARGUMENT"}) == n


async def test_refused_tokens_are_rate_limited_and_name_the_peer(make_server, tiny_codec, logs):
    srv = await make_server(make_config(tokens=["s3cret"]))
    n = 60
    async with channel(srv.ports[0]) as ch:
        stub = pb_grpc.LatentcastStub(ch)
        for i in range(n):
            md = (("authorization", f"Bearer wrong-{i}"),)
            err = await status_of(stub.Stream(metadata=md), header(tiny_codec))
            if err.code() == grpc.StatusCode.INTERNAL and err.details() == CLIENT_WRITE_RACE:
                n += 1  # the client hid the server's status (see CLIENT_WRITE_RACE); the server counted it: again
                err = await status_of(stub.Stream(metadata=md), header(tiny_codec))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        garbled = raw_stream(ch, metadata=(("authorization", "Bearer nope"),))  # refused before it is parsed
        assert (await status_of(garbled, garbage(3))).code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.Stream(metadata=(("authorization", "Bearer s3cret"),))
        await ok.write(header(tiny_codec))
        assert (await collect(ok, until=lambda ms: True))[0].WhichOneof("msg") == "accepted"
        ok.cancel()
    assert srv.metrics.value("latentcast_cloud_auth_rejections_total", {"reason": "unknown"}) == n + 1
    refused = [r.getMessage() for r in logs.records if "bearer token" in r.getMessage()]
    assert 1 <= len(refused) <= 3, refused
    assert "127.0.0.1" in refused[0] and "unknown" in refused[0]
    assert not any("s3cret" in r.getMessage() or "wrong-" in r.getMessage() for r in logs.records)
    assert_no_traceback(logs)


# ------------------------------------------------------------------------------- item 6: edge boxes

BAD_BOXES = {
    "nan": [pb.Box(x0=math.nan, y0=0, x1=10, y1=10, label="person")],
    "infinity": [pb.Box(x0=0, y0=0, x1=math.inf, y1=10, label="person")],
    "outside": [pb.Box(x0=0, y0=0, x1=W + 50, y1=10, label="person")],
    "negative": [pb.Box(x0=-5, y0=0, x1=10, y1=10, label="person")],
    "inverted": [pb.Box(x0=20, y0=0, x1=10, y1=10, label="person")],
    "label_id_4e9": [pb.Box(x0=0, y0=0, x1=10, y1=10, label="person", label_id=4_000_000_000)],
    "label_id_past_list": [pb.Box(x0=0, y0=0, x1=10, y1=10, label="", label_id=len(LABELS))],
    "control_label": [pb.Box(x0=0, y0=0, x1=10, y1=10, label="per\x00son\n{", label_id=0)],
    "other_label": [pb.Box(x0=0, y0=0, x1=10, y1=10, label="car", label_id=0)],
    "score_nan": [pb.Box(x0=0, y0=0, x1=10, y1=10, label="person", score=math.nan)],
    "score_above_1": [pb.Box(x0=0, y0=0, x1=10, y1=10, label="person", score=1.5)],
    "too_many": [pb.Box(x0=0, y0=0, x1=10, y1=10, label="person")] * (MAX_EDGE_BOXES + 1),
}


def test_edge_box_limit_is_the_bitstreams():
    assert MAX_EDGE_BOXES == MAX_ROIS == 1024


@pytest.mark.parametrize("case", sorted(BAD_BOXES))
async def test_bad_edge_boxes_are_a_frame_error(make_server, tiny_codec, packets, tmp_path, logs, case):
    cfg = make_config()
    cfg.sinks = dataclasses.replace(cfg.sinks, jsonl_path=str(tmp_path / "frames.jsonl"))
    srv = await make_server(cfg)
    async with channel(srv.ports[0]) as ch:
        call = pb_grpc.LatentcastStub(ch).Stream()
        await call.write(header(tiny_codec))
        await collect(call, until=lambda ms: True)
        await call.write(frame(0, packets[0], boxes=BAD_BOXES[case]))
        await call.write(frame(1, packets[1]))  # the stream goes on
        await call.done_writing()
        msgs = await collect(call, until=lambda ms: len(kinds(ms, "error")) + len(kinds(ms, "result")) == 2
                             and any(a.acked_seq == 1 for a in kinds(ms, "ack")))
        assert await call.code() == grpc.StatusCode.OK
    errors = kinds(msgs, "error")
    assert [(e.seq, e.code) for e in errors] == [(0, "invalid_edge_boxes")], errors
    assert "edge box" in errors[0].message
    assert [r.seq for r in kinds(msgs, "result")] == [1]
    assert srv.metrics.value("latentcast_cloud_frame_errors_total", {"code": "invalid_edge_boxes"}) == 1
    assert_no_traceback(logs)
    srv.jsonl.close()
    lines = (tmp_path / "frames.jsonl").read_text(encoding="utf-8").splitlines()
    records = [strict_json(s) for s in lines]
    assert [r["seq"] for r in records] == [1]
    assert records[0]["edge_boxes"] == [{"x0": 0.0, "y0": 0.0, "x1": 32.0, "y1": 32.0, "label": "person",
                                         "class_id": 0, "score": 0.5}]


async def test_good_edge_boxes_pass_and_take_the_sessions_label(make_server, tiny_codec, packets):
    srv = await make_server()
    boxes = [pb.Box(x0=0, y0=0, x1=W, y1=H, label="car", label_id=1, score=1.0),  # the whole frame
             pb.Box(x0=3.5, y0=4.25, x1=3.5, y1=9, label="", label_id=0, score=0.0),  # no text: the session's
             ] + [pb.Box(x0=1, y0=1, x1=2, y1=2, label="person")] * (MAX_EDGE_BOXES - 2)
    async with channel(srv.ports[0]) as ch:
        stub = pb_grpc.LatentcastStub(ch)
        sub = stub.Subscribe(pb.SubscribeRequest(camera_id="cam-1"))
        for _ in range(200):
            if len(srv.fanout) == 1:
                break
            await asyncio.sleep(0.01)
        call = stub.Stream()
        await call.write(header(tiny_codec))
        await collect(call, until=lambda ms: True)
        await call.write(frame(0, packets[0], boxes=boxes))
        msgs = await collect(call, until=lambda ms: bool(kinds(ms, "result") or kinds(ms, "error")))
        assert not kinds(msgs, "error"), kinds(msgs, "error")
        got = await asyncio.wait_for(sub.read(), TIMEOUT)
        call.cancel()
        sub.cancel()
    assert len(got.edge_boxes) == MAX_EDGE_BOXES
    assert [(b.label, b.label_id) for b in got.edge_boxes[:2]] == [("car", 1), ("person", 0)]


# ------------------------------------------------------------------------------- item 6: the sink

SPEC = SessionSpec(camera_id="cam", task="traffic", labels=tuple(LABELS), label_set_hash=label_set_hash(LABELS),
                   width=W, height=H, fps=10.0, edge_version="test")


def analysed(*, spec: SessionSpec = SPEC, seq: int = 0, detections=(), edge_boxes=(), bpp: float = 0.5,
             decode_ms: float = 1.0) -> AnalysedFrame:
    job = FrameJob(stream_id="s", spec=spec, seq=seq, capture_ts_us=1, packet=b"", packet_bytes=10,
                   edge_boxes=tuple(edge_boxes))
    return AnalysedFrame(job=job, frame=np.zeros((H, W, 3), np.uint8), detections=list(detections), queue_ms=0.5,
                         decode_ms=decode_ms, analytics_ms=1.0, compose_ms=0.0, capture_to_result_ms=None, bpp=bpp)


def test_jsonl_sink_never_writes_nan_or_infinity(tmp_path):
    """The sink's last line of defence: whatever reaches it (a detector that returns NaN, a bad
    latency), every line is strict JSON; non-finite numbers become null."""
    path = tmp_path / "frames.jsonl"
    sink = JsonlSink(path=path)
    nan = float("nan")
    sink(analysed(detections=[Detection(x0=nan, y0=float("inf"), x1=3, y1=4, class_id=0, label="person",
                                        score=float("-inf"))],
                  edge_boxes=[Detection(x0=1, y0=2, x1=3, y1=4, class_id=4_000_000_000, label="person", score=nan)],
                  bpp=nan, decode_ms=float("inf")))
    sink.close()
    (line,) = path.read_text(encoding="utf-8").splitlines()
    rec = strict_json(line)
    assert rec["boxes"][0]["x0"] is None and rec["boxes"][0]["y0"] is None and rec["boxes"][0]["score"] is None
    assert rec["boxes"][0]["x1"] == 3 and rec["edge_boxes"][0]["score"] is None
    assert rec["bpp"] is None and rec["latency_ms"]["decode"] is None


def test_jsonl_sink_round_trips_control_characters(tmp_path):
    """Control characters, quotes, backslashes and the line separators that str.splitlines() splits
    on (U+2028, U+0085) in camera ids and labels stay inside their JSON line and come back as they went."""
    nasty = "a\x00b\x1f\n\r\t\"\\\u2028\u2029\u0085\x7f\u00e9\U0001f600"
    path = tmp_path / "frames.jsonl"
    sink = JsonlSink(path=path)
    spec = dataclasses.replace(SPEC, camera_id="cam" + nasty, task="t" + nasty)
    det = Detection(x0=1, y0=2, x1=3, y1=4, class_id=0, label="l" + nasty, score=0.5)
    for seq in range(3):
        sink(analysed(spec=spec, seq=seq, detections=[det], edge_boxes=[det]))
    sink.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    for seq, line in enumerate(lines):
        rec = strict_json(line)
        assert rec["seq"] == seq and rec["camera_id"] == "cam" + nasty and rec["task"] == "t" + nasty
        assert rec["boxes"][0]["label"] == "l" + nasty and rec["edge_boxes"][0]["label"] == "l" + nasty
