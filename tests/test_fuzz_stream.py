"""Issue 15: a bounded fuzz of the Stream call against a loopback cloud (port 0, tiny seeded codec).

At least 2,000 mutated messages and packets, on several concurrent streams, in well under a minute:
flipped bytes in the codec packet (with and without a recomputed CRC, so the parser and the entropy
decoder both see them), truncated and extended packets, forged header fields, replaced sections,
random bytes as the whole EdgeMessage, flipped bytes in the serialized message, hostile edge boxes.

Pass: the server never crashes or logs a traceback; every stream ends OK or with INVALID_ARGUMENT;
every refused frame carries a per-frame error code other than ``internal_error``; and afterwards a
clean stream still gets its results.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import struct
import time
import zlib

import grpc
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from latentcast.cloud.pipeline import ERROR_CODES  # noqa: E402
from latentcast.proto import latentcast_v1_pb2 as pb  # noqa: E402
from latentcast.proto import latentcast_v1_pb2_grpc as pb_grpc  # noqa: E402
from latentcast.proto.bitstream import CRC_BYTES, Packet, Roi, SectionKind  # noqa: E402
from latentcast.proto.ids import label_set_hash  # noqa: E402

from .test_cloud_hardening import (  # noqa: E402
    CLIENT_WRITE_RACE,
    LABELS,
    TIMEOUT,
    H,
    W,
    _grpc_multi_loop_noise,
    assert_no_traceback,
    channel,
    collect,
    frame,
    header,
    kinds,
    make_config,
    make_server,  # noqa: F401 - fixture
    raw_stream,
)

MESSAGES = 2000  # mutated messages the server took in (the issue asks for at least 2,000)
# packet mutations: valid, flip, flip+crc, truncate, extend, section, header, rois, random; the ones that end
# a stream (truncated, extended or random bytes) are rarer, so streams live long enough to mix the others
KIND_WEIGHTS = [0.08, 0.12, 0.24, 0.03, 0.03, 0.2, 0.15, 0.12, 0.03]
STREAMS = 4  # concurrent fuzzing streams
PER_STREAM = 40  # messages per stream before it half-closes (a refused stream reconnects sooner)
ALLOWED_STATUS = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
ALLOWED_FRAME_ERRORS = set(ERROR_CODES) - {"internal_error"}


def _fix_crc(data: bytes) -> bytes:
    body = data[:-CRC_BYTES]
    return body + struct.pack("<I", zlib.crc32(body))


class Mutator:
    """Deterministic mutations of valid FramePackets (seeded)."""

    def __init__(self, packets: list[bytes], seed: int) -> None:
        self.packets = packets
        self.rng = np.random.default_rng(seed)

    def _flip(self, data: bytes, n: int) -> bytes:
        b = bytearray(data)
        for i in self.rng.integers(0, len(b), n):
            b[int(i)] ^= int(self.rng.integers(1, 256))
        return bytes(b)

    def packet(self) -> tuple[str, bytes]:
        rng = self.rng
        data = self.packets[int(rng.integers(len(self.packets)))]
        kind = int(rng.choice(9, p=KIND_WEIGHTS))
        if kind == 0:
            return "valid", data
        if kind == 1:
            return "flip", self._flip(data, int(rng.integers(1, 9)))
        if kind == 2:
            return "flip+crc", _fix_crc(self._flip(data[:-CRC_BYTES] + b"\0" * CRC_BYTES,
                                                   int(rng.integers(1, 9))))
        if kind == 3:
            return "truncate", data[: int(rng.integers(0, len(data)))]
        if kind == 4:
            return "extend", data + rng.bytes(int(rng.integers(1, 64)))
        p = Packet.from_bytes(data)
        if kind == 5:  # a forged section: zeros, random words, or another packet's
            secs = dict(p.sections)
            k = SectionKind.Y if rng.random() < 0.5 else SectionKind.Z
            n = int(rng.integers(1, 256)) * 4
            secs[k] = b"\0" * n if rng.random() < 0.5 else rng.bytes(n)
            return "section", Packet(header=p.header, sections=secs).to_bytes()
        if kind == 6:  # header fields the parser accepts but the session or decoder must refuse
            field, value = [("rate_point", int(rng.integers(0, 8))), ("width", int(rng.integers(1, 4096))),
                            ("height", int(rng.integers(1, 4096))), ("roi_only", bool(rng.integers(2))),
                            ("label_set_hash", rng.bytes(4))][int(rng.integers(5))]
            try:
                return "header", Packet(header=dataclasses.replace(p.header, **{field: value}),
                                        sections=p.sections).to_bytes()
            except Exception:  # noqa: BLE001 - the writer refuses some combinations: send the valid one
                return "valid", data
        if kind == 7:  # ROIs outside the frame / unknown labels
            x0, y0 = int(rng.integers(0, 4 * W)), int(rng.integers(0, 4 * H))
            x1, y1, label = x0 + int(rng.integers(1, 4 * W)), y0 + int(rng.integers(1, 4 * H)), int(rng.integers(300))
            try:
                rois = [Roi(x0=x0, y0=y0, x1=x1, y1=y1, label_id=label)]
                return "rois", Packet(header=dataclasses.replace(p.header, rois=rois), sections=p.sections).to_bytes()
            except Exception:  # noqa: BLE001
                return "valid", data
        return "random", rng.bytes(int(rng.integers(1, 512)))

    def boxes(self) -> list[pb.Box]:
        rng = self.rng
        if rng.random() < 0.8:
            return []
        vals = [float(v) for v in rng.choice([0.0, 1.0, -5.0, 1e9, np.nan, np.inf, 50.0], 5)]
        return [pb.Box(x0=vals[0], y0=vals[1], x1=vals[2], y1=vals[3], score=vals[4],
                       label_id=int(rng.choice([0, 1, 2, 4_000_000_000])), label=str(rng.choice(["", "car", "x\0"])))]

    def message(self, seq: int) -> bytes:
        """The bytes of one EdgeMessage on the wire: mostly a FramePacket with a mutated packet."""
        rng = self.rng
        r = rng.random()
        if r < 0.01:
            return b"\xff" + rng.bytes(int(rng.integers(0, 64)))  # not a protobuf message
        msg = frame(seq, self.packet()[1], boxes=self.boxes()).SerializeToString()
        if r < 0.03:
            return self._flip(msg, int(rng.integers(1, 4)))  # maybe still a message, maybe not
        if r < 0.035:
            return pb.EdgeMessage().SerializeToString()  # empty oneof
        return msg


@pytest.fixture(scope="module")
def packets(tiny_codec) -> list[bytes]:
    rng = np.random.default_rng(0)
    lsh = label_set_hash(LABELS)
    out = []
    for i in range(4):
        img = (rng.random((H, W, 3)) * 255).astype(np.uint8)
        rois = [Roi(x0=8 * i, y0=0, x1=8 * i + 32, y1=32, label_id=i % 2)] if i % 2 else []
        out.append(tiny_codec.compress(img, rois, rate_point=i % 3, label_set_hash=lsh,
                                       background=0 if i == 3 else None))
    return out


async def _fuzz_stream(ch, tiny_codec, camera: str, mut: Mutator, budget: int) -> tuple[int, grpc.StatusCode,
                                                                                         list[pb.FrameError]]:
    """One stream: header, then up to ``budget`` mutated messages; returns (sent, status, errors)."""
    call = raw_stream(ch)
    sent = 0
    errors: list[pb.FrameError] = []

    async def reader():
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                return
            if msg.WhichOneof("msg") == "error":
                errors.append(msg.error)

    task = asyncio.create_task(reader())
    try:
        await call.write(header(tiny_codec, camera=camera).SerializeToString())
        for seq in range(budget):
            await asyncio.wait_for(call.write(mut.message(seq)), TIMEOUT)
            sent += 1
        await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        pass  # the server ended the stream (INVALID_ARGUMENT): the status says why
    try:
        await asyncio.wait_for(task, TIMEOUT)
    except grpc.aio.AioRpcError:
        pass
    code = await asyncio.wait_for(call.code(), TIMEOUT)
    if code == grpc.StatusCode.INTERNAL and await call.details() == CLIENT_WRITE_RACE:
        code = None  # the client hid the server's status (CLIENT_WRITE_RACE); the server's own count is checked below
    return sent, code, errors


async def test_fuzzed_stream_messages_and_packets(make_server, tiny_codec, packets, caplog):
    caplog.set_level(logging.INFO)
    cfg = make_config()
    # the refused-frame backoff would make the streams crawl: it has its own test (test_decode_bounds.py)
    cfg.pipeline = dataclasses.replace(cfg.pipeline, max_queued_per_session=4, refused_backoff_max_s=0.0)
    srv = await make_server(cfg)
    muts = [Mutator(packets, seed) for seed in range(STREAMS)]
    statuses: dict[grpc.StatusCode, int] = {}
    frame_errors: dict[str, int] = {}
    total = 0
    t0 = time.monotonic()
    async with channel(srv.ports[0]) as ch:
        rounds = 0
        while srv.metrics.value("latentcast_cloud_frames_received_total") < MESSAGES:
            results = await asyncio.gather(*[
                _fuzz_stream(ch, tiny_codec, f"fuzz-{i}-{rounds}", muts[i], PER_STREAM) for i in range(STREAMS)])
            rounds += 1
            for sent, code, errors in results:
                total += max(sent, 1)  # a refused first frame counts: it was sent before the refusal arrived
                statuses[code] = statuses.get(code, 0) + 1
                for e in errors:
                    frame_errors[e.code] = frame_errors.get(e.code, 0) + 1
        elapsed = time.monotonic() - t0
        # the server is still healthy: a clean stream gets every result
        good = pb_grpc.LatentcastStub(ch).Stream()
        await good.write(header(tiny_codec, camera="after-fuzz"))
        for seq, data in enumerate(packets):
            await good.write(frame(seq, data, boxes=[]))
        got = await collect(good, until=lambda ms: len(kinds(ms, "result")) >= len(packets))
        await good.done_writing()
    received = srv.metrics.value("latentcast_cloud_frames_received_total")
    assert received >= 2000, received
    assert elapsed < 60, elapsed
    assert set(statuses) - {None} <= ALLOWED_STATUS, statuses
    server_ended = {c.name: srv.metrics.value("latentcast_cloud_stream_errors_total", {"code": c.name})
                    for c in grpc.StatusCode}
    server_ended = {k: v for k, v in server_ended.items() if v}
    assert set(server_ended) == {"INVALID_ARGUMENT"}, server_ended
    assert server_ended["INVALID_ARGUMENT"] >= statuses.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 0
    assert frame_errors, frame_errors
    print(
        f"fuzz: {total} messages sent, {received:.0f} taken in, on {sum(statuses.values())} streams "
        f"in {elapsed:.1f} s; "
        f"client statuses "
        f"{ {getattr(k, 'name', k): v for k, v in statuses.items()} }; server ended {server_ended}; "
        f"frames received {srv.metrics.value('latentcast_cloud_frames_received_total')}; frame errors {frame_errors}"
    )
    assert set(frame_errors) <= ALLOWED_FRAME_ERRORS, frame_errors
    assert len(kinds(got, "result")) == len(packets)
    assert_no_traceback(caplog)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and not _grpc_multi_loop_noise(r)]
    assert not errors, errors[:5]
    assert srv.metrics.value("latentcast_cloud_frame_errors_total", {"code": "internal_error"}) == 0
