"""cloud.pipeline: per-frame error codes, worker pool, bounded queue and drop policies; cloud.sinks."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from latentcast.cloud.analytics import Detection  # noqa: E402
from latentcast.cloud.config import PipelineConfig  # noqa: E402
from latentcast.cloud.metrics import CloudMetrics  # noqa: E402
from latentcast.cloud.pipeline import AnalysedFrame, FrameFailure, FrameJob, Pipeline  # noqa: E402
from latentcast.cloud.sessions import SessionSpec  # noqa: E402
from latentcast.cloud.sinks import FanOut, JsonlSink, encode_image  # noqa: E402
from latentcast.proto import latentcast_v1_pb2 as pb  # noqa: E402
from latentcast.proto.bitstream import Packet, Roi  # noqa: E402
from latentcast.proto.ids import label_set_hash  # noqa: E402

LABELS = ("person", "car")
W, H = 96, 64
TIMEOUT = 10.0


class FakeDetector:
    labels = ["person", "car"]

    def __init__(self, *, gate: threading.Event | None = None, fail: bool = False) -> None:
        self.gate = gate
        self.fail = fail
        self.calls = 0

    def detect(self, rgb):
        if self.gate is not None:
            self.gate.wait(TIMEOUT)
        self.calls += 1
        if self.fail:
            raise RuntimeError("detector exploded")
        return [Detection(x0=0.0, y0=0.0, x1=10.0, y1=10.0, class_id=1, label="car", score=0.5)]


SPEC = SessionSpec(camera_id="cam", task="traffic", labels=LABELS, label_set_hash=label_set_hash(LABELS), width=W,
                   height=H, fps=10.0, edge_version="t")


@pytest.fixture(scope="module")
def packet(tiny_codec) -> bytes:
    img = (np.random.default_rng(1).random((H, W, 3)) * 255).astype(np.uint8)
    return tiny_codec.compress(img, [Roi(x0=0, y0=0, x1=48, y1=32, label_id=1)], rate_point=1,
                               label_set_hash=label_set_hash(LABELS))


def job(data, seq: int = 0, *, spec: SessionSpec = SPEC, stream: str = "s1", deliver=None) -> FrameJob:
    return FrameJob(stream_id=stream, spec=spec, seq=seq, capture_ts_us=int(time.time() * 1e6), packet=data,
                    packet_bytes=len(data) if isinstance(data, bytes) else 100, deliver=deliver)


def repack(data: bytes, **header) -> bytes:
    p = Packet.from_bytes(data)
    return Packet(header=dataclasses.replace(p.header, **header), sections=p.sections).to_bytes()


def test_process_decodes_and_detects(tiny_codec, packet):
    pipe = Pipeline(codec=tiny_codec, detector=FakeDetector())
    out = pipe.process(job(packet))
    assert isinstance(out, AnalysedFrame)
    assert out.frame.shape == (H, W, 3) and out.frame.dtype == np.uint8
    assert out.detections[0].label == "car"
    assert out.bpp == pytest.approx(len(packet) * 8 / (W * H))
    assert out.decode_ms > 0 and out.analytics_ms >= 0 and out.queue_ms >= 0
    assert out.capture_to_result_ms is not None and out.capture_to_result_ms >= 0
    # the same frame through a parsed Packet decodes the same
    again = pipe.process(job(Packet.from_bytes(packet)))
    np.testing.assert_array_equal(again.frame, out.frame)


def test_process_error_codes(tiny_codec, packet):
    pipe = Pipeline(codec=tiny_codec, detector=FakeDetector())
    flipped = packet[:-1] + bytes([packet[-1] ^ 1])
    cases = {
        "malformed_packet": b"not a packet at all, but long enough to be parsed as one" * 2,
        "checksum_mismatch": flipped,
        "wrong_codec": repack(packet, weights_hash=b"\xaa" * 8),
        "label_set_mismatch": repack(packet, label_set_hash=label_set_hash(["cat"])),
        "decode_failed": repack(packet, rate_point=9),
    }
    for code, data in cases.items():
        out = pipe.process(job(data))
        assert isinstance(out, FrameFailure) and out.code == code, (code, out)
    sym = pipe.process(job(repack(packet, symbol_crc=1)))
    assert sym.code == "checksum_mismatch" and "symbol checksum" in sym.message
    wrong = pipe.process(job(repack(packet, weights_hash=b"\xaa" * 8)))
    assert "aaaaaaaaaaaaaaaa" in wrong.message and tiny_codec.weights_hash.hex() in wrong.message
    size = pipe.process(job(packet, spec=dataclasses.replace(SPEC, width=W * 2)))
    assert size.code == "frame_size_mismatch" and f"{W}x{H}" in size.message
    few = dataclasses.replace(SPEC, labels=("person",), label_set_hash=label_set_hash(["person"]))
    ids = pipe.process(job(repack(packet, label_set_hash=few.label_set_hash), spec=few))
    assert ids.code == "label_set_mismatch" and "label id" in ids.message
    boom = Pipeline(codec=tiny_codec, detector=FakeDetector(fail=True)).process(job(packet))
    assert boom.code == "analytics_failed" and "exploded" in boom.message


def _collector():
    got: list = []
    done = threading.Condition()

    def deliver(outcome):
        with done:
            got.append(outcome)
            done.notify_all()

    def wait(n: int) -> list:
        with done:
            assert done.wait_for(lambda: len(got) >= n, TIMEOUT), f"only {len(got)} of {n} outcomes"
        return list(got)

    return deliver, wait


class _BrokenCodec:
    """The tiny codec, but decompress raises an unexpected error for one seq."""

    def __init__(self, codec, bad_seq_bytes: bytes) -> None:
        self._c = codec
        self._bad = bad_seq_bytes
        self.codec_id, self.weights_hash = codec.codec_id, codec.weights_hash
        self.latent_space_id = codec.latent_space_id

    def decompress(self, packet):
        if packet.to_bytes() == self._bad:
            raise RuntimeError("unexpected")
        return self._c.decompress(packet)


def test_workers_survive_bad_frames_and_metrics_count(tiny_codec, packet):
    m = CloudMetrics()
    bad = repack(packet, symbol_crc=7)
    broken = repack(packet, symbol_crc=8)
    pipe = Pipeline(codec=_BrokenCodec(tiny_codec, broken), detector=FakeDetector(), metrics=m,
                    config=PipelineConfig(workers=2, max_batch=2, batch_wait_ms=1.0, max_queued_per_session=8))
    deliver, wait = _collector()
    pipe.start()
    try:
        for seq, data in enumerate([packet, b"garbage" * 10, bad, broken, packet]):
            assert pipe.submit(job(data, seq, deliver=deliver))
        got = wait(5)
    finally:
        pipe.stop(TIMEOUT)
    codes = {o.seq: (o.code if isinstance(o, FrameFailure) else "ok") for o in got}
    assert codes == {0: "ok", 1: "malformed_packet", 2: "checksum_mismatch", 3: "internal_error", 4: "ok"}
    assert m.value("latentcast_cloud_frames_decoded_total") == 2
    assert m.value("latentcast_cloud_frame_errors_total", {"code": "internal_error"}) == 1
    assert m.value("latentcast_cloud_stage_seconds_count", {"stage": "decode"}) == 2
    assert pipe.in_flight("s1") == 0 and pipe.queue_depth == 0


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
def test_bounded_queue_drop_policies(tiny_codec, packet, policy):
    gate = threading.Event()
    m = CloudMetrics()
    cfg = PipelineConfig(workers=1, max_batch=1, batch_wait_ms=0.0, max_queued_per_session=3, max_queued_total=4,
                         drop_policy=policy)
    pipe = Pipeline(codec=tiny_codec, detector=FakeDetector(gate=gate), config=cfg, metrics=m)
    deliver, wait = _collector()
    pipe.start()
    try:
        assert pipe.submit(job(packet, 0, deliver=deliver))
        for _ in range(200):  # bounded: until the worker holds seq 0 (blocked in the detector)
            if pipe.queue_depth == 0:
                break
            time.sleep(0.005)
        accepted = [pipe.submit(job(packet, seq, deliver=deliver)) for seq in range(1, 6)]
        assert pipe.in_flight("s1") <= 3
        # another stream still gets in up to the global limit
        assert pipe.submit(job(packet, 100, stream="s2", deliver=deliver))
        assert pipe.queue_depth <= 4
        gate.set()
        got = wait(7)
    finally:
        gate.set()
        pipe.stop(TIMEOUT)
    ok = sorted(o.seq for o in got if isinstance(o, AnalysedFrame))
    dropped = sorted(o.seq for o in got if isinstance(o, FrameFailure))
    assert all(o.code == "cloud_overloaded" for o in got if isinstance(o, FrameFailure))
    if policy == "drop_oldest":  # the newest frames survive
        assert accepted == [True] * 5 and ok == [0, 4, 5, 100] and dropped == [1, 2, 3]
    else:  # the incoming ones are refused
        assert accepted == [True, True, False, False, False] and ok == [0, 1, 2, 100] and dropped == [3, 4, 5]
    assert m.value("latentcast_cloud_frames_dropped_total", {"reason": "cloud_overloaded"}) == 3


class _FlatComposer:
    """Composes every frame of a batch at once, as mid-grey (the batching is what is tested)."""

    def compose(self, requests):
        return [np.full((H, W, 3), 128, np.uint8) for _ in requests]


def test_batches_and_stop_fails_queued(tiny_codec, packet, monkeypatch):
    cfg = PipelineConfig(workers=1, max_batch=3, batch_wait_ms=200.0, max_queued_per_session=8)
    pipe = Pipeline(codec=tiny_codec, detector=FakeDetector(), config=cfg, composer=_FlatComposer())
    sizes: list[int] = []
    real = pipe._run_batch
    monkeypatch.setattr(pipe, "_run_batch", lambda batch: (sizes.append(len(batch)), real(batch)))
    deliver, wait = _collector()
    pipe.start()
    try:
        for seq in range(3):
            pipe.submit(job(packet, seq, deliver=deliver))
        wait(3)
    finally:
        pipe.stop(TIMEOUT)
    assert sizes == [3]
    # stopped: new frames are refused with server_shutdown; queued ones too
    deliver2, wait2 = _collector()
    stopped = Pipeline(codec=tiny_codec, detector=FakeDetector(), config=cfg)
    stopped.submit(job(packet, 0, deliver=deliver2))  # queued, never started
    stopped.stop(1.0)
    assert not stopped.submit(job(packet, 1, deliver=deliver2))
    assert [o.code for o in wait2(2)] == ["server_shutdown", "server_shutdown"]


def test_jsonl_sink_and_broken_sink(tiny_codec, packet, tmp_path):
    path = tmp_path / "out" / "frames.jsonl"
    sink = JsonlSink(path=path)

    def broken(_fr):
        raise OSError("disk full")

    pipe = Pipeline(codec=tiny_codec, detector=FakeDetector(), on_result=[broken, sink])
    deliver, wait = _collector()
    pipe.start()
    try:
        for seq in range(2):
            pipe.submit(job(packet, seq, deliver=deliver))
        assert all(isinstance(o, AnalysedFrame) for o in wait(2))
    finally:
        pipe.stop(TIMEOUT)
        sink.close()
    lines = [json.loads(s) for s in path.read_text().splitlines()]
    assert [r["seq"] for r in sorted(lines, key=lambda r: r["seq"])] == [0, 1]
    r = lines[0]
    assert r["camera_id"] == "cam" and r["task"] == "traffic" and r["packet_bytes"] == len(packet)
    assert r["boxes"][0]["label"] == "car" and set(r["latency_ms"]) >= {"queue_wait", "decode", "analytics"}
    assert r["bpp"] == pytest.approx(len(packet) * 8 / (W * H), rel=1e-4)


def test_encode_image_formats():
    cv2 = pytest.importorskip("cv2")
    rgb = np.zeros((8, 12, 3), np.uint8)
    rgb[..., 0] = 255  # red
    png = encode_image(rgb, pb.IMAGE_FORMAT_PNG)
    back = cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(back, rgb)
    assert encode_image(rgb, pb.IMAGE_FORMAT_JPEG, jpeg_quality=50)[:2] == b"\xff\xd8"
    with pytest.raises(ValueError, match="not JPEG"):
        encode_image(rgb, pb.IMAGE_FORMAT_UNSPECIFIED)


async def test_fanout_drops_oldest_for_slow_subscribers(tiny_codec, packet):
    m = CloudMetrics()
    fan = FanOut(loop=asyncio.get_running_loop(), queue_size=2, metrics=m)
    slow = fan.subscribe(pb.SubscribeRequest(camera_id="cam", format=pb.IMAGE_FORMAT_JPEG))
    none = fan.subscribe(pb.SubscribeRequest(camera_id="other"))
    with pytest.raises(ValueError, match="jpeg_quality"):
        fan.subscribe(pb.SubscribeRequest(jpeg_quality=101))
    fr = Pipeline(codec=tiny_codec, detector=FakeDetector()).process(job(packet))
    for seq in range(5):
        fr.job.seq = seq
        await asyncio.to_thread(fan.offer, fr)  # worker side
    for _ in range(100):  # bounded: until the loop has run the 5 publish callbacks
        if slow.dropped + len(slow._q) == 5:
            break
        await asyncio.sleep(0.01)
    assert slow.dropped == 3 and m.value("latentcast_cloud_subscriber_dropped_total") == 3
    got = [await asyncio.wait_for(slow.get(), TIMEOUT) for _ in range(2)]
    assert [g.seq for g in got] == [3, 4] and got[0].image[:2] == b"\xff\xd8"
    assert not none._q
    fan.close()
    assert await asyncio.wait_for(slow.get(), TIMEOUT) is None
    assert m.value("latentcast_cloud_subscribers") == 0


async def test_recomposition_for_step_subscribers_never_holds_up_the_worker(tiny_codec, packet):
    """A subscriber with its own compose_steps gets its frames from the recompose thread: offer()
    (the analytics worker) returns at once and the other subscribers get the analysed frame while a
    slow composition runs; the recompose backlog is bounded (oldest dropped, counted)."""
    import dataclasses
    import threading

    @dataclasses.dataclass
    class Req:
        steps: int

    class SlowComposer:
        def __init__(self):
            self.release, self.calls = threading.Event(), []

        def compose(self, reqs):
            self.calls.append(reqs[0].steps)
            assert self.release.wait(TIMEOUT)
            return [np.full((H, W, 3), 7, np.uint8)]

    m = CloudMetrics()
    comp = SlowComposer()
    fan = FanOut(loop=asyncio.get_running_loop(), metrics=m, composer=comp, recompose_queue=2)
    people = fan.subscribe(pb.SubscribeRequest(format=pb.IMAGE_FORMAT_PNG, compose_steps=50))
    machine = fan.subscribe(pb.SubscribeRequest(format=pb.IMAGE_FORMAT_PNG))
    results = fan.subscribe(pb.SubscribeRequest())
    base = Pipeline(codec=tiny_codec, detector=FakeDetector()).process(job(packet))
    for seq in range(6):
        fr = dataclasses.replace(base, job=dataclasses.replace(base.job, seq=seq), compose_request=Req(steps=2))
        await asyncio.wait_for(asyncio.to_thread(fan.offer, fr), 5.0)  # never waits for the composition
        for _ in range(500):  # bounded: frame 0 is taken up by the recompose thread before the others come
            if comp.calls:
                break
            await asyncio.sleep(0.01)
    got = [await asyncio.wait_for(machine.get(), TIMEOUT) for _ in range(6)]
    assert [g.seq for g in got] == list(range(6)) and not people._q  # while frame 0 is still being composed
    assert [(await asyncio.wait_for(results.get(), TIMEOUT)).seq for _ in range(6)] == list(range(6))
    assert fan.recompose_dropped == 3 and m.value("latentcast_cloud_subscriber_dropped_total") == 3
    comp.release.set()
    seqs = [(await asyncio.wait_for(people.get(), TIMEOUT)).seq for _ in range(3)]
    assert seqs == [0, 4, 5] and comp.calls == [50, 50, 50]  # the one in progress, then the 2 newest waiting
    await asyncio.sleep(0.05)
    assert not results._q and not machine._q  # the recomposed frames went to the step subscriber only
    fan.close()
    assert fan.recomposer.thread is not None and not fan.recomposer.thread.is_alive()
