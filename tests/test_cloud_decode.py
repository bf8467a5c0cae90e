"""cloud/decode.py: the decoder registry keyed by the session's codec id, and the JPEG baseline codec
(off by default; bounded by its frame header before decoding; bad bytes are a FrameError, the stream goes on)."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")
torch.set_num_threads(1)

from latentcast.cloud.config import CloudConfig, PipelineConfig, load_cloud_config  # noqa: E402
from latentcast.cloud.decode import (  # noqa: E402
    JPEG_CODEC_ID,
    DecoderRegistry,
    JpegDecoder,
    JpegPacket,
    PacketRefused,
    jpeg_frame_size,
)
from latentcast.cloud.frames import FrameFailure, FrameJob  # noqa: E402
from latentcast.cloud.sessions import SessionRejected, SessionSpec  # noqa: E402
from latentcast.proto import latentcast_v1_pb2 as pb  # noqa: E402
from latentcast.proto import latentcast_v1_pb2_grpc as pb_grpc  # noqa: E402
from latentcast.proto.ids import CODEC_IDS, codec_name, label_set_hash  # noqa: E402

from .test_cloud_server import (  # noqa: E402
    LABELS,
    H,
    W,
    channel,
    collect,
    frame,
    header,
    kinds,
    make_config,
    make_server,  # noqa: F401 - a fixture
    packets,  # noqa: F401 - a fixture
    read,
    write_then_status,
)

HASH = bytes(range(8))
SPEC = SessionSpec(camera_id="cam", task="t", labels=tuple(LABELS), label_set_hash=label_set_hash(LABELS), width=W,
                   height=H, fps=10.0, edge_version="t")


def jpeg(w: int = W, h: int = H, *, seed: int = 0, progressive: bool = False) -> bytes:
    rgb = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_QUALITY, 75, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)])
    assert ok
    return buf.tobytes()


def declaring(data: bytes, w: int, h: int) -> bytes:
    """``data`` with its baseline frame header (SOF0) claiming ``w`` x ``h``; the scan is unchanged."""
    i = data.find(b"\xff\xc0")
    out = data[:i + 5] + h.to_bytes(2, "big") + w.to_bytes(2, "big") + data[i + 9:]
    assert jpeg_frame_size(out) == (w, h)
    return out


def header_only(data: bytes) -> bytes:
    """SOI ... SOF0 then EOI: a valid frame header, no image (OpenCV decodes nothing)."""
    i = data.find(b"\xff\xc0")
    return data[:i + 2 + int.from_bytes(data[i + 2:i + 4], "big")] + b"\xff\xd9"


@dataclasses.dataclass
class _Codec:
    codec_id: int = 1
    weights_hash: bytes = HASH
    codec_name: str = "elic-lite"


def session_header(**kw) -> pb.SessionHeader:
    h = dict(camera_id="cam", task="t", labels=LABELS, codec_id=1, weights_hash=HASH, width=W, height=H, fps=10.0)
    h.update(kw)
    return pb.SessionHeader(**h)


# ------------------------------------------------------------------------------------------ the JPEG header

def test_jpeg_frame_size_reads_the_frame_header_without_decoding():
    assert CODEC_IDS["jpeg"] == JPEG_CODEC_ID == 100 and codec_name(100) == "jpeg"
    assert jpeg_frame_size(jpeg()) == (W, H)
    assert jpeg_frame_size(jpeg(640, 480, progressive=True)) == (640, 480)  # SOF2
    data = jpeg()
    assert jpeg_frame_size(data[:2] + b"\xff\xff\xff" + data[2:]) == (W, H)  # fill bytes before a marker


@pytest.mark.parametrize("data,needle", [
    (b"", "do not start with the JPEG SOI marker"),
    (b"GIF89a" + b"\0" * 32, "do not start with the JPEG SOI marker"),
    (b"\xff\xd8\xff\xda\x00\x08" + b"\0" * 8, "ffda (SOS, the scan) before the frame header"),
    (b"\xff\xd8\xff\xe0\x00\x01", "has length 1"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", "truncated"),
    (b"\xff\xd8\x12\x34", "expected a marker"),
    (b"\xff\xd8" + b"\xff\xe1\x00\x02" * 2000, "no frame header (SOFn) within the first 1024 markers"),
    (b"\xff\xd8" + b"\xff" * 5000, "no frame header (SOFn) within the first 1024 markers"),
    (b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x00\x00\x60\x03", "declares 96x0"),
])
def test_jpeg_frame_size_refuses_what_is_not_a_jpeg_frame(data, needle):
    with pytest.raises(ValueError) as ei:
        jpeg_frame_size(data)
    assert needle in str(ei.value)


def test_jpeg_admission_bounds_the_declared_size():
    dec = JpegDecoder(max_frame_pixels=1920 * 1088)
    assert dec.admit(jpeg(), SPEC) == JpegPacket(data=jpeg(), width=W, height=H)
    with pytest.raises(PacketRefused) as ei:
        dec.admit(declaring(jpeg(), 8192, 8192), SPEC)
    assert ei.value.code == "frame_size_mismatch" and not ei.value.ends_stream
    assert "8192x8192" in ei.value.message and "sessions.max_frame_pixels" in ei.value.message
    with pytest.raises(PacketRefused) as ei:
        dec.admit(jpeg(2 * W, H), SPEC)
    assert ei.value.code == "frame_size_mismatch" and f"is not the session's {W}x{H}" in ei.value.message
    with pytest.raises(PacketRefused) as ei:
        dec.admit(b"garbage" * 10, SPEC)
    assert ei.value.code == "malformed_packet" and not ei.value.ends_stream and "not a JPEG frame" in ei.value.message


def test_jpeg_decode_in_a_worker():
    reg = DecoderRegistry.for_codec(_Codec(), names=["latentcast", "jpeg"])
    data = jpeg()
    ok = reg.decode(FrameJob(stream_id="s", spec=SPEC, seq=0, capture_ts_us=0, packet=data, packet_bytes=len(data),
                             codec_id=JPEG_CODEC_ID))
    assert not isinstance(ok, FrameFailure) and ok.frame.shape == (H, W, 3) and ok.rec is None and ok.labels == []
    want = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(ok.frame, want)
    empty = reg.decode(FrameJob(stream_id="s", spec=SPEC, seq=1, capture_ts_us=0, packet=header_only(data),
                                packet_bytes=1, codec_id=JPEG_CODEC_ID))
    assert isinstance(empty, FrameFailure) and empty.code == "decode_failed"
    assert "OpenCV decoded nothing" in empty.message
    off = DecoderRegistry.for_codec(_Codec()).decode(FrameJob(stream_id="s", spec=SPEC, seq=2, capture_ts_us=0,
                                                              packet=data, packet_bytes=1, codec_id=JPEG_CODEC_ID))
    assert isinstance(off, FrameFailure) and off.code == "wrong_codec" and "100" in off.message


# ------------------------------------------------------------------------------------------ the registry

def test_registry_picks_the_decoder_by_the_sessions_codec_id():
    reg = DecoderRegistry.for_codec(_Codec(), names=["latentcast", "jpeg"])
    spec, dec = reg.session(session_header(), CloudConfig().sessions)
    assert dec.name == "latentcast" and spec.camera_id == "cam"
    spec, dec = reg.session(session_header(codec_id=100, weights_hash=b""), CloudConfig().sessions)
    assert dec.name == "jpeg" and (spec.width, spec.height) == (W, H)  # a JPEG has no weights: any hash
    assert reg.names == ("latentcast", "jpeg") and reg.describe() == "1 (elic-lite) or 100 (jpeg)"


def test_the_temporal_render_settings_come_from_the_config():
    from latentcast.cloud.config import CodecConfig

    cfg = CloudConfig()
    assert DecoderRegistry.from_config(cfg, _Codec()).get(1).render == {"tiled": True, "grow": 0, "halo": 3,
                                                                       "runtime": "auto", "threads": 0}
    cfg.codec = CodecConfig(temporal_render="whole", render_grow=0, render_halo=2, render_runtime="torch")
    cfg.pipeline.torch_threads = 1
    assert DecoderRegistry.from_config(cfg, _Codec()).get(1).render == {"tiled": False, "grow": 0, "halo": 2,
                                                                       "runtime": "torch", "threads": 1}
    with pytest.raises(ValueError, match="codec.render_runtime 'tvm' is not one of auto, onnx, torch, bf16"):
        CodecConfig(render_runtime="tvm")
    with pytest.raises(ValueError, match="codec.temporal_render 'some' is not one of changed, whole"):
        CodecConfig(temporal_render="some")
    with pytest.raises(ValueError, match=r"codec.render_halo -1 must be an integer in 0..16"):
        CodecConfig(render_halo=-1)


@pytest.mark.parametrize("names,codec_id,needles", [
    (["latentcast", "jpeg"], 99, ["codec_id 99 (unknown)", "1 (elic-lite) or 100 (jpeg)",
                                  "pipeline.codecs: latentcast, jpeg"]),
    (["latentcast", "jpeg"], 2, ["codec_id 2 (elic-paper)", "1 (elic-lite) or 100 (jpeg)"]),
    (["latentcast"], 100, ["codec_id 100 (jpeg) does not match the cloud's codec 1 (elic-lite)",
                           "pipeline.codecs: latentcast;", "known: latentcast, jpeg"]),
    (["jpeg"], 1, ["codec_id 1 (elic-lite) does not match the cloud's codec 100 (jpeg)"]),
])
def test_a_codec_not_accepted_is_failed_precondition_naming_the_valid_ones(names, codec_id, needles):
    reg = DecoderRegistry.for_codec(_Codec(), names=names)
    with pytest.raises(SessionRejected) as ei:
        reg.session(session_header(codec_id=codec_id), CloudConfig().sessions)
    assert ei.value.code == grpc.StatusCode.FAILED_PRECONDITION
    for needle in needles:
        assert needle in ei.value.message, ei.value.message


def test_a_malformed_header_is_invalid_argument_whatever_its_codec():
    reg = DecoderRegistry.for_codec(_Codec())
    with pytest.raises(SessionRejected) as ei:
        reg.session(session_header(codec_id=99, camera_id=""), CloudConfig().sessions)
    assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT and "camera_id must not be empty" in ei.value.message
    with pytest.raises(SessionRejected) as ei:  # the weights of an accepted codec are still checked
        reg.session(session_header(weights_hash=b"\xff" * 8), CloudConfig().sessions)
    assert ei.value.code == grpc.StatusCode.FAILED_PRECONDITION and "ffffffffffffffff" in ei.value.message


def test_the_codecs_setting():
    assert PipelineConfig().codecs == ["latentcast"]  # JPEG is off in a production cloud
    with pytest.raises(ValueError, match=r"unknown codec name\(s\) 'png' \(valid: latentcast, jpeg\)"):
        PipelineConfig(codecs=["latentcast", "png"])
    with pytest.raises(ValueError, match="non-empty list"):
        PipelineConfig(codecs=[])
    cfg = load_cloud_config(None, env={"LATENTCAST_CLOUD__PIPELINE__CODECS": "latentcast,jpeg"})
    assert cfg.pipeline.codecs == ["latentcast", "jpeg"]
    with pytest.raises(ValueError, match="unknown codec name"):
        DecoderRegistry.for_codec(_Codec(), names=["gif"])


# ------------------------------------------------------------------------------------------ a loopback cloud

def jpeg_header(camera: str = "jpeg-cam", **kw) -> pb.EdgeMessage:
    h = dict(camera_id=camera, task="traffic", labels=LABELS, codec_id=JPEG_CODEC_ID, weights_hash=b"\0" * 8,
             width=W, height=H, fps=10.0, edge_version="test")
    h.update(kw)
    return pb.EdgeMessage(header=pb.SessionHeader(**h))


def jpeg_config() -> CloudConfig:
    cfg = make_config()
    cfg.pipeline = dataclasses.replace(cfg.pipeline, codecs=["latentcast", "jpeg"])
    return cfg


async def test_jpeg_is_refused_by_a_default_cloud(make_server, tiny_codec):  # noqa: F811
    srv = await make_server()
    async with channel(srv.ports[0]) as ch:
        err = await write_then_status(pb_grpc.LatentcastStub(ch).Stream(), jpeg_header())
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "codec_id 100 (jpeg)" in err.details() and f"the cloud's codec {tiny_codec.codec_id} (" in err.details()
    assert "pipeline.codecs: latentcast;" in err.details()


async def test_unknown_codec_on_a_jpeg_cloud_names_both(make_server, tiny_codec):  # noqa: F811
    srv = await make_server(jpeg_config())
    async with channel(srv.ports[0]) as ch:
        err = await write_then_status(pb_grpc.LatentcastStub(ch).Stream(), header(tiny_codec, codec_id=99))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "codec_id 99 (unknown)" in err.details() and "or 100 (jpeg)" in err.details()


async def test_jpeg_stream_through_a_loopback_cloud(make_server, tiny_codec, packets,  # noqa: F811
                                                    monkeypatch):
    """JPEG frames are decoded and analysed by the real cloud; garbage, a JPEG declaring too many pixels or
    another size, and one OpenCV cannot decode are FrameErrors (the oversized one never reaches the decoder),
    and the stream goes on; a latentcast stream on the same cloud is unaffected."""
    decoded: list[int] = []
    real = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda buf, flags: (decoded.append(len(buf)), real(buf, flags))[1])
    srv = await make_server(jpeg_config())
    good = jpeg()
    sent = [good, b"\x00garbage, not a JPEG" * 4, declaring(jpeg(seed=1), 8192, 8192), jpeg(2 * W, H),
            header_only(good), jpeg(seed=2)]
    async with channel(srv.ports[0]) as ch:
        stub = pb_grpc.LatentcastStub(ch)
        call = stub.Stream()
        await call.write(jpeg_header())
        assert (await read(call)).WhichOneof("msg") == "accepted"
        lc = stub.Stream()
        await lc.write(header(tiny_codec, camera="lc-cam"))
        assert (await read(lc)).WhichOneof("msg") == "accepted"
        for seq, data in enumerate(sent):
            await call.write(frame(seq, data))
        await lc.write(frame(0, packets[0]))
        msgs = await collect(call, until=lambda ms: len(kinds(ms, "result")) + len(kinds(ms, "error")) >= 6
                             and any(a.acked_seq == 5 for a in kinds(ms, "ack")))
        lc_msgs = await collect(lc, until=lambda ms: len(kinds(ms, "result")) >= 1)
        await call.done_writing()
        await lc.done_writing()
    results = {r.seq: r for r in kinds(msgs, "result")}
    errors = {e.seq: e for e in kinds(msgs, "error")}
    assert sorted(results) == [0, 5]
    assert {s: e.code for s, e in errors.items()} == {1: "malformed_packet", 2: "frame_size_mismatch",
                                                      3: "frame_size_mismatch", 4: "decode_failed"}
    assert "8192x8192" in errors[2].message and "sessions.max_frame_pixels" in errors[2].message
    assert "not a JPEG frame" in errors[1].message and f"{2 * W}x{H}" in errors[3].message
    r = results[0]
    assert r.packet_bytes == len(good) and r.bpp == pytest.approx(len(good) * 8 / (W * H), rel=1e-5)
    assert r.boxes[0].label == "person" and r.boxes[0].x1 == W / 2  # the detector saw the whole W x H frame
    assert sorted(decoded) == sorted([len(good), len(header_only(good)), len(sent[5])])  # 2 and 3: never decoded
    assert kinds(lc_msgs, "result")[0].seq == 0
    m = srv.metrics
    assert m.value("latentcast_cloud_frames_decoded_total") == 3
    assert m.value("latentcast_cloud_frame_errors_total", {"code": "frame_size_mismatch"}) == 2
    assert m.value("latentcast_cloud_frame_errors_total", {"code": "malformed_packet"}) == 1
