"""The dashboard without a browser: its state's numbers, its config, and its server on port 0 against a
loopback cloud (tiny codec, fake detector): the JSON API, the WebSocket, the login, a cloud that goes away."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time

import pytest

pytest.importorskip("aiohttp")
import aiohttp  # noqa: E402

from latentcast.cloud.dashboard.config import (  # noqa: E402
    CloudLinkConfig,
    ConfigError,
    DashboardConfig,
    DashboardSection,
    load_dashboard_config,
)
from latentcast.cloud.dashboard.server import COOKIE, DashboardServer, _Browser  # noqa: E402
from latentcast.cloud.dashboard.state import DashboardState  # noqa: E402
from latentcast.proto import latentcast_v1_pb2 as pb  # noqa: E402

TIMEOUT = 10.0


def result(camera: str, seq: int, *, received: int, analysed: int, failed: int = 0, nbytes: int = 0,
           labels=("person",), latency: float = 50.0) -> pb.FrameResult:
    return pb.FrameResult(camera_id=camera, task="traffic", seq=seq, width=96, height=64, mode="frame roi q1",
                          bpp=0.01, latency_ms=latency, image=b"\xff\xd8jpeg",
                          boxes=[pb.Box(x0=1, y0=2, x1=30, y1=40, label=lb, score=0.9) for lb in labels],
                          camera=pb.CameraCounters(frames_received=received, frames_analysed=analysed,
                                                   frames_failed=failed, bytes_received=nbytes))


# ------------------------------------------------------------------------------------------------- state
def test_rates_come_from_the_clouds_counters_not_from_what_the_dashboard_saw():
    st = DashboardState(DashboardSection(rate_window_s=10.0, stale_s=5.0))
    # two results 2 s apart: the cloud received 20 frames, analysed 18, failed 2 and got 5,000 bytes in between
    # (the dashboard skipped the frames between them: the rates do not depend on that)
    st.add(result("a", 0, received=1, analysed=1, nbytes=250), now=100.0, wall=1000.0)
    st.add(result("a", 19, received=21, analysed=19, failed=2, nbytes=5250, latency=70.0), now=102.0, wall=1002.0)
    s = st.cameras["a"].stats(102.5, 5.0)
    assert s["fps_in"] == pytest.approx(10.0) and s["fps_out"] == pytest.approx(9.0)
    assert s["kbps"] == pytest.approx(5000 * 8 / 2 / 1000)
    assert s["drops"] == 2 and s["drops_window"] == 2 and s["frames_analysed"] == 19
    assert s["p50_latency_ms"] == pytest.approx(60.0) and s["bpp"] == pytest.approx(0.01)
    assert not s["stale"] and s["results_seen"] == 2
    later = st.cameras["a"].stats(120.0, 5.0)  # nothing for 18 s: stale, and no rate out of old samples
    assert later["stale"] and later["fps_out"] == 0 and later["kbps"] == 0 and later["frames_analysed"] == 19


def test_timeline_counts_labels_per_bucket_and_forgets_old_buckets():
    st = DashboardState(DashboardSection(timeline_bucket_s=10.0, history_s=30.0))
    st.add(result("a", 0, received=1, analysed=1, labels=("person", "person", "car")), now=1.0, wall=1000.0)
    st.add(result("a", 1, received=2, analysed=2, labels=("car",)), now=2.0, wall=1005.0)
    st.add(result("b", 0, received=1, analysed=1, labels=()), now=3.0, wall=1012.0)
    snap = st.timeline.snapshot(1012.0)
    assert [b["t"] for b in snap["buckets"]] == [1000.0, 1010.0]
    assert snap["buckets"][0]["counts"] == {"person": 2, "car": 2}
    assert snap["totals"] == {"person": 2, "car": 2}
    assert st.timeline.snapshot(1045.0)["buckets"] == []  # older than history_s
    assert st.timeline.snapshot(1045.0)["totals"] == {"person": 2, "car": 2}  # the totals stay


def test_cameras_are_bounded_least_recently_seen_forgotten():
    st = DashboardState(DashboardSection(max_cameras=2))
    for i, cam in enumerate(["a", "b", "a", "c"]):
        st.add(result(cam, i, received=i + 1, analysed=i + 1), now=float(i), wall=float(i))
    assert list(st.cameras) == ["a", "c"]


def test_tick_adds_one_chart_point_per_camera_and_bounds_the_history():
    st = DashboardState(DashboardSection(history_s=3.0))
    st.add(result("a", 0, received=1, analysed=1), now=0.0, wall=0.0)
    for t in range(6):
        msg = st.tick(now=float(t), wall=float(t))
    assert msg["type"] == "stats" and len(msg["cameras"]) == 1
    assert [p["t"] for p in msg["cameras"][0]["history"]] == [2.0, 3.0, 4.0, 5.0]
    json.dumps(msg, allow_nan=False)  # strict JSON for the browser


def test_a_slow_browser_keeps_only_the_latest_frame_of_each_camera():
    b = _Browser(ws=None, peer="test")  # type: ignore[arg-type]
    for i in range(10):
        b.offer("frame:a", f"a{i}")
    b.offer("frame:b", "b0")
    b.offer("stats", "s0")
    b.offer("stats", "s1")
    assert list(b.pending.items()) == [("frame:a", "a9"), ("frame:b", "b0"), ("stats", "s1")]
    assert b.skipped == 10


# ------------------------------------------------------------------------------------------------ config
def test_config_from_file_and_variables(tmp_path):
    p = tmp_path / "dashboard.yaml"
    p.write_text("cloud:\n  target: cloud.example:50051\ndashboard:\n  port: 9000\n  stale_s: 3\n")
    cfg = load_dashboard_config(p, env={"LATENTCAST_DASHBOARD__DASHBOARD__PORT": "9100"})
    assert cfg.cloud.target == "cloud.example:50051" and cfg.dashboard.port == 9100 and cfg.dashboard.stale_s == 3
    with pytest.raises(ConfigError, match="jpeg_quality 0 out of range 1..100"):
        load_dashboard_config(None, env={"LATENTCAST_DASHBOARD__CLOUD__JPEG_QUALITY": "0"})
    with pytest.raises(ConfigError, match="stale_s -1.0 must be > 0"):
        load_dashboard_config(None, env={"LATENTCAST_DASHBOARD__DASHBOARD__STALE_S": "-1"})
    p.write_text("dashboard:\n  bogus: 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_dashboard_config(p)


async def test_a_non_loopback_page_without_a_login_token_is_refused(tmp_path):
    cfg = DashboardConfig(dashboard=DashboardSection(host="0.0.0.0", port=0))
    with pytest.raises(ValueError, match="no login token is set"):
        await DashboardServer(cfg).start()
    token = tmp_path / "login"
    token.write_text("")
    cfg.dashboard.login_token_file = str(token)
    with pytest.raises(ValueError, match="dashboard.login_token_file .* is empty"):
        DashboardServer(cfg)
    cfg.dashboard.login_token_file = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="dashboard.login_token_file .* not found"):
        DashboardServer(cfg)


def test_importing_the_dashboard_loads_no_torch():
    code = ("import sys, latentcast.cloud.dashboard.server, latentcast.tools.dashboard; "
            "print(sorted(m for m in ('torch', 'latentcast.models.codec') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------- against a real cloud
torch = pytest.importorskip("torch")
from tests.test_cloud_server import (  # noqa: E402,F401 - fixtures and helpers of the loopback cloud
    channel,
    collect,
    frame,
    header,
    kinds,
    make_server,
    packets,
    read,
)


def dashboard_config(port: int, **dash) -> DashboardConfig:
    return DashboardConfig(cloud=CloudLinkConfig(target=f"127.0.0.1:{port}", backoff_initial_s=0.05,
                                                 backoff_max_s=0.2),
                           dashboard=DashboardSection(host="127.0.0.1", port=0, stats_interval_s=0.1, **dash))


async def wait_for(cond, what: str):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        got = await cond()
        if got:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def stream(srv, tiny_codec, packets, camera: str, n: int) -> None:
    from latentcast.proto import latentcast_v1_pb2_grpc as pb_grpc

    async with channel(srv.ports[0]) as ch:
        call = pb_grpc.LatentcastStub(ch).Stream()
        await call.write(header(tiny_codec, camera=camera))
        await read(call)
        for seq in range(n):
            await call.write(frame(seq, packets[seq % len(packets)]))
        await call.done_writing()
        await collect(call, until=lambda ms: len(kinds(ms, "result")) == n)


async def test_dashboard_numbers_match_the_clouds_metrics(make_server, tiny_codec, packets):
    srv = await make_server()
    dash = DashboardServer(dashboard_config(srv.ports[0]))
    await dash.start()
    try:
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{dash.port}"

            async def subscribed():
                return dash.state.link.connected and len(srv.fanout) == 1
            await wait_for(subscribed, "the subscription")
            async with http.ws_connect(f"{base}/ws") as ws:
                await asyncio.gather(stream(srv, tiny_codec, packets, "cam-a", 6),
                                     stream(srv, tiny_codec, packets, "cam-b", 3))
                m = srv.metrics

                async def settled():
                    async with http.get(f"{base}/api/state") as r:
                        body = await r.json()
                    cams = {c["camera_id"]: c for c in body["cameras"]}
                    done = sum(c["frames_analysed"] for c in cams.values()) == m.value(
                        "latentcast_cloud_frames_decoded_total")
                    return cams if done and len(cams) == 2 else None
                cams = await wait_for(settled, "the dashboard to count every analysed frame")
                assert cams["cam-a"]["frames_analysed"] == 6 and cams["cam-b"]["frames_analysed"] == 3
                assert sum(c["frames_received"] for c in cams.values()) == m.value(
                    "latentcast_cloud_frames_received_total")
                assert sum(c["bytes_received"] for c in cams.values()) == m.value(
                    "latentcast_cloud_bytes_received_total")
                assert cams["cam-a"]["mode"] == "frame roi q1" and cams["cam-a"]["drops"] == 0
                assert cams["cam-a"]["p50_latency_ms"] > 0 and cams["cam-a"]["bpp"] > 0
                # the WebSocket: hello, then numbers and the frames of both cameras
                seen: dict[str, set] = {"type": set(), "frame": set()}
                deadline = time.monotonic() + TIMEOUT
                while seen["frame"] != {"cam-a", "cam-b"} and time.monotonic() < deadline:
                    msg = json.loads((await ws.receive(timeout=TIMEOUT)).data)
                    seen["type"].add(msg["type"])
                    if msg["type"] == "frame":
                        assert msg["image"] and msg["boxes"][0]["label"] == "person" and msg["edge_boxes"]
                        seen["frame"].add(msg["camera_id"])
                assert seen["frame"] == {"cam-a", "cam-b"} and {"hello", "stats"} <= seen["type"]
            async with http.get(f"{base}/api/frame/cam-a") as r:
                assert r.status == 200 and r.content_type == "image/jpeg" and (await r.read())[:2] == b"\xff\xd8"
            async with http.get(f"{base}/api/frame/nobody") as r:
                assert r.status == 404 and "nobody" in (await r.json())["error"]
            async with http.get(f"{base}/") as r:
                assert r.status == 200 and "Content-Security-Policy" in r.headers
                assert '<script type="module" src="/static/app.js">' in await r.text()
            async with http.get(f"{base}/static/app.js") as r:
                assert r.status == 200 and "WebSocket" in await r.text()
            async with http.get(f"{base}/static/../config.py") as r:
                assert r.status in (403, 404)
            with pytest.raises(aiohttp.WSServerHandshakeError) as ei:  # cross-site WebSocket hijacking
                await http.ws_connect(f"{base}/ws", headers={"Origin": "http://evil.example"})
            assert ei.value.status == 403
    finally:
        await dash.stop()


async def test_login_token_guards_everything_but_the_login(make_server, tmp_path):
    srv = await make_server()
    token_file = tmp_path / "login"
    token_file.write_text("s3cret-token\n")
    dash = DashboardServer(dashboard_config(srv.ports[0], login_token_file=str(token_file)))
    await dash.start()
    try:
        base = f"http://127.0.0.1:{dash.port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/", allow_redirects=False) as r:
                assert r.status == 303 and r.headers["Location"] == "/login"
            for path in ("/api/state", "/api/frame/x", "/static/app.js"):
                async with http.get(base + path) as r:
                    assert r.status == 401 and "login required" in (await r.json())["error"]
            with pytest.raises(aiohttp.WSServerHandshakeError) as ei:
                await http.ws_connect(f"{base}/ws")
            assert ei.value.status == 401
            async with http.get(f"{base}/healthz") as r:
                assert r.status == 200
            async with http.post(f"{base}/login", data={"token": "wrong"}, allow_redirects=False) as r:
                assert r.status == 401 and "Wrong token." in await r.text()
            assert COOKIE not in {c.key for c in http.cookie_jar}
            async with http.get(f"{base}/api/state", headers={"Authorization": "Bearer s3cret-token"}) as r:
                assert r.status == 200
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:  # unsafe: an IP host
            async with http.post(f"{base}/login", data={"token": "s3cret-token"}, allow_redirects=False) as r:
                assert r.status == 303 and "HttpOnly" in r.headers["Set-Cookie"]
                assert "SameSite=Strict" in r.headers["Set-Cookie"]
            async with http.get(f"{base}/api/state") as r:
                assert r.status == 200 and (await r.json())["link"]["target"] == f"127.0.0.1:{srv.ports[0]}"
            async with http.ws_connect(f"{base}/ws") as ws:
                assert json.loads((await ws.receive(timeout=TIMEOUT)).data)["type"] == "hello"
    finally:
        await dash.stop()


async def test_hostile_browsers_are_bounded(make_server):
    """More browsers than max_clients get 503; a browser that sends an oversized message loses its own socket;
    the others go on."""
    srv = await make_server()
    dash = DashboardServer(dashboard_config(srv.ports[0], max_clients=2))
    await dash.start()
    try:
        url = f"http://127.0.0.1:{dash.port}/ws"
        async with aiohttp.ClientSession() as http:
            good = await http.ws_connect(url)
            bad = await http.ws_connect(url)
            with pytest.raises(aiohttp.WSServerHandshakeError) as ei:
                await http.ws_connect(url)
            assert ei.value.status == 503
            await bad.send_str("x" * 100_000)  # over max_msg_size: the server closes this socket only
            ends = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
            for _ in range(100):  # what was queued for it, then the close
                if (await bad.receive(timeout=TIMEOUT)).type in ends:
                    break
            assert bad.closed and bad.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
            kinds = set()
            for _ in range(5):  # the good one still gets its stats
                kinds.add(json.loads((await good.receive(timeout=TIMEOUT)).data)["type"])
            assert "stats" in kinds
            third = await wait_for(lambda: _connect_or_none(http, url), "a free slot after the bad socket left")
            await third.close()
            await good.close()
    finally:
        await dash.stop()


async def _connect_or_none(http, url):
    try:
        return await http.ws_connect(url)
    except aiohttp.WSServerHandshakeError:
        return None


async def test_the_link_goes_down_with_the_cloud_and_comes_back(make_server, tiny_codec, packets):
    srv = await make_server()
    port = srv.ports[0]
    dash = DashboardServer(dashboard_config(port))
    await dash.start()
    try:
        async def up():
            return dash.state.link.connected and len(srv.fanout) == 1
        await wait_for(up, "the subscription")
        await srv.stop(0.2)

        async def down():
            return not dash.state.link.connected
        await wait_for(down, "the link to go down")
        assert dash.state.link.error
        await asyncio.sleep(0.6)  # several retries (backoff 0.05..0.2 s) against a closed port: none counts as up
        assert not dash.state.link.connected and dash.state.link.reconnects == 1
        assert "UNAVAILABLE" in dash.state.link.error
        from tests.test_cloud_server import make_config

        cfg = make_config()
        cfg.server = dataclasses.replace(cfg.server, port=port)
        srv2 = await make_server(cfg)
        await wait_for(lambda: _async(dash.state.link.connected and len(srv2.fanout) == 1), "a new subscription")
        assert dash.state.link.reconnects == 1
        await stream(srv2, tiny_codec, packets, "cam-c", 2)
        await wait_for(lambda: _async("cam-c" in dash.state.cameras), "frames after the reconnect")
    finally:
        await dash.stop()


async def _async(value):
    return value


async def test_a_refused_token_shows_on_the_link(make_server, tmp_path):
    from tests.test_cloud_server import make_config

    srv = await make_server(make_config(tokens=["the-right-one"]))
    cfg = dashboard_config(srv.ports[0])
    cfg.cloud.token = "a-wrong-one"
    dash = DashboardServer(cfg)
    await dash.start()
    try:
        await wait_for(lambda: _async("UNAUTHENTICATED" in dash.state.link.error), "the refusal on the link")
        assert not dash.state.link.connected
    finally:
        await dash.stop()
