"""Temporal streams through the real cloud server (loopback, port 0): in-order decoding, refused frames
after a loss, RefreshRequest on the back channel, recovery at the next keyframe; and the edge app end to end."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from latentcast.proto import latentcast_v1_pb2 as pb  # noqa: E402
from latentcast.proto import latentcast_v1_pb2_grpc as pb_grpc  # noqa: E402
from latentcast.proto.bitstream import Packet, Roi, SectionKind, StreamContext  # noqa: E402
from latentcast.proto.ids import label_set_hash  # noqa: E402
from latentcast.proto.temporal import TemporalInfo, TemporalTables  # noqa: E402
from tests.test_cloud_server import LABELS, TIMEOUT, H, W, channel, frame, header, make_config, make_server  # noqa: E402,F401


@pytest.fixture(scope="module")
def tables_file(tiny_codec, tmp_path_factory):
    t = TemporalTables.flat(M=tiny_codec.M, n_rates=tiny_codec.n_rates)
    p = tmp_path_factory.mktemp("temporal") / "tiny-temporal.safetensors"
    t.save(p, weights_hash=tiny_codec.weights_hash)
    return p


def _frames(n: int) -> list[tuple[np.ndarray, list[Roi]]]:
    rng = np.random.default_rng(1)
    bg = np.kron(rng.integers(30, 220, size=(H // 16, W // 16, 3)), np.ones((16, 16, 1))).astype(np.uint8)
    out = []
    for t in range(n):
        f = bg.copy()
        x = 4 + 3 * (t % 16)
        f[16:48, x:x + 24] = (250, 230, 30)
        out.append((f, [Roi(x0=x, y0=16, x1=x + 24, y1=48, label_id=0, score=0.9)]))
    return out


async def _next_for(call, seq: int, refreshes: list) -> pb.CloudMessage:
    """The result or error of ``seq`` (acks skipped; refresh requests collected on the way)."""
    while True:
        m = await asyncio.wait_for(call.read(), TIMEOUT)
        assert m is not grpc.aio.EOF, "stream ended early"
        kind = m.WhichOneof("msg")
        if kind == "refresh":
            refreshes.append(m.refresh)
        elif kind in ("result", "error") and getattr(m, kind).seq == seq:
            return m


async def test_lost_packets_are_refused_then_a_refresh_recovers(make_server, tiny_codec, tiny_bundle, tables_file):  # noqa: F811
    from latentcast.edge.config import TemporalConfig
    from latentcast.edge.encoder import EdgeEncoder
    from latentcast.edge.temporal import TemporalEncoder

    cfg = make_config()
    cfg.codec = dataclasses.replace(cfg.codec, temporal_tables=str(tables_file), refresh_retry_s=0.0)
    srv = await make_server(cfg)
    enc = TemporalEncoder(compressor=EdgeEncoder(bundle=tiny_bundle),
                          tables=TemporalTables.load(tables_file, weights_hash=tiny_codec.weights_hash),
                          config=TemporalConfig(mode="temporal", refresh_s=0.0), fps=10.0)
    lsh = label_set_hash(LABELS)
    ctx = StreamContext(codec_id=tiny_codec.codec_id, weights_hash=tiny_codec.weights_hash,
                        latent_space_id=tiny_codec.latent_space_id, width=W, height=H, label_set_hash=lsh)
    lost = {3, 9, 10, 15}
    outcome, kinds, refreshes = {}, {}, []
    async with channel(srv.ports[0]) as ch:
        call = pb_grpc.LatentcastStub(ch).Stream()
        await call.write(header(tiny_codec))
        assert (await asyncio.wait_for(call.read(), TIMEOUT)).WhichOneof("msg") == "accepted"
        for seq, (f, rois) in enumerate(_frames(20)):
            n_ref = len(refreshes)
            data = enc.encode(f, rois, label_set_hash=lsh)
            kinds[seq] = TemporalInfo.from_bytes(Packet.from_bytes(data, stream=ctx).sections[SectionKind.T]).kind
            if seq in lost:
                continue  # lost on the way: never reaches the cloud
            await call.write(frame(seq, data))
            m = await _next_for(call, seq, refreshes)
            outcome[seq] = m.result if m.WhichOneof("msg") == "result" else m.error.code
            if len(refreshes) > n_ref:
                enc.request_refresh()  # what the edge client does with a RefreshRequest
        await call.done_writing()
    # from a loss to the next keyframe that arrives, frames are refused; everything else is rendered
    broken = False
    for seq in range(20):
        if seq in lost:
            broken = True
            continue
        if kinds[seq] == 0:
            broken = False
        if broken:
            assert outcome[seq] == "missing_reference", (seq, outcome[seq])
        else:
            assert isinstance(outcome[seq], pb.FrameAnalytics), (seq, outcome[seq])
    refused = [s for s, o in outcome.items() if o == "missing_reference"]
    assert refused and [r.seq for r in refreshes] == refused and all(kinds[s + 1] == 0 for s in refused)
    assert "predicted from frame" in refreshes[0].reason
    assert srv.metrics.value("latentcast_cloud_refresh_requests_total") == len(refused)
    assert srv.metrics.value("latentcast_cloud_frame_errors_total", {"code": "missing_reference"}) == len(refused)


async def test_edge_app_with_temporal_coding_recovers_from_lost_packets(make_server, tiny_codec, tiny_bundle,  # noqa: F811
                                                                        tables_file, tmp_path):
    """The edge service with ``temporal.enabled`` against the cloud service; a few packets vanish between
    them. The cloud asks for keyframes, the edge sends them, and every frame after a recovery is analysed."""
    import cv2

    from latentcast.edge.app import EdgeApp
    from latentcast.edge.config import EdgeConfig

    folder = tmp_path / "frames"
    folder.mkdir()
    for i, (f, _) in enumerate(_frames(24)):
        cv2.imwrite(str(folder / f"{i:03d}.png"), f[:, :, ::-1])
    cfg = make_config()
    cfg.codec = dataclasses.replace(cfg.codec, temporal_tables=str(tables_file), refresh_retry_s=0.0)
    srv = await make_server(cfg)
    ecfg = EdgeConfig(camera_id="cam-t")
    ecfg.source.uri, ecfg.source.pace, ecfg.source.fps = str(folder), "realtime", 20.0
    ecfg.grounding.labels, ecfg.grounding.threads = LABELS, 1
    ecfg.codec.bundle, ecfg.codec.threads = str(tiny_bundle), 1
    ecfg.temporal = dataclasses.replace(ecfg.temporal, mode="temporal", tables=str(tables_file), refresh_s=0.0)
    ecfg.sender.queue_size = 64
    ecfg.server.target = f"127.0.0.1:{srv.ports[0]}"
    app = EdgeApp(ecfg)
    put, lost = app.queue.put, {5, 6, 14}
    app.queue.put = lambda out: True if out.seq in lost else put(out)  # these never reach the cloud
    stats = await asyncio.wait_for(app.run(max_frames=24), 60)
    assert stats["frames_encoded"] == 24 and stats["temporal"]["key"] >= 2
    assert stats["refresh_requests"] >= 1 and stats["temporal"]["refresh_requested"] >= 1
    errors = stats["frame_errors"]
    assert set(errors) == {"missing_reference"} and errors["missing_reference"] >= 1
    assert stats["results"] + errors["missing_reference"] == 24 - len(lost)


def test_temporal_frames_bypass_the_composer(tiny_codec, tiny_bundle, tables_file):
    """Every cell of a temporal stream's latent was transmitted: the pipeline renders it with the latent
    decoder and never hands it to a diffusion composer (which would only repaint transmitted cells)."""
    from latentcast.cloud.pipeline import AnalysedFrame, FrameJob, Pipeline
    from latentcast.cloud.sessions import SessionSpec
    from latentcast.edge.config import TemporalConfig
    from latentcast.edge.encoder import EdgeEncoder
    from latentcast.edge.temporal import TemporalEncoder
    from latentcast.models.temporal import TemporalDecoder
    from tests.test_cloud_server import FakeDetector

    class NoCompose:
        def compose(self, requests):
            raise AssertionError("a temporal frame reached the composer")

    tables = TemporalTables.load(tables_file, weights_hash=tiny_codec.weights_hash)
    enc = TemporalEncoder(compressor=EdgeEncoder(bundle=tiny_bundle), tables=tables,
                          config=TemporalConfig(mode="temporal"), fps=10.0)
    dec = TemporalDecoder(codec=tiny_codec, tables=tables)
    spec = SessionSpec(camera_id="cam", task="t", labels=tuple(LABELS), label_set_hash=label_set_hash(LABELS),
                       width=W, height=H, fps=10.0, edge_version="t")
    pipe = Pipeline(codec=tiny_codec, detector=FakeDetector(), composer=NoCompose())
    jobs = []
    for seq, (f, rois) in enumerate(_frames(3)):
        p = dec.parse(enc.encode(f, rois, label_set_hash=label_set_hash(LABELS)))  # P frames: compact
        jobs.append(FrameJob(stream_id="s", spec=spec, seq=seq, capture_ts_us=0, packet=p, packet_bytes=1,
                             prepared=dec.prepare(p)))
    out = pipe.process_batch(jobs)
    assert all(isinstance(o, AnalysedFrame) and o.frame.shape == (H, W, 3) for o in out), out
    np.testing.assert_array_equal(out[-1].frame, jobs[-1].prepared(True).frame)  # the latent decoder's frame
