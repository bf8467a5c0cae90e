"""Issue 15, item 4: what a frame may cost the cloud is bounded before and while it is decoded.

- The entropy decoder refuses a forged section at its first inconsistent symbol group: symbols
  carrying more information than the section has bits (an all-zero or truncated section), or more
  escaped symbols than :func:`proto.entropy.escape_budget` allows. Real packets never trip either
  rule (checked on real photos at every rate point, with and without ROIs).
- A session may not declare a frame above ``sessions.max_frame_pixels`` (default 1920x1088).
- The pipeline serves streams in turn (a stream with many queued frames cannot starve another),
  drops frames older than ``pipeline.max_frame_age_s`` before decoding, and drops the queued frames
  of a stream that ended; all counted.
- Against a loopback server: a hostile stream of forged max-size packets gets per-frame errors at
  a small cost each while a good stream goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time

import grpc
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from latentcast.cloud.config import CloudConfig, PipelineConfig, SessionsConfig  # noqa: E402
from latentcast.cloud.metrics import CloudMetrics  # noqa: E402
from latentcast.cloud.pipeline import AnalysedFrame, FrameFailure, Pipeline  # noqa: E402
from latentcast.cloud.sessions import SessionRejected, validate_header  # noqa: E402
from latentcast.proto import entropy  # noqa: E402
from latentcast.proto import latentcast_v1_pb2 as pb  # noqa: E402
from latentcast.proto.bitstream import Packet, Roi, SectionKind  # noqa: E402
from latentcast.proto.entropy import EntropyError, SymbolDecoder, SymbolEncoder, TableSet, escape_budget  # noqa: E402
from latentcast.proto.ids import label_set_hash  # noqa: E402
from latentcast.tools.bench.hostile import replace_sections as forged  # noqa: E402

from .test_cloud_hardening import (  # noqa: E402
    LABELS,
    FakeDetector,
    assert_no_traceback,
    channel,
    collect,
    frame,
    kinds,
    make_config,
)
from .test_cloud_pipeline import SPEC, _collector, job  # noqa: E402

TIMEOUT = 10.0


# ------------------------------------------------------------------------- the entropy decoder's budget

@pytest.fixture
def image(photo) -> np.ndarray:
    import cv2

    return cv2.cvtColor(cv2.imread(str(photo)), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def small_tables() -> TableSet:
    return TableSet.centered(entropy.gaussian_tables(np.array([0.3, 1.0, 4.0])))


def test_all_zero_and_truncated_sections_are_refused_at_once(small_tables):
    n = 200_000
    idx = np.zeros(n, dtype=np.int64)
    t0 = time.monotonic()
    with pytest.raises(EntropyError, match="cannot hold the symbols"):
        SymbolDecoder(b"\0" * 8).decode(idx, small_tables)
    vals = np.random.default_rng(0).integers(-3, 4, n)
    enc = SymbolEncoder()
    enc.encode(vals, np.full(n, 2), small_tables)
    data = enc.to_bytes()
    assert (SymbolDecoder(data).decode(np.full(n, 2), small_tables) == vals).all()
    with pytest.raises(EntropyError):  # the first half of a real section: runs out long before the end
        SymbolDecoder(data[: len(data) // 2 // 4 * 4]).decode(np.full(n, 2), small_tables)
    assert time.monotonic() - t0 < 2.0


def test_escape_budget_is_enforced_by_encoder_and_decoder(small_tables, monkeypatch):
    n = 4096
    over = escape_budget(n) + 1
    vals = np.zeros(n, dtype=np.int64)
    vals[:over] = 10_000  # far outside every table
    idx = np.ones(n, dtype=np.int64)
    with pytest.raises(ValueError, match="escape-coded"):
        SymbolEncoder().encode(vals, idx, small_tables)
    monkeypatch.setattr(entropy, "escape_budget", lambda symbols: 1 << 40)  # a forger's encoder
    enc = SymbolEncoder()
    enc.encode(vals, idx, small_tables)
    data = enc.to_bytes()
    monkeypatch.undo()
    with pytest.raises(EntropyError, match="escaped symbols"):
        SymbolDecoder(data).decode(idx, small_tables)
    ok = vals.copy()
    ok[escape_budget(n):] = 0  # exactly at the budget: fine
    enc = SymbolEncoder()
    enc.encode(ok, idx, small_tables)
    assert (SymbolDecoder(enc.to_bytes()).decode(idx, small_tables) == ok).all()


def test_real_packets_stay_within_the_budget(tiny_codec, image, monkeypatch):
    """Every section of real packets (a photo, a crop, every rate point, with and without ROIs and a
    coded background) decodes with its information content below its bits."""
    decoders: list[SymbolDecoder] = []
    real_init = SymbolDecoder.__init__

    def spy(self, data):
        real_init(self, data)
        decoders.append(self)

    monkeypatch.setattr(SymbolDecoder, "__init__", spy)
    for crop in (image, image[:37, :53]):
        h, w = crop.shape[:2]
        for rp in range(tiny_codec.n_rates):
            for rois, bg in (([], None), ([Roi(x0=0, y0=0, x1=min(24, w), y1=min(24, h))], None),
                             ([Roi(x0=0, y0=0, x1=min(24, w), y1=min(24, h))], 0)):
                tiny_codec.decompress(tiny_codec.compress(crop, rois, rate_point=rp, background=bg))
    assert decoders
    assert max(d.info_bits - 8 * d._size for d in decoders) < entropy.BUDGET_SLACK_BITS


def test_forged_sections_of_a_real_packet_are_refused_cheaply(tiny_codec, image):
    data = tiny_codec.compress(image, [], rate_point=1)
    p = Packet.from_bytes(data)
    rng = np.random.default_rng(3)
    y_len = len(p.sections[SectionKind.Y])
    for bad in (forged(data, Z=b"\0" * 8, Y=b"\0" * 8), forged(data, Y=b"\0" * y_len),
                forged(data, Y=rng.bytes(y_len // 4 * 4 or 4)), forged(data, Y=p.sections[SectionKind.Y][:4])):
        with pytest.raises(Exception) as ei:
            tiny_codec.decompress(bad)
        assert "Entropy" in type(ei.value).__name__ or "checksum" in str(ei.value), ei.value


# ------------------------------------------------------------------------------- the session's frame size

def _header(tiny_codec, w: int, h: int) -> pb.SessionHeader:
    return pb.SessionHeader(camera_id="c", task="t", labels=list(LABELS), codec_id=tiny_codec.codec_id,
                            weights_hash=tiny_codec.weights_hash, width=w, height=h, fps=10.0)


def test_session_frame_size_limit(tiny_codec):
    kw = dict(codec_id=tiny_codec.codec_id, weights_hash=tiny_codec.weights_hash)
    assert validate_header(_header(tiny_codec, 1920, 1088), **kw).width == 1920
    with pytest.raises(SessionRejected) as ei:
        validate_header(_header(tiny_codec, 4096, 2304), **kw)
    assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "4096x2304" in ei.value.message and str(1920 * 1088) in ei.value.message
    assert "sessions.max_frame_pixels" in ei.value.message
    big = SessionsConfig(max_frame_pixels=4096 * 2304)
    assert validate_header(_header(tiny_codec, 4096, 2304), config=big, **kw).height == 2304


# ------------------------------------------------------------------------------- the pipeline's scheduling

class _GatedDetector(FakeDetector):
    """Blocks in detect() until ``gate`` is set."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def detect(self, rgb):
        self.gate.wait(TIMEOUT)
        return super().detect(rgb)


@pytest.fixture(scope="module")
def packet(tiny_codec) -> bytes:
    img = (np.random.default_rng(1).random((SPEC.height, SPEC.width, 3)) * 255).astype(np.uint8)
    return tiny_codec.compress(img, [Roi(x0=0, y0=0, x1=48, y1=32, label_id=1)], rate_point=1,
                               label_set_hash=label_set_hash(LABELS))


def _wait_idle_queue(pipe: Pipeline) -> None:
    for _ in range(400):  # bounded: until the worker holds the first frame (blocked in the detector)
        if pipe.queue_depth == 0:
            return
        time.sleep(0.005)
    raise AssertionError("the worker did not take the first frame")


@pytest.mark.parametrize("max_batch", [1, 4])
def test_streams_are_served_in_turn(tiny_codec, packet, max_batch):
    """Without a composer a worker takes one frame at a time whatever max_batch says."""
    det = _GatedDetector()
    cfg = PipelineConfig(
        workers=1,
        max_batch=max_batch,
        batch_wait_ms=50.0,
        max_queued_per_session=32,
        max_queued_total=64,
        max_frame_age_s=0.0,
    )
    pipe = Pipeline(codec=tiny_codec, detector=det, config=cfg)
    deliver, wait = _collector()
    pipe.start()
    try:
        pipe.submit(job(packet, 0, stream="hog", deliver=deliver))
        _wait_idle_queue(pipe)
        for seq in range(1, 11):  # the hog queues ten more frames ...
            pipe.submit(job(packet, seq, stream="hog", deliver=deliver))
        pipe.submit(job(packet, 100, stream="good", deliver=deliver))  # ... then one good frame arrives
        pipe.submit(job(packet, 200, stream="other", deliver=deliver))
        det.gate.set()
        got = wait(13)
    finally:
        det.gate.set()
        pipe.stop(TIMEOUT)
    order = [o.seq for o in got]
    assert all(isinstance(o, AnalysedFrame) for o in got)
    # FIFO would analyse the good frame 12th; in turn, right after the hog's next frame
    assert order.index(100) <= 2 and order.index(200) <= 3, order
    assert [s for s in order if s < 100] == list(range(11))  # each stream's own order is kept


def test_decode_work_is_shared_by_pixels(tiny_codec, packet):
    """Deficit round robin on pixels: a stream of 1920x1088 frames gets about one frame for every five of a
    768x576 stream (frame-by-frame round robin would give one for one)."""
    det = _GatedDetector()
    cfg = PipelineConfig(workers=1, max_batch=1, batch_wait_ms=0.0, max_queued_per_session=32, max_queued_total=64,
                         max_frame_age_s=0.0)
    pipe = Pipeline(codec=tiny_codec, detector=det, config=cfg)
    big = dataclasses.replace(SPEC, camera_id="big", width=1920, height=1088)
    small = dataclasses.replace(SPEC, camera_id="small", width=768, height=576)
    deliver, wait = _collector()
    pipe.start()
    try:
        pipe.submit(job(packet, 0, stream="gate", deliver=deliver))  # holds the worker in the detector
        _wait_idle_queue(pipe)
        for seq in range(6):  # (their packets are not the sessions' size: refused cheaply, order is the point)
            pipe.submit(job(packet, 100 + seq, spec=big, stream="big", deliver=deliver))
            pipe.submit(job(packet, 200 + seq, spec=small, stream="small", deliver=deliver))
        det.gate.set()
        got = wait(13)
    finally:
        det.gate.set()
        pipe.stop(TIMEOUT)
    order = [o.seq for o in got][1:]
    first6 = order[:6]
    assert sum(s >= 200 for s in first6) >= 4, order  # round robin by frames would give 3
    assert sorted(order) == [100, 101, 102, 103, 104, 105, 200, 201, 202, 203, 204, 205]


def test_overload_drops_from_the_longest_queue(tiny_codec, packet):
    det = _GatedDetector()
    m = CloudMetrics()
    cfg = PipelineConfig(workers=1, max_batch=1, batch_wait_ms=0.0, max_queued_per_session=32, max_queued_total=6,
                         max_frame_age_s=0.0)
    pipe = Pipeline(codec=tiny_codec, detector=det, config=cfg, metrics=m)
    deliver, wait = _collector()
    pipe.start()
    try:
        pipe.submit(job(packet, 0, stream="hog", deliver=deliver))
        _wait_idle_queue(pipe)
        pipe.submit(job(packet, 100, stream="good", deliver=deliver))
        for seq in range(1, 9):
            pipe.submit(job(packet, seq, stream="hog", deliver=deliver))
        pipe.submit(job(packet, 101, stream="good", deliver=deliver))
        det.gate.set()
        got = wait(11)
    finally:
        det.gate.set()
        pipe.stop(TIMEOUT)
    dropped = sorted(o.seq for o in got if isinstance(o, FrameFailure))
    assert {100, 101} <= {o.seq for o in got if isinstance(o, AnalysedFrame)}
    assert dropped and all(s < 100 for s in dropped), dropped  # only the hog paid
    assert m.value("latentcast_cloud_frames_dropped_total", {"reason": "cloud_overloaded"}) == len(dropped)


def test_old_frames_expire_and_ended_streams_are_dropped(tiny_codec, packet):
    det = _GatedDetector()
    m = CloudMetrics()
    cfg = PipelineConfig(workers=1, max_batch=1, batch_wait_ms=0.0, max_queued_per_session=8, max_frame_age_s=0.2)
    pipe = Pipeline(codec=tiny_codec, detector=det, config=cfg, metrics=m)
    deliver, wait = _collector()
    pipe.start()
    try:
        pipe.submit(job(packet, 0, stream="a", deliver=deliver))
        _wait_idle_queue(pipe)
        for seq in (1, 2):
            pipe.submit(job(packet, seq, stream="a", deliver=deliver))
        for seq in (10, 11):
            pipe.submit(job(packet, seq, stream="gone", deliver=deliver))
        assert pipe.cancel("gone") == 2 and pipe.in_flight("gone") == 0
        assert pipe.cancel("never-seen") == 0
        time.sleep(0.3)  # frames 1 and 2 are now older than max_frame_age_s
        pipe.submit(job(packet, 3, stream="a", deliver=deliver))
        det.gate.set()
        got = wait(6)
    finally:
        det.gate.set()
        pipe.stop(TIMEOUT)
    codes = {o.seq: (o.code if isinstance(o, FrameFailure) else "ok") for o in got}
    assert codes == {0: "ok", 1: "frame_expired", 2: "frame_expired", 3: "ok", 10: "stream_ended",
                     11: "stream_ended"}, codes
    assert m.value("latentcast_cloud_frames_dropped_total", {"reason": "frame_expired"}) == 2
    assert m.value("latentcast_cloud_frames_dropped_total", {"reason": "stream_ended"}) == 2
    assert pipe.in_flight("a") == 0 and pipe.queue_depth == 0


def test_pipeline_config_checks_the_age():
    with pytest.raises(ValueError, match="max_frame_age_s"):
        PipelineConfig(max_frame_age_s=-1)
    with pytest.raises(ValueError, match="max_frame_age_s"):
        PipelineConfig(max_frame_age_s=float("nan"))


# ------------------------------------------------------------------------------- against a loopback server

@pytest.fixture
async def server(tiny_codec):
    from latentcast.cloud.server import CloudServer

    cfg: CloudConfig = make_config()
    cfg.sessions = dataclasses.replace(cfg.sessions, max_frame_pixels=1920 * 1088)
    srv = CloudServer(cfg, codec=tiny_codec, detector=FakeDetector())
    await srv.start()
    await srv.wait_ready(TIMEOUT)
    yield srv
    await srv.stop(0.5)


def _edge_header(tiny_codec, camera: str, w: int, h: int) -> pb.EdgeMessage:
    return pb.EdgeMessage(header=pb.SessionHeader(
        camera_id=camera, task="traffic", labels=list(LABELS), codec_id=tiny_codec.codec_id,
        weights_hash=tiny_codec.weights_hash, width=w, height=h, fps=10.0, edge_version="test"))


async def test_hostile_max_size_packets_cost_little_and_spare_a_good_stream(server, tiny_codec, packet, caplog):
    """The probe's case: forged packets at the largest frame a session may declare get per-frame errors
    (the stream goes on, as a corrupt frame's would), each refused in well under a second."""
    big = np.zeros((1088, 1920, 3), dtype=np.uint8)
    legit_big = tiny_codec.compress(big, [], rate_point=0)
    rng = np.random.default_rng(5)
    hostile = [forged(legit_big, Z=b"\0" * 8, Y=b"\0" * 8),
               forged(legit_big, Y=b"\0" * 4096),
               forged(legit_big, Y=rng.bytes(51_200))]
    async with channel(server.ports[0]) as ch:
        from latentcast.proto import latentcast_v1_pb2_grpc as pb_grpc

        stub = pb_grpc.LatentcastStub(ch)
        bad = stub.Stream()
        await bad.write(_edge_header(tiny_codec, "hostile", 1920, 1088))
        good = stub.Stream()
        await good.write(_edge_header(tiny_codec, "good", SPEC.width, SPEC.height))
        for call in (bad, good):
            assert (await collect(call, until=lambda ms: True))[0].WhichOneof("msg") == "accepted"
        t0 = time.monotonic()
        for seq, data in enumerate(hostile * 3):
            await bad.write(frame(seq, data, boxes=[]))
        errors = kinds(await collect(bad, until=lambda ms: len(kinds(ms, "error")) >= 9), "error")
        hostile_s = time.monotonic() - t0
        for seq in range(3):
            await good.write(frame(seq, packet, boxes=[]))
        results = kinds(await collect(good, until=lambda ms: len(kinds(ms, "result")) >= 3), "result")
        await bad.done_writing()
        await good.done_writing()
    assert {e.code for e in errors} == {"decode_failed"}, [(e.code, e.message) for e in errors]
    assert [r.seq for r in results] == [0, 1, 2]
    assert hostile_s < 9 * 0.5, hostile_s  # a real 1920x1088 decode takes seconds on this codec's machine
    assert_no_traceback(caplog)


async def test_oversized_session_is_refused(server, tiny_codec):
    async with channel(server.ports[0]) as ch:
        from latentcast.proto import latentcast_v1_pb2_grpc as pb_grpc

        call = pb_grpc.LatentcastStub(ch).Stream()
        await call.write(_edge_header(tiny_codec, "huge", 4096, 2304))
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await asyncio.wait_for(call.read(), TIMEOUT)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_frame_pixels" in ei.value.details()


async def test_a_stream_of_refused_frames_is_read_more_slowly(tiny_codec, packet, caplog):
    """After 3 refusals in a row the stream's next frames are read 10 ms, 20 ms, ... apart (capped); an
    analysed frame resets the count."""
    from latentcast.cloud.server import CloudServer
    from latentcast.proto import latentcast_v1_pb2_grpc as pb_grpc

    caplog.set_level(logging.INFO)
    cfg: CloudConfig = make_config()
    cfg.pipeline = dataclasses.replace(cfg.pipeline, refused_backoff_max_s=0.1)
    srv = CloudServer(cfg, codec=tiny_codec, detector=FakeDetector())
    await srv.start()
    await srv.wait_ready(TIMEOUT)
    bad = forged(packet, Z=b"\0" * 8, Y=b"\0" * 8)
    try:
        async with channel(srv.ports[0]) as ch:
            call = pb_grpc.LatentcastStub(ch).Stream()
            await call.write(_edge_header(tiny_codec, "careless", SPEC.width, SPEC.height))
            assert (await collect(call, until=lambda ms: True))[0].WhichOneof("msg") == "accepted"
            t0 = time.monotonic()
            for seq in range(10):
                await call.write(frame(seq, bad, boxes=[]))
            await call.write(frame(10, packet, boxes=[]))
            got = await collect(call, until=lambda ms: len(kinds(ms, "result")) >= 1)
            slow_s = time.monotonic() - t0
            await call.done_writing()
    finally:
        await srv.stop(0.5)
    assert [e.code for e in kinds(got, "error")] == ["decode_failed"] * 10
    # waits before frames 4..10: 10, 20, 40, 80 ms, then 100 ms (the cap) three times
    assert slow_s >= 0.01 + 0.02 + 0.04 + 0.08 + 3 * 0.1, slow_s
    assert [m for m in (r.getMessage() for r in caplog.records) if "refused in a row" in m]
    assert [m for m in (r.getMessage() for r in caplog.records) if "10 refused" in m]


def test_the_benchmark_forgeries_are_what_they_say(tiny_codec, image):
    """``latentcast bench hostile``'s packets: every forged kind is refused by the decoder, legit-max decodes."""
    from latentcast.tools.bench.hostile import HOSTILE_KINDS, forge

    legit = tiny_codec.compress(image, [], rate_point=1)
    for kind in HOSTILE_KINDS:
        data = forge(tiny_codec, kind, legit)
        if kind == "legit-max":
            assert tiny_codec.decompress(data).frame.shape == image.shape
            continue
        with pytest.raises(Exception) as ei:
            tiny_codec.decompress(data)
        assert "Entropy" in type(ei.value).__name__ or "checksum" in str(ei.value), (kind, ei.value)
