"""``latentcast dashboard``: the live web page of a running cloud (``cloud/dashboard/``).

::

    latentcast dashboard --cloud HOST:PORT [--config dashboard.yaml] [--host 127.0.0.1] [--port 8080]

Configured by ``cloud/dashboard.yaml`` and ``LATENTCAST_DASHBOARD__*`` variables; the options override them.
Needs the dashboard extra (``pip install -e ".[dashboard]"``: aiohttp); never imports torch.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "cmd_dashboard", "load_with_options"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="dashboard YAML config (see cloud/dashboard.yaml); LATENTCAST_DASHBOARD__* "
                                    "variables override it")
    p.add_argument("--cloud", help="the cloud's gRPC address, host:port (cloud.target)")
    p.add_argument("--token-file", help="file with the subscribe token for the cloud (cloud.token_file)")
    p.add_argument("--host", help="address to serve the page on (dashboard.host; non-loopback needs a login token)")
    p.add_argument("--port", type=int, help="HTTP port of the page (dashboard.port; 0 = a free port)")
    p.add_argument("--login-token-file", help="file with the token browsers log in with (dashboard.login_token_file)")
    p.add_argument("--describe", action="store_true", help="list every config key, its variable and default")
    p.set_defaults(func=cmd_dashboard)


def load_with_options(a: argparse.Namespace):
    """The config file and variables, then the command's options."""
    from latentcast.cloud.dashboard.config import load_dashboard_config

    cfg = load_dashboard_config(a.config)
    for opt, section, key in (("cloud", cfg.cloud, "target"), ("token_file", cfg.cloud, "token_file"),
                              ("host", cfg.dashboard, "host"), ("port", cfg.dashboard, "port"),
                              ("login_token_file", cfg.dashboard, "login_token_file")):
        value = getattr(a, opt)
        if value is not None:
            setattr(section, key, value)
    return cfg


def cmd_dashboard(a: argparse.Namespace) -> int:
    import asyncio
    import signal

    try:
        from latentcast.cloud.dashboard.config import ENV_PREFIX, DashboardConfig
        from latentcast.cloud.dashboard.server import DashboardServer
    except ImportError as exc:
        print(f"error: {exc}; the dashboard needs aiohttp: pip install -e \".[dashboard]\"", file=sys.stderr)
        return 2
    if a.describe:
        from latentcast.tools.services import print_config

        return print_config(DashboardConfig, ENV_PREFIX)
    cfg = load_with_options(a)
    server = DashboardServer(cfg)  # a missing token file fails here

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await server.start()
        print(f"dashboard: {server.url} (the cloud at {cfg.cloud.target})", flush=True)
        try:
            await stop.wait()
        finally:
            await server.stop()

    asyncio.run(run())
    return 0
