"""The web dashboard: a ``Subscribe`` client of the cloud that serves a live page (``latentcast dashboard``).

::

    cloud ──Subscribe (JPEG + boxes + counters)──► subscription.py ─► state.py (per camera: last frame,
                                                                      rates, history; detections timeline)
                                                                            │
    browser ◄── WebSocket: frames (latest wins per camera), stats every second ── server.py (aiohttp) ◄┘
            ◄── GET / (static/index.html, app.js: plain ES modules, no build step)

It never imports torch (numpy and aiohttp only): it runs on any machine that can reach the cloud.
"""
