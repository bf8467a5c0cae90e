"""The client side of a gRPC channel to the cloud: TLS credentials, explicit options, bearer tokens.

One definition for every client of the cloud: the edge's stream (``edge/client.py``) and the
dashboard's subscription (``cloud/dashboard/``). grpc only; importing it loads no numpy or torch.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

__all__ = ["TlsConfig", "channel_options", "front_order", "open_channel", "read_token"]


@dataclass(frozen=True)
class TlsConfig:
    """TLS (and mTLS) for the channel, from PEM file paths."""

    root_certs: str | Path | None = None  # CA bundle that signs the server certificate; None: system roots
    client_cert: str | Path | None = None  # client certificate chain for mTLS (with client_key)
    client_key: str | Path | None = None  # client private key for mTLS (with client_cert)
    server_name: str | None = None  # name to verify in the server certificate instead of the target host

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError(f"mTLS needs both client_cert and client_key (got client_cert={self.client_cert!r}, "
                             f"client_key={self.client_key!r})")

        def read(what: str, p: str | Path | None) -> bytes | None:
            if p is None or str(p) == "":
                return None
            path = Path(p).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"TLS {what} file {path} not found")
            return path.read_bytes()

        return grpc.ssl_channel_credentials(root_certificates=read("root_certs", self.root_certs),
                                            private_key=read("client_key", self.client_key),
                                            certificate_chain=read("client_cert", self.client_cert))


def channel_options(*, keepalive_s: float, keepalive_timeout_s: float, max_message_bytes: int,
                    server_name: str | None = None) -> list[tuple[str, Any]]:
    """The channel options a client of the cloud sets explicitly. The server must allow pings this often
    (``grpc.http2.min_ping_interval_without_data_ms`` <= keepalive_s * 1000) or it answers GOAWAY."""
    opts: list[tuple[str, Any]] = [
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_send_message_length", int(max_message_bytes)),
        ("grpc.max_receive_message_length", int(max_message_bytes)),
        ("grpc.enable_retries", 0),  # the clients resume (by sequence number, or by subscribing again) themselves
    ]
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return opts


def open_channel(target: str, *, tls: TlsConfig | None, keepalive_s: float, keepalive_timeout_s: float,
                 max_message_bytes: int, credentials: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
    """A grpc.aio channel to ``target`` (host:port), over TLS when ``tls`` is given. ``credentials``: the
    ones ``tls.credentials()`` made once (a reconnecting client then reads its certificate files once)."""
    opts = channel_options(keepalive_s=keepalive_s, keepalive_timeout_s=keepalive_timeout_s,
                           max_message_bytes=max_message_bytes, server_name=tls.server_name if tls else None)
    if tls is not None:
        return grpc.aio.secure_channel(target, credentials or tls.credentials(), options=opts)
    return grpc.aio.insecure_channel(target, options=opts)


def read_token(token: str, token_file: str, *, key: str = "server.token_file") -> str | None:
    """A bearer token: ``token``, else the first line of ``token_file``; None when neither is set.
    ``key`` names the file's config key in the errors (a missing or empty file)."""
    if token:
        return token
    if token_file:
        p = os.path.expanduser(token_file)
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{key} {p} not found")
        with open(p, encoding="utf-8") as fh:
            tok = fh.readline().strip()
        if not tok:
            raise ValueError(f"{key} {p} is empty")
        return tok
    return None


def front_order(camera_id: str, fronts: Sequence[str]) -> list[str]:
    """The cloud fronts in the order a camera tries them: rendezvous (highest random weight) hashing of
    ``camera_id`` with each front's address. Every edge and load balancer that applies it sends a camera to the
    same front; when a front is removed only its cameras move, each to the next front of its own order."""
    fronts = list(dict.fromkeys(f.strip() for f in fronts if f and f.strip()))
    if not fronts:
        raise ValueError("front_order needs at least one front address (host:port)")
    return sorted(fronts, key=lambda f: hashlib.sha256(f"{camera_id}\0{f}".encode()).digest(), reverse=True)
