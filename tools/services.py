"""``latentcast edge``, ``cloud`` and ``token``: run the two services, and make the cloud's bearer tokens.

The services are configured by YAML files and ``LATENTCAST_EDGE__*`` / ``LATENTCAST_CLOUD__*`` variables
(``edge/config.py``, ``cloud/config.py``); ``--describe`` lists every key, its variable and default.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger(__name__)

__all__ = ["add_edge_arguments", "add_cloud_arguments", "add_token_arguments", "cmd_edge", "cmd_cloud", "cmd_token"]

def print_config(cls: type, prefix: str) -> int:
    """Every key of a config class, its environment variable, default and comment (``--describe``)."""
    from latentcast.config import describe_config

    for key, var, default, comment in describe_config(cls, prefix):
        print(f"{key} = {default!r}   [{var}]\n    {comment}")
    return 0


def cmd_edge(a: argparse.Namespace) -> int:
    import asyncio
    import signal

    from latentcast.edge.app import EdgeApp
    from latentcast.edge.client import FatalStreamError, GaveUpError
    from latentcast.edge.config import ENV_PREFIX, EdgeConfig, load_edge_config

    if a.describe:
        return print_config(EdgeConfig, ENV_PREFIX)
    cfg = load_edge_config(a.config)
    if a.source:
        cfg.source.uri = a.source
    if a.task:  # the task's label list (user cache, then shipped) replaces grounding.labels
        cfg.grounding.use_task(a.task)
    if not cfg.source.uri:
        raise SystemExit("error: no source: set source.uri in the config, LATENTCAST_EDGE__SOURCE__URI, or --source")
    app = EdgeApp(cfg)  # resolves the task list: an unknown task is an error before anything starts

    async def run() -> dict:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await app.run(max_frames=a.max_frames, stop=stop)

    try:
        stats = asyncio.run(run())
    except (FatalStreamError, GaveUpError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(stats, indent=2))
    return 0


def cmd_cloud(a: argparse.Namespace) -> int:
    import asyncio

    from latentcast.cloud.config import ENV_PREFIX, CloudConfig, ConfigError, load_cloud_config
    from latentcast.cloud.server import CloudServer

    if a.describe:
        return print_config(CloudConfig, ENV_PREFIX)
    try:
        asyncio.run(CloudServer(load_cloud_config(a.config)).serve_forever())
    except (ConfigError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_token(a: argparse.Namespace) -> int:
    import yaml

    from latentcast.cloud.auth import ROLES, hash_token, new_token

    if a.action == "hash":
        token = sys.stdin.readline().strip()
        if not token or any(c.isspace() for c in token):
            print("error: give the token on stdin, one line without spaces", file=sys.stderr)
            return 2
        print(hash_token(token).hex())
        return 0
    cams = [c.strip() for c in (a.cameras or "").split(",") if c.strip()]
    if not a.name or not cams or a.role not in ROLES:
        print(f"error: token new needs --name, --role ({', '.join(ROLES)}) and --cameras (comma-separated globs, "
              f"e.g. 'gate-*'); got name={a.name!r} role={a.role!r} cameras={a.cameras!r}", file=sys.stderr)
        return 2
    token = new_token()
    entry = yaml.safe_dump([{"name": a.name, "sha256": hash_token(token).hex(), "role": a.role, "cameras": cams}],
                           sort_keys=False).rstrip()
    print(f"# token for {a.name!r}: give it to the client (edge: server.token_file), keep it secret\n{token}\n"
          f"# add under 'tokens:' in the cloud's server.tokens_file (only the hash is stored there)")
    print("\n".join("  " + line for line in entry.splitlines()))
    return 0


def add_edge_arguments(g: argparse.ArgumentParser) -> None:
    g.add_argument("--config", help="edge YAML config (see edge/edge.yaml); LATENTCAST_EDGE__* variables override it")
    g.add_argument("--source", help="override source.uri (video file, image folder, rtsp:// URL, /dev/videoN)")
    g.add_argument("--task", help="ground this task's label list (latentcast task list: the user cache, then the "
                                  "shipped lists); sets grounding.task and grounding.labels_from_task")
    g.add_argument("--max-frames", type=int, help="stop after this many captured frames")
    g.add_argument("--describe", action="store_true", help="list every config key, its variable and default")
    g.set_defaults(func=cmd_edge)


def add_cloud_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--config",
                   help="cloud YAML config (see cloud/cloud.yaml); LATENTCAST_CLOUD__* variables override it")
    c.add_argument("--describe", action="store_true", help="list every config key, its variable and default")
    c.set_defaults(func=cmd_cloud)


def add_token_arguments(k: argparse.ArgumentParser) -> None:
    k.add_argument("action", choices=["new", "hash"])
    k.add_argument("--name", help="new: the entry's name (for logs and errors)")
    k.add_argument("--role", default="publish", help="new: publish, subscribe or admin (default publish)")
    k.add_argument("--cameras", help="new: camera id globs it may use, comma-separated (e.g. 'gate-*,lobby')")
    k.set_defaults(func=cmd_token)
