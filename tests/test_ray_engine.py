"""``pipeline.engine: ray``: synthesis and analytics as Ray Serve deployments on a local Ray (2 CPUs, no
dashboard) behind a loopback front; every frame is analysed with the same detections as the embedded engine.

The shipped codec and YOLOX-nano on vtest frames (real detections to compare), two cameras through one front."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import grpc
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ray.serve")

from latentcast.cloud.config import CloudConfig  # noqa: E402
from latentcast.cloud.server import CloudServer  # noqa: E402
from latentcast.proto import latentcast_v1_pb2 as pb  # noqa: E402
from latentcast.proto import latentcast_v1_pb2_grpc as pb_grpc  # noqa: E402
from latentcast.proto.bitstream import Roi  # noqa: E402
from latentcast.proto.ids import label_set_hash  # noqa: E402
from tests.conftest import shared_or_skip  # noqa: E402
from tests.test_cloud_server import channel, kinds, read  # noqa: E402

LABELS = ["person", "car"]
WAIT = 180.0  # bound of every wait here: a loaded 2-core machine runs Ray, the codec and YOLOX at once
N_FRAMES = 3
SIZE = (384, 288)  # vtest at half size: real people for YOLOX, quick to decode


@pytest.fixture(scope="module")
def vtest_packets():
    import cv2

    from latentcast.models.codec import LatentCodec

    video = shared_or_skip() / "data" / "video" / "vtest.avi"
    codec = LatentCodec.load("elic-lite")
    cap = cv2.VideoCapture(str(video))
    frames = []
    for i in range(N_FRAMES * 10):
        ok, bgr = cap.read()
        if ok and i % 10 == 1:
            frames.append(cv2.cvtColor(cv2.resize(bgr, SIZE, interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB))
    cap.release()
    lsh = label_set_hash(LABELS)
    packets = [codec.compress(f, [Roi(x0=0, y0=0, x1=SIZE[0], y1=SIZE[1])], rate_point=2, roi_only=False,
                              label_set_hash=lsh) for f in frames]
    return codec, packets


async def collect(call, n: int) -> list[pb.CloudMessage]:
    """Messages of a stream until ``n`` frames got a result or an error (bounded by WAIT)."""
    got: list[pb.CloudMessage] = []
    deadline = asyncio.get_running_loop().time() + WAIT
    while len(kinds(got, "result")) + len(kinds(got, "error")) < n:
        msg = await asyncio.wait_for(call.read(), max(0.01, deadline - asyncio.get_running_loop().time()))
        assert msg is not grpc.aio.EOF, "stream ended early"
        got.append(msg)
    return got


async def stream_and_watch(srv, codec, packets: list[bytes]) -> dict[int, np.ndarray]:
    """One stream of ``packets`` (test_cloud_server's header and frames) and, through Subscribe, its frames
    as the cloud rendered them (PNG, decoded); every frame must get a result."""
    import cv2

    from tests.test_cloud_server import frame, header

    async with channel(srv.ports[0]) as ch:
        stub = pb_grpc.LatentcastStub(ch)
        sub = stub.Subscribe(pb.SubscribeRequest(format=pb.IMAGE_FORMAT_PNG))
        await asyncio.wait_for(sub.initial_metadata(), WAIT)
        call = stub.Stream()
        await call.write(header(codec))
        await read(call)
        for seq, p in enumerate(packets):
            await call.write(frame(seq, p))
        await call.done_writing()
        msgs = await collect(call, len(packets))
        assert not kinds(msgs, "error"), kinds(msgs, "error")
        out = {}
        while len(out) < len(packets):
            r = await asyncio.wait_for(sub.read(), WAIT)
            out[r.seq] = cv2.imdecode(np.frombuffer(r.image, np.uint8), cv2.IMREAD_COLOR)
        sub.cancel()
        return out


def assert_close(remote: dict, local: dict, n: int, min_db: float) -> None:
    assert sorted(remote) == list(range(n))
    for seq in remote:
        mse = np.mean((remote[seq].astype(float) - local[seq].astype(float)) ** 2)
        assert mse == 0 or 10 * np.log10(255**2 / mse) > min_db, seq


def config(engine: str) -> CloudConfig:
    cfg = CloudConfig()
    cfg.server = dataclasses.replace(cfg.server, host="127.0.0.1", port=0, maintenance_port=-1, metrics_port=-1,
                                     grace_s=1.0, ack_every_frames=1)
    cfg.codec = dataclasses.replace(cfg.codec, warmup_size=32)
    # no frame-age limit: the test compares results, and a loaded CI machine must not expire a frame
    cfg.pipeline = dataclasses.replace(cfg.pipeline, engine=engine, ray_cpus=0.5, ray_max_batch=4, torch_threads=1,
                                       max_frame_age_s=0.0)
    return cfg


async def stream(port: int, codec, camera: str, packets: list[bytes]) -> dict[int, list[tuple]]:
    async with channel(port) as ch:
        call = pb_grpc.LatentcastStub(ch).Stream()
        await call.write(pb.EdgeMessage(header=pb.SessionHeader(
            camera_id=camera, task="traffic", labels=LABELS, codec_id=codec.codec_id,
            weights_hash=codec.weights_hash, width=SIZE[0], height=SIZE[1], fps=10.0, edge_version="test")))
        await read(call)
        for seq, p in enumerate(packets):
            await call.write(pb.EdgeMessage(frame=pb.FramePacket(seq=seq, packet=p)))
        await call.done_writing()
        msgs = await collect(call, len(packets))
    assert not kinds(msgs, "error"), kinds(msgs, "error")
    return {r.seq: sorted((b.label, round(b.x0, 1), round(b.y0, 1), round(b.x1, 1), round(b.y1, 1), round(b.score, 3))
                          for b in r.boxes) for r in kinds(msgs, "result")}


async def run_engine(engine: str, codec, packets) -> dict:
    srv = CloudServer(config(engine), codec=codec)
    await srv.start()
    try:
        await srv.wait_ready(180)
        port = srv.ports[0]
        a, b = await asyncio.gather(stream(port, codec, "cam-a", packets), stream(port, codec, "cam-b", packets[::-1]))
        m = srv.metrics
        assert m.value("latentcast_cloud_engine_info", {"engine": engine}) == 1
        calls = m.value("latentcast_cloud_remote_seconds_count", {"stage": "analytics"})
        assert calls == (2 * len(packets) + 1 if engine == "ray" else 0)  # every frame, and the warm-up's
        return {"cam-a": a, "cam-b": b, "detector": type(srv.detector).__name__}
    finally:
        await srv.stop(1.0)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (2 CPUs, no dashboard); each test deletes the stages it deployed."""
    import ray
    from ray import serve

    kw = {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False}
    try:
        ray.init(**kw)
    except RuntimeError:  # Ray's GCS can miss its start-up deadline on a loaded 2-core machine: once more
        ray.shutdown()
        ray.init(**kw)
    yield
    serve.shutdown()
    ray.shutdown()


def _delete_stages() -> None:
    from ray import serve

    from latentcast.cloud.serve_stages import APP_NAME

    serve.delete(APP_NAME)


async def ray_then_embedded(run):
    """``run("ray")`` (its stages deleted afterwards, whatever happens), then ``run("embedded")``."""
    try:
        remote = await run("ray")
    finally:
        _delete_stages()
    return remote, await run("embedded")


@contextlib.asynccontextmanager
async def tiny_cloud(engine: str, codec, weights_path, *, codec_kw: dict | None = None,
                     composer_kw: dict | None = None):
    """A ready loopback cloud of ``engine`` with the tiny codec (its weights file, for the Ray stages to load)
    and no detector."""
    cfg = config(engine)
    cfg.codec = dataclasses.replace(cfg.codec, weights=str(weights_path), **(codec_kw or {}))
    cfg.analytics = dataclasses.replace(cfg.analytics, kind="none")
    if composer_kw:
        cfg.composer = dataclasses.replace(cfg.composer, **composer_kw)
    srv = CloudServer(cfg, codec=codec)
    await srv.start()
    try:
        await srv.wait_ready(WAIT)
        yield srv
    finally:
        await srv.stop(1.0)


async def test_ray_engine_matches_the_embedded_engine(vtest_packets, local_ray):
    codec, packets = vtest_packets
    remote, local = await ray_then_embedded(lambda engine: run_engine(engine, codec, packets))
    assert remote["detector"] == "RemoteDetector" and local["detector"] != "RemoteDetector"
    for cam in ("cam-a", "cam-b"):
        assert sorted(remote[cam]) == list(range(N_FRAMES))  # every frame analysed
        assert remote[cam] == local[cam]
    n_boxes = sum(len(v) for v in local["cam-a"].values())
    assert n_boxes >= N_FRAMES, "vtest frames have people: the comparison must compare boxes"
    assert np.isfinite(n_boxes)


def test_ray_engine_config_is_checked():
    from latentcast.cloud.config import PipelineConfig

    with pytest.raises(ValueError, match="pipeline.engine 'spark' is not one of embedded, ray"):
        PipelineConfig(engine="spark")
    with pytest.raises(ValueError, match="ray_min_replicas 3 must be >= 1 and <= pipeline.ray_max_replicas 2"):
        PipelineConfig(ray_min_replicas=3, ray_max_replicas=2)


def test_the_embedded_path_never_imports_ray():
    import subprocess
    import sys

    code = ("import sys, latentcast.cloud.server, latentcast.cloud.pipeline, latentcast.cloud.decode; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"


async def test_ray_engine_renders_temporal_streams(local_ray, tiny_codec, tiny_codec_path, tiny_bundle, tmp_path):
    """A temporal stream: decoded in order on the front, rendered whole by the Synthesis deployment; every frame
    is analysed and its picture is the embedded engine's (which renders only the changed cells) within 35 dB."""

    from latentcast.edge.config import TemporalConfig
    from latentcast.edge.encoder import EdgeEncoder
    from latentcast.edge.temporal import TemporalEncoder
    from latentcast.proto.temporal import TemporalTables
    from tests.test_cloud_server import H, W
    from tests.test_cloud_temporal import _frames

    tables = tmp_path / "tiny-temporal.safetensors"
    TemporalTables.flat(M=tiny_codec.M, n_rates=tiny_codec.n_rates).save(tables, weights_hash=tiny_codec.weights_hash)
    enc = TemporalEncoder(compressor=EdgeEncoder(bundle=tiny_bundle),
                          tables=TemporalTables.load(tables, weights_hash=tiny_codec.weights_hash),
                          config=TemporalConfig(mode="temporal", refresh_s=0.0), fps=10.0)
    lsh = label_set_hash(["person", "car"])
    packets = [enc.encode(f, rois, label_set_hash=lsh) for f, rois in _frames(8)]

    async def run(engine: str) -> dict[int, np.ndarray]:
        async with tiny_cloud(engine, tiny_codec, tiny_codec_path, codec_kw={"temporal_tables": str(tables)}) as srv:
            return await stream_and_watch(srv, tiny_codec, packets)

    remote, local = await ray_then_embedded(run)
    assert all(f.shape == (H, W, 3) for f in remote.values())
    assert_close(remote, local, len(packets), 35)


async def test_ray_engine_composes_on_the_compose_deployment(local_ray, tiny_codec, tiny_codec_path):
    """composer.kind controlnet (tiny random SD components, no hub): the Synthesis deployment returns ẑ_c, the
    Compose deployment makes the frames; they are the embedded engine's (same seeds per stream)."""
    pytest.importorskip("diffusers")

    from tests.test_cloud_server import H, W

    rng = np.random.default_rng(0)
    lsh = label_set_hash(["person", "car"])
    packets = [tiny_codec.compress((rng.random((H, W, 3)) * 255).astype(np.uint8),
                                   [Roi(x0=8 * i, y0=0, x1=8 * i + 32, y1=32, label_id=0)], rate_point=1,
                                   label_set_hash=lsh) for i in range(3)]

    async def run(engine: str) -> dict[int, np.ndarray]:
        composer = {"kind": "controlnet", "sd": "tiny", "steps": 2}
        async with tiny_cloud(engine, tiny_codec, tiny_codec_path, composer_kw=composer) as srv:
            if engine == "ray":
                assert type(srv.composer).__name__ == "RemoteComposer"
            out = await stream_and_watch(srv, tiny_codec, packets)
            if engine == "ray":
                assert srv.metrics.value("latentcast_cloud_remote_seconds_count", {"stage": "compose"}) >= 3
            return out

    remote, local = await ray_then_embedded(run)
    assert_close(remote, local, len(packets), 30)
