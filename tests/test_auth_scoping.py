"""Issue 15, item 3: tokens bound to cameras and roles; safe defaults for the listening addresses.

Against a loopback cloud (port 0, tiny seeded codec) with a token file: a publish token for some
cameras cannot publish (hijack) another camera, and the legitimate stream goes on untouched; a
subscriber sees only the cameras its token may see; roles are enforced; the token file holds hashes
and its mistakes are named; tokens are compared against every entry; a non-loopback bind without TLS
and tokens refuses to start unless ``insecure: true``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import subprocess
import sys

import grpc
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from latentcast.cloud import auth  # noqa: E402
from latentcast.cloud.auth import TokenRegistry, hash_token, load_token_file  # noqa: E402
from latentcast.cloud.config import CloudConfig, ServerConfig, is_loopback  # noqa: E402
from latentcast.cloud.server import CloudServer  # noqa: E402
from latentcast.proto import latentcast_v1_pb2 as pb  # noqa: E402
from latentcast.proto import latentcast_v1_pb2_grpc as pb_grpc  # noqa: E402

from .test_cloud_hardening import (  # noqa: E402
    TIMEOUT,
    FakeDetector,
    assert_no_traceback,
    channel,
    collect,
    frame,
    header,
    kinds,
    make_config,
    packets,  # noqa: F401 - fixture
    status_of,
)

TOKENS = {"gate": "gate-secret", "lobby": "lobby-secret", "viewer": "viewer-secret", "ops": "ops-secret"}


@pytest.fixture
def token_file(tmp_path):
    p = tmp_path / "tokens.yaml"
    p.write_text(f"""tokens:
  - name: gate-edge
    sha256: {hash_token(TOKENS["gate"]).hex()}
    role: publish
    cameras: ["gate-*"]
  - name: lobby-edge
    sha256: {hash_token(TOKENS["lobby"]).hex()}
    role: publish
    cameras: [lobby]
  - name: gate-viewer
    token: {TOKENS["viewer"]}
    role: subscribe
    cameras: ["gate-*"]
  - name: ops
    token: {TOKENS["ops"]}
    role: admin
    cameras: ["*"]
""")
    return p


def md(who: str):
    return (("authorization", f"Bearer {TOKENS[who]}"),)


@pytest.fixture
async def server(tiny_codec, token_file):
    srv = CloudServer(make_config(tokens_file=str(token_file)), codec=tiny_codec, detector=FakeDetector())
    await srv.start()
    await srv.wait_ready(TIMEOUT)
    yield srv
    await srv.stop(0.5)


async def publish(ch, tiny_codec, who: str, camera: str):
    call = pb_grpc.LatentcastStub(ch).Stream(metadata=md(who))
    await call.write(header(tiny_codec, camera=camera))
    return call


async def test_a_publish_token_cannot_hijack_another_camera(server, tiny_codec, packets, caplog):
    caplog.set_level(logging.INFO)
    async with channel(server.ports[0]) as ch:
        lobby = await publish(ch, tiny_codec, "lobby", "lobby")
        assert (await collect(lobby, until=lambda ms: True))[0].WhichOneof("msg") == "accepted"
        await lobby.write(frame(0, packets[0], boxes=[]))
        await collect(lobby, until=lambda ms: len(kinds(ms, "result")) >= 1)
        hijack = pb_grpc.LatentcastStub(ch).Stream(metadata=md("gate"))
        err = await status_of(hijack, header(tiny_codec, camera="lobby"), frame(2**40, packets[0], boxes=[]))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (err.code(), err.details())
        assert "gate-edge" in err.details() and "'lobby'" in err.details() and "secret" not in err.details()
        # the legitimate stream was not ended, and its sequence state was not touched
        await lobby.write(frame(1, packets[1], boxes=[]))
        got = await collect(lobby, until=lambda ms: len(kinds(ms, "result")) >= 1)
        assert [r.seq for r in kinds(got, "result")] == [1]
        await lobby.done_writing()
    assert server.sessions.get("lobby").seqs.next_seq == 2
    assert server.metrics.value("latentcast_cloud_stream_errors_total", {"code": "PERMISSION_DENIED"}) == 1
    assert not [r for r in caplog.records if "secret" in r.getMessage()]
    assert_no_traceback(caplog)


async def test_roles(server, tiny_codec):
    async with channel(server.ports[0]) as ch:
        err = await status_of(await publish(ch, tiny_codec, "viewer", "gate-1"))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "role subscribe" in err.details()
        sub = pb_grpc.LatentcastStub(ch).Subscribe(pb.SubscribeRequest(camera_id="gate-1"), metadata=md("gate"))
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await asyncio.wait_for(sub.read(), TIMEOUT)
        assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED  # a publish token may not watch
        ok = await publish(ch, tiny_codec, "ops", "anything")  # admin of "*"
        assert (await collect(ok, until=lambda ms: True))[0].WhichOneof("msg") == "accepted"
        ok.cancel()


async def test_a_subscriber_sees_only_its_cameras(server, tiny_codec, packets):
    async with channel(server.ports[0]) as ch:
        stub = pb_grpc.LatentcastStub(ch)
        denied = stub.Subscribe(pb.SubscribeRequest(camera_id="lobby"), metadata=md("viewer"))
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await asyncio.wait_for(denied.read(), TIMEOUT)
        assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED and "'lobby'" in ei.value.details()
        anycam = stub.Subscribe(pb.SubscribeRequest(), metadata=md("viewer"))  # "any camera": its cameras only
        for _ in range(200):  # bounded: until the subscription is registered
            if len(server.fanout):
                break
            await asyncio.sleep(0.01)
        streams = {}
        for who, cam in (("lobby", "lobby"), ("gate", "gate-7")):
            streams[cam] = await publish(ch, tiny_codec, who, cam)
            await collect(streams[cam], until=lambda ms: True)
        for seq in range(3):
            for call in streams.values():
                await call.write(frame(seq, packets[0], boxes=[]))
        seen = []
        for _ in range(3):
            seen.append(await asyncio.wait_for(anycam.read(), TIMEOUT))
        for call in streams.values():
            await collect(call, until=lambda ms: len(kinds(ms, "result")) >= 3)
            await call.done_writing()
        anycam.cancel()
    assert [(r.camera_id, r.seq) for r in seen] == [("gate-7", 0), ("gate-7", 1), ("gate-7", 2)]


# ------------------------------------------------------------------------------- the token file

def test_token_file_hashes_plain_entries_and_errors(tmp_path, token_file):
    entries = load_token_file(token_file)
    reg = TokenRegistry(entries)
    p = reg.principal(md("gate"))
    assert p.name == "gate-edge" and p.may_publish("gate-2") and not p.may_publish("lobby")
    assert not p.may_subscribe("gate-2")
    assert reg.principal(md("viewer")).may_subscribe("gate-9")
    assert reg.authenticate((("authorization", "Bearer nope"),)) == (None, "unknown")
    assert reg.authenticate((("authorization", "Basic abc"),)) == (None, "malformed")
    assert reg.authenticate(()) == (None, "missing")
    bad = {
        "role": ("- {name: a, token: t, role: root, cameras: ['*']}", "role 'root' is not one of"),
        "hex": ("- {name: a, sha256: xyz, role: admin, cameras: ['*']}", "is not 64 hex digits"),
        "cameras": ("- {name: a, token: t, role: admin}", "cameras must be a non-empty list"),
        "both": (f"- {{name: a, token: t, sha256: {'0' * 64}, role: admin, cameras: ['*']}}", "exactly one of"),
        "dup": ("- {name: a, token: t, role: admin, cameras: ['*']}\n  - {name: a, token: u, role: admin, "
                "cameras: ['*']}", "duplicate name"),
        "key": ("- {name: a, token: t, role: admin, cameras: ['*'], expires: 2027}", "unknown key(s) ['expires']"),
    }
    for what, (entry, needle) in bad.items():
        f = tmp_path / f"{what}.yaml"
        f.write_text(f"tokens:\n  {entry}\n")
        with pytest.raises(ValueError) as ei:
            load_token_file(f)
        assert needle in str(ei.value) and str(f) in str(ei.value), (what, str(ei.value))
    with pytest.raises(ValueError, match="not found"):
        load_token_file(tmp_path / "missing.yaml")


def test_every_entry_is_compared(token_file, monkeypatch):
    reg = TokenRegistry(load_token_file(token_file))
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    assert reg.principal(md("gate")).name == "gate-edge"  # the first entry matches ...
    assert len(calls) == len(reg.entries) == 4  # ... and all four are compared anyway


def test_token_cli_makes_a_working_entry(tmp_path):
    out = subprocess.run([sys.executable, "-m", "latentcast.tools.cli", "token", "new", "--name", "cam-9",
                          "--role", "publish", "--cameras", "cam-9"], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    token = lines[1]
    f = tmp_path / "t.yaml"
    f.write_text("tokens:\n" + "\n".join(line for line in lines[3:]) + "\n")
    p = TokenRegistry(load_token_file(f)).principal((("authorization", f"Bearer {token}"),))
    assert p.name == "cam-9" and p.may_publish("cam-9") and not p.may_publish("cam-10")
    h = subprocess.run([sys.executable, "-m", "latentcast.tools.cli", "token", "hash"], input=token + "\n",
                       capture_output=True, text=True, check=True)
    assert h.stdout.strip() == hash_token(token).hex()


# ------------------------------------------------------------------------------- listening defaults

def test_defaults_listen_on_loopback_only():
    s = ServerConfig()
    assert is_loopback(s.host) and is_loopback(s.maintenance_host) and is_loopback(s.metrics_host)
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "[::1]", "localhost", "0.0.0.0", "[::]", "10.0.0.4")] == \
        [True, True, True, True, False, False, False]


def test_exposed_without_tls_and_tokens_refuses_to_start(tmp_path):
    with pytest.raises(ValueError) as ei:
        ServerConfig(host="0.0.0.0")
    assert "'0.0.0.0'" in str(ei.value) and "TLS" in str(ei.value) and "tokens" in str(ei.value)
    assert "server.insecure: true" in str(ei.value)
    with pytest.raises(ValueError, match="no TLS"):
        ServerConfig(host="0.0.0.0", tokens=["t"])  # tokens in clear over the network
    ServerConfig(host="0.0.0.0", tls_cert_file="c.pem", tls_key_file="k.pem", tokens_file="t.yaml")
    ServerConfig(host="0.0.0.0", insecure=True)
    # through the config loader, as `latentcast cloud --config` does
    from latentcast.cloud.config import load_cloud_config
    from latentcast.config import ConfigError

    f = tmp_path / "cloud.yaml"
    f.write_text("server:\n  host: 0.0.0.0\n")
    with pytest.raises(ConfigError, match="insecure"):
        load_cloud_config(f)
    r = subprocess.run([sys.executable, "-m", "latentcast.tools.cli", "cloud", "--config", str(f)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "insecure" in r.stderr and "Traceback" not in r.stderr


async def test_insecure_exposure_starts_with_warnings(tiny_codec, caplog):
    caplog.set_level(logging.INFO)
    cfg: CloudConfig = make_config(host="0.0.0.0", insecure=True)
    srv = CloudServer(cfg, codec=tiny_codec, detector=FakeDetector())
    await srv.start()
    try:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("authentication is OFF" in w for w in warnings), warnings
        assert any("plaintext on 0.0.0.0" in w for w in warnings), warnings
    finally:
        await srv.stop(0.1)


async def test_a_bad_token_file_is_a_config_error(tiny_codec, tmp_path):
    from latentcast.config import ConfigError

    f = tmp_path / "t.yaml"
    f.write_text("tokens: []\n")
    srv = CloudServer(make_config(tokens_file=str(f)), codec=tiny_codec, detector=FakeDetector())
    with pytest.raises(ConfigError, match="non-empty list"):
        await srv.start()
    await srv.stop(0.1)


def test_server_config_replace_keeps_checks():
    cfg = CloudConfig()
    with pytest.raises(ValueError):
        dataclasses.replace(cfg.server, host="0.0.0.0")


async def test_start_checks_the_exposure_again(tiny_codec):
    from latentcast.config import ConfigError

    cfg = make_config(metrics_port=0, maintenance_port=0)
    cfg.server.host = "0.0.0.0"  # changed after the checks of its construction ran
    srv = CloudServer(cfg, codec=tiny_codec, detector=FakeDetector())
    with pytest.raises(ConfigError, match="server.insecure: true"):
        await srv.start()
    assert srv._server is None and srv._maint is None and srv._http is None  # nothing was bound
    await srv.stop(0.1)


def test_one_token_in_two_entries_is_an_error(token_file):
    with pytest.raises(ValueError, match="'server.tokens\\[0\\]' and 'gate-edge' hold the same token"):
        TokenRegistry.from_config(tokens=[TOKENS["gate"]], tokens_file=str(token_file))


async def test_an_unresolved_caller_may_do_nothing(server):
    class Ctx:  # as if the interceptor had let a call through that the servicer cannot resolve
        def invocation_metadata(self):
            return (("authorization", "Bearer not-a-token"),)

    p = server.principal(Ctx())
    assert p is auth.NOBODY and not p.may_publish("lobby") and not p.may_subscribe("lobby")
