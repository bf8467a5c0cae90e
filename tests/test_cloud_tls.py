"""The Latentcast port over mTLS with a bearer token (certificates made with the openssl CLI)."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from latentcast.cloud.server import CloudServer  # noqa: E402
from latentcast.proto import latentcast_v1_pb2_grpc as pb_grpc  # noqa: E402

from .test_cloud_server import TIMEOUT, FakeDetector, header, make_config  # noqa: E402


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", "san.ext", cwd=d)
    return d


async def test_mtls_and_token(pki, tiny_codec):
    cfg = make_config(tokens=["tok"], tls_cert_file=str(pki / "server.pem"), tls_key_file=str(pki / "server.key"),
                      tls_client_ca_file=str(pki / "ca.pem"))
    srv = CloudServer(cfg, codec=tiny_codec, detector=FakeDetector())
    port = (await srv.start())[0]
    try:
        await srv.wait_ready(TIMEOUT)
        ca = (pki / "ca.pem").read_bytes()
        good = grpc.ssl_channel_credentials(root_certificates=ca, private_key=(pki / "client.key").read_bytes(),
                                            certificate_chain=(pki / "client.pem").read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", good) as ch:
            call = pb_grpc.LatentcastStub(ch).Stream(metadata=(("authorization", "Bearer tok"),))
            await call.write(header(tiny_codec))
            msg = await asyncio.wait_for(call.read(), TIMEOUT)
            assert msg.WhichOneof("msg") == "accepted"
            call.cancel()
        # no client certificate: the TLS handshake fails before any call
        anon = grpc.ssl_channel_credentials(root_certificates=ca)
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", anon) as ch:
            call = pb_grpc.LatentcastStub(ch).Stream(metadata=(("authorization", "Bearer tok"),))
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await asyncio.wait_for(call.read(), TIMEOUT)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        # plaintext to a TLS port fails too
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = pb_grpc.LatentcastStub(ch).Stream()
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await asyncio.wait_for(call.read(), TIMEOUT)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await srv.stop(0.5)


def test_tls_config_needs_both_files(pki):
    cfg = make_config()
    with pytest.raises(ValueError, match="together"):
        dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, tls_cert_file=str(pki / "server.pem")))


async def test_dashboard_subscribes_over_mtls_with_its_token(pki, tiny_codec):
    """The dashboard's link uses the edge's TLS settings (cloud.tls_* in cloud/dashboard.yaml) and its own token."""
    pytest.importorskip("aiohttp")
    from latentcast.cloud.dashboard.config import CloudLinkConfig, DashboardConfig, DashboardSection
    from latentcast.cloud.dashboard.server import DashboardServer

    cfg = make_config(tokens=["tok"], tls_cert_file=str(pki / "server.pem"), tls_key_file=str(pki / "server.key"),
                      tls_client_ca_file=str(pki / "ca.pem"))
    srv = CloudServer(cfg, codec=tiny_codec, detector=FakeDetector())
    port = (await srv.start())[0]
    dashboards = []
    try:
        await srv.wait_ready(TIMEOUT)

        def link(**tls) -> DashboardServer:
            d = DashboardServer(DashboardConfig(
                cloud=CloudLinkConfig(target=f"localhost:{port}", token="tok", tls_root_certs=str(pki / "ca.pem"),
                                      backoff_initial_s=0.05, backoff_max_s=0.2, **tls),
                dashboard=DashboardSection(port=0)))
            dashboards.append(d)
            return d

        good = link(tls_client_cert=str(pki / "client.pem"), tls_client_key=str(pki / "client.key"))
        anon = link()  # no client certificate: the cloud's mTLS refuses the handshake
        for d in dashboards:
            await d.start()
        for _ in range(int(TIMEOUT / 0.05)):
            if good.state.link.connected and anon.state.link.error:
                break
            await asyncio.sleep(0.05)
        assert good.state.link.connected and len(srv.fanout) == 1
        assert not anon.state.link.connected and "UNAVAILABLE" in anon.state.link.error
        with pytest.raises(ValueError, match="mTLS needs both client_cert and client_key"):
            link(tls_client_cert=str(pki / "client.pem"))
    finally:
        for d in dashboards:
            await d.stop()
        await srv.stop(0.5)
