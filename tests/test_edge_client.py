"""edge.client against a small fake cloud (grpc.aio on 127.0.0.1): order, resume, auth, fatal statuses."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest

from latentcast.edge.client import EdgeClient, FatalStreamError, GaveUpError, TlsConfig, channel_options
from latentcast.edge.sender import Backlog, OutFrame, SendQueue
from latentcast.proto import latentcast_v1_pb2 as pb
from latentcast.proto import latentcast_v1_pb2_grpc as pb_grpc


class CameraState:
    def __init__(self) -> None:
        self.next_seq = 0
        self.processed: list[int] = []  # seqs processed, in order
        self.duplicates = 0  # frames received again (acked, not processed)


class FakeCloud(pb_grpc.LatentcastServicer):
    """Implements Stream per the proto's session semantics; state keyed by camera_id lives in
    ``cameras`` and survives server restarts when the same dict is passed in."""

    def __init__(self, cameras: dict[str, CameraState], *, token: str | None = None, codec_id: int | None = None,
                 on_frame=None):
        self.cameras, self.token, self.codec_id, self.on_frame = cameras, token, codec_id, on_frame
        self.auth_seen: list[str | None] = []
        self.headers: list[pb.SessionHeader] = []

    async def Stream(self, request_iterator, context):
        md = dict(context.invocation_metadata())
        self.auth_seen.append(md.get("authorization"))
        if self.token is not None and md.get("authorization") != f"Bearer {self.token}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        first = await anext(aiter(request_iterator))
        if first.WhichOneof("msg") != "header":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "SessionHeader must come first")
        hdr = first.header
        self.headers.append(hdr)
        if self.codec_id is not None and hdr.codec_id != self.codec_id:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"codec {hdr.codec_id} not served")
        cam = self.cameras.setdefault(hdr.camera_id, CameraState())
        yield pb.CloudMessage(accepted=pb.SessionAccepted(session_id="s1", next_seq=cam.next_seq))
        async for m in request_iterator:
            f = m.frame
            if f.seq < cam.next_seq:
                cam.duplicates += 1
            else:
                cam.processed.append(f.seq)
                cam.next_seq = f.seq + 1
                if self.on_frame is not None:
                    await self.on_frame(f)
                if f.packet == b"bad":
                    yield pb.CloudMessage(error=pb.FrameError(seq=f.seq, code="malformed_packet", message="bad"))
                else:
                    yield pb.CloudMessage(result=pb.FrameAnalytics(seq=f.seq, capture_ts_us=f.capture_ts_us,
                                                                   packet_bytes=len(f.packet)))
            yield pb.CloudMessage(ack=pb.Ack(acked_seq=cam.next_seq - 1, frames_received=len(cam.processed)))


async def start_server(servicer: FakeCloud, port: int = 0) -> tuple[grpc.aio.Server, int]:
    for _ in range(50):  # rebinding a just-closed port can take a moment
        server = grpc.aio.server()
        pb_grpc.add_LatentcastServicer_to_server(servicer, server)
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
        if bound:
            await server.start()
            return server, bound
        await asyncio.sleep(0.05)
    raise RuntimeError(f"could not bind 127.0.0.1:{port}")


def session(camera_id: str = "cam-1") -> dict:
    return {"camera_id": camera_id, "task": "test", "labels": ["person"], "codec_id": 1,
            "weights_hash": b"\0" * 8, "width": 64, "height": 64, "fps": 10.0}


def frame(seq: int, packet: bytes = b"x" * 100) -> OutFrame:
    return OutFrame(seq=seq, capture_ts_us=1_000 + seq, packet=packet,
                    boxes=(pb.Box(x0=1, y0=2, x1=3, y1=4, label="person", label_id=0, score=0.5),))


def client(port: int, **kw) -> EdgeClient:
    kw.setdefault("session", session())
    kw.setdefault("queue", SendQueue(maxsize=1000, policy="drop-newest"))
    kw.setdefault("backoff_initial_s", 0.05)
    kw.setdefault("backoff_max_s", 0.2)
    kw.setdefault("accept_timeout_s", 5.0)
    kw.setdefault("max_reconnect_attempts", 40)
    return EdgeClient(target=f"127.0.0.1:{port}", **kw)


async def test_frames_arrive_in_order_with_results_and_token():
    cameras: dict[str, CameraState] = {}
    cloud = FakeCloud(cameras, token="s3cret")
    server, port = await start_server(cloud)
    got = []
    try:
        c = client(port, token="s3cret", on_result=got.append, result_queue_size=4)
        for i in range(20):
            c.queue.put(frame(i))
        c.queue.close()
        await asyncio.wait_for(c.run(), 10)
    finally:
        await server.stop(None)
    cam = cameras["cam-1"]
    assert cam.processed == list(range(20)) and cam.duplicates == 0
    assert [r.seq for r in got] == list(range(20)) and got[0].packet_bytes == 100
    assert c.results.qsize() == 4 and c.results_dropped == 16
    assert cloud.auth_seen == ["Bearer s3cret"]
    assert cloud.headers[0].camera_id == "cam-1" and list(cloud.headers[0].labels) == ["person"]
    assert len(c.backlog) == 0 and c.backlog.acked == 20
    s = c.stats()
    assert s["connects"] == 1 and s["reconnects"] == 0 and s["frames_written"] == 20 and s["queue"]["sent"] == 20


async def test_server_restart_resumes_without_loss_or_duplicate_processing():
    cameras: dict[str, CameraState] = {}
    state = {"server": None}
    restarted = asyncio.Event()
    n = 60

    async def on_frame(f):
        if f.seq == 20 and not restarted.is_set():  # kill the server mid-stream, in-flight frames unacked
            restarted.set()
            asyncio.get_running_loop().create_task(restart())

    async def restart():
        old = state["server"]
        await old.stop(None)
        await asyncio.sleep(0.3)  # the client sees the outage and backs off
        state["server"], _ = await start_server(FakeCloud(cameras, on_frame=on_frame), port)

    state["server"], port = await start_server(FakeCloud(cameras, on_frame=on_frame))
    c = client(port)
    stop = asyncio.Event()

    async def produce():
        for i in range(n):
            c.queue.put(frame(i))
            await asyncio.sleep(0.01)
        c.queue.close()

    try:
        await asyncio.wait_for(asyncio.gather(produce(), c.run(stop)), 20)
    finally:
        await state["server"].stop(None)
    cam = cameras["cam-1"]
    assert restarted.is_set()
    assert cam.processed == list(range(n))  # no loss, no duplicate processing, in order
    assert c.reconnects >= 1 and c.connects == c.reconnects + 1
    assert len(c.backlog) == 0 and c.backlog.lost_to_backlog == 0


async def test_resume_skips_what_the_cloud_already_has():
    cameras = {"cam-1": CameraState()}
    cameras["cam-1"].next_seq = 5
    server, port = await start_server(FakeCloud(cameras))
    try:
        backlog = Backlog(max_frames=100, max_bytes=10**6)
        for i in range(8):  # written before a (simulated) previous connection dropped
            backlog.add(frame(i))
        c = client(port, backlog=backlog)
        c.queue.put(frame(8))
        c.queue.close()
        await asyncio.wait_for(c.run(), 10)
    finally:
        await server.stop(None)
    assert cameras["cam-1"].processed == [5, 6, 7, 8]
    assert c.frames_resent == 3 and c.frames_written == 1


async def test_unauthenticated_is_fatal():
    cloud = FakeCloud({}, token="right")
    server, port = await start_server(cloud)
    try:
        c = client(port, token="wrong")
        c.queue.put(frame(0))
        with pytest.raises(FatalStreamError, match="UNAUTHENTICATED: missing or wrong bearer token") as ei:
            await asyncio.wait_for(c.run(), 10)
        assert ei.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert c.connect_attempts == 1 and c.connects == 0
        c2 = client(port)  # no token at all
        with pytest.raises(FatalStreamError, match="UNAUTHENTICATED"):
            await asyncio.wait_for(c2.run(), 10)
        assert cloud.auth_seen == ["Bearer wrong", None]
    finally:
        await server.stop(None)


async def test_failed_precondition_is_fatal():
    server, port = await start_server(FakeCloud({}, codec_id=99))
    try:
        with pytest.raises(FatalStreamError, match="FAILED_PRECONDITION: codec 1 not served"):
            await asyncio.wait_for(client(port).run(), 10)
    finally:
        await server.stop(None)


async def test_unreachable_server_backs_off_then_gives_up():
    server, port = await start_server(FakeCloud({}))
    await server.stop(None)  # a port nobody listens on any more
    c = client(port, max_reconnect_attempts=2, backoff_initial_s=0.01, backoff_max_s=0.02)
    with pytest.raises(GaveUpError, match="after 3 failed attempt"):
        await asyncio.wait_for(c.run(), 10)
    assert c.connect_attempts == 3 and c.connect_failures == 3 and "UNAVAILABLE" in c.last_error


async def test_frame_errors_are_counted_and_stop_event_ends_run():
    cameras: dict[str, CameraState] = {}
    server, port = await start_server(FakeCloud(cameras))
    try:
        c = client(port)
        c.queue.put(frame(0, b"bad"))
        c.queue.put(frame(1))
        stop = asyncio.Event()
        task = asyncio.create_task(c.run(stop))
        for _ in range(200):
            if c.acks >= 2:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 5)
    finally:
        await server.stop(None)
    assert c.frame_errors == {"malformed_packet": 1} and c.results_received == 1


async def test_too_large_frames_are_dropped_not_fatal():
    cameras: dict[str, CameraState] = {}
    server, port = await start_server(FakeCloud(cameras))
    try:
        c = client(port, max_message_bytes=2048)
        c.queue.put(frame(0, b"y" * 4096))
        c.queue.put(frame(1))
        c.queue.close()
        await asyncio.wait_for(c.run(), 10)
    finally:
        await server.stop(None)
    assert cameras["cam-1"].processed == [1] and c.dropped_too_large == 1


def test_options_and_bad_arguments(tmp_path):
    opts = dict(channel_options(keepalive_s=20, keepalive_timeout_s=5, max_message_bytes=1 << 20))
    assert opts["grpc.keepalive_time_ms"] == 20000 and opts["grpc.keepalive_timeout_ms"] == 5000
    assert opts["grpc.keepalive_permit_without_calls"] == 1
    assert opts["grpc.max_send_message_length"] == opts["grpc.max_receive_message_length"] == 1 << 20
    with pytest.raises(ValueError, match="camera_id is empty"):
        EdgeClient(target="127.0.0.1:1", session={"camera_id": ""})
    with pytest.raises(ValueError, match=r"unknown SessionHeader field\(s\) \['camera'\]"):
        EdgeClient(target="127.0.0.1:1", session={"camera": "x"})
    with pytest.raises(ValueError, match="backoff_jitter 1.5"):
        EdgeClient(target="127.0.0.1:1", session=session(), backoff_jitter=1.5)
    # the header tells the cloud the edge's window, so its cumulative acks never stall the edge
    assert EdgeClient(target="127.0.0.1:1", session=session(), max_in_flight=3).session.max_in_flight == 3
    with pytest.raises(FileNotFoundError, match="TLS root_certs file .*ca.pem not found"):
        EdgeClient(target="127.0.0.1:1", session=session(), tls=TlsConfig(root_certs=tmp_path / "ca.pem"))
    with pytest.raises(ValueError, match="mTLS needs both client_cert and client_key"):
        TlsConfig(client_cert="c.pem").credentials()


def _self_signed(tmp_path):
    """A throwaway self-signed certificate for 'localhost' (PEM files)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    return cert_pem, key_pem


async def test_tls_with_throwaway_certificate(tmp_path):
    pytest.importorskip("cryptography", reason="making a throwaway TLS certificate needs the 'cryptography' package")
    cert_pem, key_pem = _self_signed(tmp_path)
    cameras: dict[str, CameraState] = {}
    server = grpc.aio.server()
    pb_grpc.add_LatentcastServicer_to_server(FakeCloud(cameras, token="t"), server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key_pem, cert_pem)]))
    await server.start()
    try:
        c = client(port, token="t", tls=TlsConfig(root_certs=tmp_path / "cert.pem", server_name="localhost"))
        c.queue.put(frame(0))
        c.queue.close()
        await asyncio.wait_for(c.run(), 10)
    finally:
        await server.stop(None)
    assert cameras["cam-1"].processed == [0]


# ---------------------------------------------------------------------- edge config and EdgeApp


def test_edge_config_yaml_env_and_errors(tmp_path):
    from latentcast.config import ConfigError, describe_config
    from latentcast.edge.config import ENV_PREFIX, EdgeConfig, load_edge_config

    p = tmp_path / "edge.yaml"
    p.write_text("camera_id: gate-3\nsource:\n  uri: rtsp://cam/1\n  resize: [640, 360]\n"
                 "grounding:\n  labels: [pedestrian, vehicle]\nsender:\n  policy: drop-newest\n")
    cfg = load_edge_config(p, env={"LATENTCAST_EDGE__SERVER__TOKEN": "tok", "LATENTCAST_EDGE__CODEC__RATE_POINT": "1"})
    assert cfg.camera_id == "gate-3" and cfg.source.resize == (640, 360)
    assert cfg.grounding.labels == ["pedestrian", "vehicle"] and cfg.sender.policy == "drop-newest"
    assert cfg.server.resolved_token() == "tok" and cfg.codec.rate_point == 1
    keys = {row[0] for row in describe_config(EdgeConfig, ENV_PREFIX)}
    assert {"server.keepalive_s", "sender.backlog_bytes", "source.pace", "codec.roi_only"} <= keys
    p.write_text("sender:\n  policy: lifo\n")
    with pytest.raises(ConfigError, match="sender.policy 'lifo' is not one of drop-oldest, drop-newest"):
        load_edge_config(p, env={})
    with pytest.raises(ConfigError, match="source.pace 'fast' is not one of realtime, none"):
        load_edge_config(None, env={"LATENTCAST_EDGE__SOURCE__PACE": "fast"})
    tf = tmp_path / "token"
    tf.write_text("abc\n")
    cfg = load_edge_config(None, env={"LATENTCAST_EDGE__SERVER__TOKEN_FILE": str(tf)})
    assert cfg.server.resolved_token() == "abc"


async def test_edge_app_streams_vtest_frames(tiny_bundle):
    from latentcast.edge.app import EdgeApp
    from latentcast.edge.config import EdgeConfig
    from latentcast.proto import bitstream
    from latentcast.proto.ids import label_set_hash
    from tests.conftest import shared_or_skip

    video = shared_or_skip() / "data" / "video" / "vtest.avi"
    packets: list[pb.FramePacket] = []

    async def keep(f):
        packets.append(f)

    cameras: dict[str, CameraState] = {}
    cloud = FakeCloud(cameras, token="tok", on_frame=keep)
    server, port = await start_server(cloud)
    cfg = EdgeConfig(camera_id="vtest")
    cfg.source.uri, cfg.source.pace = str(video), "none"
    cfg.grounding.labels, cfg.grounding.every, cfg.grounding.threads = ["pedestrian", "car"], 3, 1
    cfg.codec.bundle, cfg.codec.rate_point, cfg.codec.threads = str(tiny_bundle), 0, 1
    cfg.sender.queue_size = 16
    cfg.server.target, cfg.server.token = f"127.0.0.1:{port}", "tok"
    cfg.server.backoff_initial_s, cfg.server.backoff_max_s = 0.05, 0.2
    results = []
    app = EdgeApp(cfg, on_result=results.append)
    try:
        stats = await asyncio.wait_for(app.run(max_frames=10), 60)
    finally:
        await server.stop(None)
    assert cameras["vtest"].processed == list(range(10))
    hdr = cloud.headers[0]
    assert (hdr.width, hdr.height, hdr.fps, list(hdr.labels)) == (768, 576, 10.0, ["pedestrian", "car"])
    assert hdr.codec_id == app._encoder.manifest["codec_id"] and hdr.weights_hash == app._encoder.weights_hash
    assert [r.seq for r in results] == list(range(10))
    for f in packets:
        p = bitstream.unpack(f.packet)
        assert p.header.width == 768 and p.header.label_set_hash == label_set_hash(["pedestrian", "car"])
        assert p.header.roi_only and len(p.header.rois) >= 3 and len(f.edge_boxes) == len(p.header.rois)
        assert f.capture_ts_us > 0
    assert stats["frames_captured"] == stats["frames_encoded"] == stats["frames_sent"] == stats["frames_acked"] == 10
    assert stats["dropped"] == {"encoder_busy": 0, "queue_policy": 0, "queue_full_temporal": 0, "backlog_full": 0,
                                "too_large": 0, "uncodable": 0}
    assert stats["detector_runs"] == 4 and stats["results"] == 10 and stats["frames_pending"] == 0
    assert stats["bytes_encoded"] == sum(len(f.packet) for f in packets) == stats["bytes_sent"]
    assert stats["bpp"] == pytest.approx(8 * stats["bytes_encoded"] / (10 * 768 * 576))
    assert stats["kbps"] > 0 and len(stats["last_results"]) == 8 and stats["reconnects"] == 0


async def test_edge_app_background_and_rate_control(tiny_bundle):
    """codec.background codes the cells outside the ROIs coarser (LCF v2); codec.target_kbps steps along
    the background-first ladder: a tiny target drives it to ROI-only at the lowest rate point."""
    from latentcast.edge.app import EdgeApp
    from latentcast.edge.config import EdgeConfig
    from latentcast.proto import bitstream
    from tests.conftest import shared_or_skip

    video = shared_or_skip() / "data" / "video" / "vtest.avi"
    for target, want_last in ((0.0, (2, 1)), (1.0, (0, None))):
        packets: list[pb.FramePacket] = []

        async def keep(f, packets=packets):
            packets.append(f)

        server, port = await start_server(FakeCloud({}, token="tok", on_frame=keep))
        cfg = EdgeConfig(camera_id="bg")
        cfg.source.uri, cfg.source.pace = str(video), "none"
        cfg.grounding.threads, cfg.codec.threads = 1, 1
        cfg.codec.bundle, cfg.codec.rate_point, cfg.codec.background = str(tiny_bundle), 2, "1"
        cfg.codec.target_kbps = target
        cfg.server.target, cfg.server.token = f"127.0.0.1:{port}", "tok"
        app = EdgeApp(cfg)
        if target:
            app._build()
            app.frame_rate.window_s = 0.1  # react within a frame or two
        try:
            stats = await asyncio.wait_for(app.run(max_frames=12), 90)
        finally:
            await server.stop(None)
        hdrs = [bitstream.unpack(f.packet).header for f in packets]
        assert len(hdrs) == 12
        assert (hdrs[0].rate_point, hdrs[0].bg_rate_point) == (2, 1)
        assert (hdrs[-1].rate_point, hdrs[-1].bg_rate_point) == want_last
        if target:
            assert stats["rate_control"]["level"] == len(app.frame_rate.levels) - 1
            assert {(h.rate_point, h.bg_rate_point) for h in hdrs} >= {(2, 1), (2, 0), (2, None)}
        else:
            assert stats["rate_control"] is None and all(h.version == 2 for h in hdrs)


def test_edge_config_background_is_checked():
    from latentcast.edge.config import CodecConfig

    assert CodecConfig(background="NONE").background_level is None
    assert CodecConfig(rate_point=2, background=1).background_level == 1
    with pytest.raises(ValueError, match=r"codec.background 2 out of range: none or a rate point 0\.\.1"):
        CodecConfig(rate_point=1, background="2")
    with pytest.raises(ValueError, match=r"codec.background 'fine': expected 'none' or a rate point"):
        CodecConfig(background="fine")
    with pytest.raises(ValueError, match=r"codec.target_kbps"):
        CodecConfig(target_kbps=-1)


async def test_edge_app_fatal_status_stops_the_run(tiny_bundle):
    from latentcast.edge.app import EdgeApp
    from latentcast.edge.config import EdgeConfig
    from tests.conftest import shared_or_skip

    video = shared_or_skip() / "data" / "video" / "vtest.avi"
    server, port = await start_server(FakeCloud({}, token="right"))
    cfg = EdgeConfig()
    cfg.source.uri, cfg.source.pace = str(video), "none"
    cfg.grounding.threads, cfg.codec.threads, cfg.codec.rate_point = 1, 1, 0
    cfg.codec.bundle = str(tiny_bundle)
    cfg.server.target, cfg.server.token = f"127.0.0.1:{port}", "wrong"
    app = EdgeApp(cfg)
    try:
        with pytest.raises(FatalStreamError, match="UNAUTHENTICATED"):
            await asyncio.wait_for(app.run(max_frames=50), 60)
    finally:
        await server.stop(None)
    assert app.stats()["frames_captured"] < 50


async def test_edge_app_stop_event_ends_a_looping_realtime_run(tiny_bundle):
    from latentcast.edge.app import EdgeApp
    from latentcast.edge.config import EdgeConfig
    from tests.conftest import shared_or_skip

    video = shared_or_skip() / "data" / "video" / "vtest.avi"
    cameras: dict[str, CameraState] = {}
    server, port = await start_server(FakeCloud(cameras))
    cfg = EdgeConfig(camera_id="loop")
    cfg.source.uri, cfg.source.pace, cfg.source.fps, cfg.source.loop = str(video), "realtime", 25.0, True
    cfg.grounding.threads, cfg.codec.threads, cfg.codec.rate_point = 1, 1, 0
    cfg.codec.bundle = str(tiny_bundle)
    cfg.server.target = f"127.0.0.1:{port}"
    stop = asyncio.Event()
    app = EdgeApp(cfg, on_result=lambda r: stop.set() if r.seq >= 2 else None)
    try:
        stats = await asyncio.wait_for(app.run(stop=stop), 30)
    finally:
        await server.stop(None)
    assert stats["results"] >= 3 and stats["frames_captured"] >= stats["frames_encoded"] >= 3
    assert cameras["loop"].processed[:3] == [0, 1, 2]


async def test_edge_app_skips_a_frame_the_coder_refuses(tiny_bundle, monkeypatch):
    """A frame whose latent the entropy coder refuses (values far outside its model: UncodableSymbols) is
    skipped and counted; the stream goes on with the next frames."""
    from latentcast.edge.app import EdgeApp
    from latentcast.edge.config import EdgeConfig
    from latentcast.proto.entropy import UncodableSymbols
    from tests.conftest import shared_or_skip

    video = shared_or_skip() / "data" / "video" / "vtest.avi"
    cameras: dict[str, CameraState] = {}
    server, port = await start_server(FakeCloud(cameras))
    cfg = EdgeConfig(camera_id="odd")
    cfg.source.uri, cfg.source.pace = str(video), "none"
    cfg.grounding.labels, cfg.grounding.every, cfg.grounding.threads = ["pedestrian"], 3, 1
    cfg.codec.bundle, cfg.codec.rate_point, cfg.codec.threads = str(tiny_bundle), 0, 1
    cfg.server.target = f"127.0.0.1:{port}"
    app = EdgeApp(cfg)
    real = app._process
    calls = []

    def process(rgb):  # ground and encode: the third frame's latent is refused by the entropy coder
        calls.append(1)
        if len(calls) == 3:
            raise UncodableSymbols("5000 of the first 6000 symbols are outside their tables' range")
        return real(rgb)

    monkeypatch.setattr(app, "_process", process)
    try:
        stats = await asyncio.wait_for(app.run(max_frames=6), 60)
    finally:
        await server.stop(None)
    assert stats["dropped"]["uncodable"] == 1 and stats["frames_sent"] == 5
    assert cameras["odd"].processed == list(range(5))  # seqs stay contiguous: the skipped frame has none
