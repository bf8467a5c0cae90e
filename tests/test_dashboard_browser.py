"""The dashboard in a real browser: Debian's ``chromium`` driven by Playwright (``executable_path``; Playwright's
own browser download does not work here). A loopback cloud (tiny codec, fake detector), an edge stream and the
dashboard with a login token; the page must log in, draw frames and boxes, fill the detections list, show the
cloud's numbers, open a camera large, mark a silent camera stale and show a banner when the cloud goes away."""

from __future__ import annotations

import asyncio
import os
import shutil

import grpc
import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("torch")
async_api = pytest.importorskip("playwright.async_api")

from latentcast.cloud.dashboard.server import DashboardServer  # noqa: E402
from tests.test_cloud_server import channel, frame, header, make_server, packets, read  # noqa: E402,F401
from tests.test_dashboard import dashboard_config  # noqa: E402

TIMEOUT_MS = 15_000
LOGIN = "browser-test-token"


def chromium_path() -> str:
    """Debian's chromium (``apt-get install -y chromium``; ``.ci/run`` installs it), or $LATENTCAST_CHROMIUM."""
    path = os.environ.get("LATENTCAST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("the browser tests need Debian's chromium: apt-get install -y chromium "
                    "(or set LATENTCAST_CHROMIUM)")
    return path


async def wait_js(page, expression: str) -> None:
    """Poll a JS expression until it is truthy. (Playwright's wait_for_function polls with eval, which the page's
    Content-Security-Policy forbids; page.evaluate is not subject to it.)"""
    deadline = asyncio.get_running_loop().time() + TIMEOUT_MS / 1000
    while not await page.evaluate(expression):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {expression!r} in the page")
        await asyncio.sleep(0.05)


async def canvas_sum(page, selector: str) -> int:
    """The sum of a canvas's RGB values (changes when a frame or box is drawn)."""
    return await page.eval_on_selector(selector, """c => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i] + d[i + 1] + d[i + 2]; return s; }""")


async def test_dashboard_in_chromium(make_server, tiny_codec, packets, tmp_path):
    srv = await make_server()
    token_file = tmp_path / "login"
    token_file.write_text(LOGIN + "\n")
    cfg = dashboard_config(srv.ports[0], login_token_file=str(token_file), stale_s=1.5)
    dash = DashboardServer(cfg)
    await dash.start()
    from latentcast.proto import latentcast_v1_pb2_grpc as pb_grpc

    async with async_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            # the login: the page sends us there, a wrong token is refused, the right one lets us in
            await page.goto(dash.url)
            assert page.url.endswith("/login")
            await page.fill("input[name=token]", "not-the-token")
            await page.click("button[type=submit]")
            await page.wait_for_selector("text=Wrong token.", timeout=TIMEOUT_MS)
            await page.fill("input[name=token]", LOGIN)
            await page.click("button[type=submit]")
            await page.wait_for_selector("#grid", timeout=TIMEOUT_MS)
            assert await page.evaluate("window.dashboard.wsOpen") is True
            errors.clear()  # the refused login's 401 was expected; from here on nothing may fail

            # a short edge stream at 10 fps; the page draws its frames as they come
            async with channel(srv.ports[0]) as ch:
                call = pb_grpc.LatentcastStub(ch).Stream()
                await call.write(header(tiny_codec, camera="gate-1"))
                await read(call)
                sums = []
                for seq in range(12):
                    await call.write(frame(seq, packets[seq % len(packets)]))
                    await asyncio.sleep(0.1)
                    if seq in (3, 11):
                        await wait_js(page, f"window.dashboard.frames >= {1 if seq == 3 else 2}")
                        sums.append(await canvas_sum(page, "article[data-camera=gate-1] canvas.frame"))
                await call.done_writing()
                while await asyncio.wait_for(call.read(), 10) is not grpc.aio.EOF:  # results, acks, to the end
                    pass
            assert sums[0] > 0, "the first frame was not drawn"
            # the detections list fills with the cloud's labels
            await page.wait_for_selector("#detections li[data-label=person]", timeout=TIMEOUT_MS)
            # the numbers are the cloud's: every frame analysed, every byte received
            m = srv.metrics
            card = "article[data-camera=gate-1]"
            decoded = int(m.value("latentcast_cloud_frames_decoded_total"))
            assert decoded == 12
            await wait_js(page, f"document.querySelector('{card} [data-stat=frames_analysed]').textContent "
                                f"=== '{decoded}'")
            received = await page.text_content(f"{card} [data-stat=frames_received]")
            assert received == str(int(m.value("latentcast_cloud_frames_received_total")))
            assert await page.text_content(f"{card} .mode") == "frame roi q1"
            count = await page.text_content("#detections li[data-label=person] b")
            assert int(count) == 12  # the fake detector's one box per frame
            kbps = float(await page.text_content(f"{card} [data-stat=kbps]"))
            assert kbps > 0
            # the edge's ROIs drawn on request change the picture
            before = await canvas_sum(page, f"{card} canvas.frame")
            await page.check("#show-rois")
            after = await canvas_sum(page, f"{card} canvas.frame")
            assert after != before
            await page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            # a click opens the camera large; Escape closes it
            await page.click(f"{card} canvas.frame")
            await page.wait_for_selector("#large:not([hidden])", timeout=TIMEOUT_MS)
            assert await canvas_sum(page, "#large-canvas") > 0
            assert "gate-1" in await page.text_content("#large-title")
            await page.keyboard.press("Escape")
            await page.wait_for_selector("#large", state="hidden", timeout=TIMEOUT_MS)
            # silence marks the camera stale; the cloud going away raises the banner
            await page.wait_for_selector(f"{card}.stale", timeout=TIMEOUT_MS)
            await srv.stop(0.2)
            await page.wait_for_selector("#banner:not([hidden])", timeout=TIMEOUT_MS)
            assert "unreachable" in await page.text_content("#banner")
            await page.screenshot(path=str(tmp_path / "dashboard-cloud-down.png"), full_page=True)
            assert not errors, errors
        finally:
            await browser.close()
            await dash.stop()
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000

