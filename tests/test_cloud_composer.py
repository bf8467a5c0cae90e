"""The cloud with ``composer.kind: controlnet``: frames composed by ControlNet diffusion (tiny random
Stable Diffusion components, no hub) through the same server and pipeline path as production."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from latentcast.proto import latentcast_v1_pb2_grpc as pb_grpc
from tests.test_cloud_server import (
    TIMEOUT,
    channel,
    frame,
    header,
    kinds,
    make_config,
    make_server,  # noqa: F401 - fixture
    packets,  # noqa: F401 - fixture
    read,
)

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


def _controlnet_config(**kw):
    cfg = make_config()
    cfg.composer = dataclasses.replace(cfg.composer, **{"kind": "controlnet", "sd": "tiny", "steps": 2, **kw})
    return cfg


async def _stream(srv, tiny_codec, packets, n: int = 3) -> list:  # noqa: F811 - pytest fixtures imported above
    async with channel(srv.ports[0]) as ch:
        call = pb_grpc.LatentcastStub(ch).Stream()
        await call.write(header(tiny_codec))
        assert (await read(call)).WhichOneof("msg") == "accepted"
        for seq, p in enumerate(packets[:n]):
            await call.write(frame(seq, p))
        await call.done_writing()
        msgs = []
        while True:
            m = await call.read()
            if m is grpc.aio.EOF:
                break
            msgs.append(m)
        assert await call.code() == grpc.StatusCode.OK
    return msgs


async def test_cloud_composes_with_controlnet(make_server, tiny_codec, packets):  # noqa: F811 - pytest fixtures imported above
    from latentcast.models.composer import ComposeRequest, ControlNetComposer

    seen = []
    srv = await make_server(_controlnet_config())
    srv.pipeline.on_result.append(seen.append)
    assert isinstance(srv.composer, ControlNetComposer) and srv.pipeline.composer is srv.composer
    msgs = await _stream(srv, tiny_codec, packets)
    assert sorted(r.seq for r in kinds(msgs, "result")) == [0, 1, 2] and not kinds(msgs, "error")
    assert srv.metrics.value("latentcast_cloud_frames_decoded_total") == 3
    # the analysed frame is the composer's output for that packet (fixed seed per camera: reproducible)
    first = next(a for a in seen if a.seq == 0)
    rec = tiny_codec.decompress(packets[0], decode_frame=False)
    labels = [header(tiny_codec).header.labels[r.label_id] for r in rec.packet.header.rois]
    again = srv.composer.compose([ComposeRequest.from_reconstruction(rec, labels=labels, stream_id="cam-1",
                                                                     steps=2)])[0]
    assert (first.frame == again).all() and first.frame.shape == again.shape


async def test_composer_failure_is_a_frame_error(make_server, tiny_codec, packets):  # noqa: F811 - pytest fixtures imported above
    srv = await make_server(_controlnet_config())

    def boom(requests, **kw):
        raise RuntimeError("sampler exploded")

    srv.composer.compose = boom
    msgs = await _stream(srv, tiny_codec, packets, n=2)
    errors = kinds(msgs, "error")
    assert {e.code for e in errors} == {"compose_failed"} and "sampler exploded" in errors[0].message
    assert not kinds(msgs, "result")


def test_composer_config_is_checked():
    from latentcast.cloud.config import ComposerConfig

    with pytest.raises(ValueError, match="composer.kind 'vae'"):
        ComposerConfig(kind="vae")
    with pytest.raises(ValueError, match="composer.steps"):
        ComposerConfig(kind="controlnet", steps=0)


async def test_missing_sd_weights_keep_the_server_not_serving(make_server, tmp_path):  # noqa: F811 - pytest fixtures imported above
    srv = await make_server(_controlnet_config(sd=str(tmp_path / "no-sd")), wait=False)
    with pytest.raises(RuntimeError, match="could not start: Stable Diffusion weights .*no-sd.*composer.sd"):
        await srv.wait_ready(TIMEOUT)


async def test_subscribers_get_frames_composed_with_their_own_steps(make_server, tiny_codec, packets):  # noqa: F811
    """Analytics use composer.steps (2 here); a PNG subscriber asking for 5 steps gets the same packet
    composed with 5 (same seed and caption); one asking for 0 gets the analysed frame."""
    import asyncio

    import cv2
    import numpy as np

    from latentcast.proto import latentcast_v1_pb2 as pb

    seen = []
    srv = await make_server(_controlnet_config())
    srv.pipeline.on_result.append(seen.append)
    async with channel(srv.ports[0]) as ch:
        stub = pb_grpc.LatentcastStub(ch)
        people = stub.Subscribe(pb.SubscribeRequest(format=pb.IMAGE_FORMAT_PNG, compose_steps=5))
        machine = stub.Subscribe(pb.SubscribeRequest(format=pb.IMAGE_FORMAT_PNG))
        for _ in range(100):
            if len(srv.fanout) == 2:
                break
            await asyncio.sleep(0.02)
        call = stub.Stream()
        await call.write(header(tiny_codec))
        await read(call)
        await call.write(frame(0, packets[0]))
        await call.done_writing()
        while await asyncio.wait_for(call.read(), TIMEOUT) is not grpc.aio.EOF:
            pass
        p5 = await asyncio.wait_for(people.read(), TIMEOUT)
        p0 = await asyncio.wait_for(machine.read(), TIMEOUT)
        people.cancel()
        machine.cancel()

    def png(msg):
        return cv2.imdecode(np.frombuffer(msg.image, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]

    analysed = seen[0]
    assert analysed.compose_request.steps == 2
    assert (png(p0) == analysed.frame).all()
    five = srv.composer.compose([dataclasses.replace(analysed.compose_request, steps=5)])[0]
    assert (png(p5) == five).all() and not (five == analysed.frame).all()
    with pytest.raises(ValueError, match="compose_steps 1000"):
        srv.fanout.subscribe(pb.SubscribeRequest(format=pb.IMAGE_FORMAT_PNG, compose_steps=1000))
