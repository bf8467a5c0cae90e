"""Configuration of the dashboard: dataclass defaults < YAML file < ``LATENTCAST_DASHBOARD__*`` variables.

Load with :func:`load_dashboard_config`; ``latentcast dashboard --describe`` lists every key. Two sections:
``cloud`` (how to reach and subscribe to the cloud: address, token, TLS, as the edge's ``server``) and
``dashboard`` (the web page: bind address, login token, what counts as stale, how much history).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from latentcast.channel import TlsConfig, read_token
from latentcast.config import ConfigError, load_config

from ..config import is_loopback

__all__ = ["ENV_PREFIX", "CloudLinkConfig", "DashboardSection", "DashboardConfig", "load_dashboard_config",
           "ConfigError"]

ENV_PREFIX = "LATENTCAST_DASHBOARD"


@dataclass
class CloudLinkConfig:
    target: str = "127.0.0.1:50051"  # the cloud's Latentcast gRPC address, host:port
    token: str = ""  # bearer token of a subscribe or admin role ("" = none); prefer token_file or the variable
    token_file: str = ""  # file whose first line is that token (used when token is "")
    tls: bool = False  # use TLS (system roots unless tls_root_certs is set)
    tls_root_certs: str = ""  # PEM CA bundle that signs the cloud's certificate
    tls_client_cert: str = ""  # PEM client certificate chain, for mTLS
    tls_client_key: str = ""  # PEM client private key, for mTLS
    tls_server_name: str = ""  # name to verify in the cloud's certificate instead of the target host
    camera_id: str = ""  # show only this camera ("" = every camera the token may see)
    task: str = ""  # show only this task's cameras ("" = any task)
    jpeg_quality: int = 75  # quality of the JPEG frames the cloud sends the dashboard (1..100)
    keepalive_s: float = 30.0  # HTTP/2 keepalive ping interval (the cloud must permit it)
    keepalive_timeout_s: float = 10.0  # ping ack timeout before the connection counts as dead
    max_message_bytes: int = 16 * 1024 * 1024  # largest FrameResult accepted (a JPEG frame and its boxes)
    backoff_initial_s: float = 0.5  # first resubscribe delay after the cloud went away, doubled per failure
    backoff_max_s: float = 10.0  # longest resubscribe delay

    def __post_init__(self) -> None:
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"cloud.jpeg_quality {self.jpeg_quality} out of range 1..100")
        if self.backoff_initial_s <= 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ConfigError(f"cloud.backoff_initial_s {self.backoff_initial_s} must be > 0 and at most "
                              f"cloud.backoff_max_s {self.backoff_max_s}")

    def tls_config(self) -> TlsConfig | None:
        """The channel's TLS settings, None for plaintext."""
        if not (self.tls or self.tls_root_certs or self.tls_client_cert):
            return None
        return TlsConfig(root_certs=self.tls_root_certs or None, client_cert=self.tls_client_cert or None,
                         client_key=self.tls_client_key or None, server_name=self.tls_server_name or None)

    def resolved_token(self) -> str | None:
        return read_token(self.token, self.token_file, key="cloud.token_file")


@dataclass
class DashboardSection:
    host: str = "127.0.0.1"  # address the page is served on; a non-loopback one needs a login token (or insecure)
    port: int = 8080  # HTTP port of the page; 0 picks a free port (tests)
    login_token: str = ""  # token a browser logs in with ("" = none); prefer login_token_file or the variable
    login_token_file: str = ""  # file whose first line is the login token (used when login_token is "")
    insecure: bool = False  # serve a non-loopback host without a login token (behind an authenticating proxy)
    stale_s: float = 5.0  # a camera without a new frame for this long is marked stale
    rate_window_s: float = 10.0  # kbit/s, fps, bpp and p50 latency are computed over this window
    history_s: float = 300.0  # span of each camera's chart and of the detections timeline
    timeline_bucket_s: float = 10.0  # the detections timeline counts boxes per label in buckets this long
    max_cameras: int = 64  # cameras kept; beyond, the least recently seen one is forgotten
    max_clients: int = 32  # browser connections served at once (more get HTTP 503)
    stats_interval_s: float = 1.0  # how often the numbers and charts are pushed to the browsers

    def __post_init__(self) -> None:
        for name in ("stale_s", "rate_window_s", "history_s", "timeline_bucket_s", "stats_interval_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"dashboard.{name} {getattr(self, name)} must be > 0")
        for name in ("max_cameras", "max_clients"):
            if getattr(self, name) < 1:
                raise ConfigError(f"dashboard.{name} {getattr(self, name)} must be >= 1")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"dashboard.port {self.port} out of range 0..65535")

    def resolved_login_token(self) -> str | None:
        return read_token(self.login_token, self.login_token_file, key="dashboard.login_token_file")

    def exposure_problem(self) -> str | None:
        """Why the page may not be served on ``host`` as configured, else None: a non-loopback address
        without a login token and without ``insecure: true``."""
        if is_loopback(self.host) or self.insecure or self.login_token or self.login_token_file:
            return None
        return (f"dashboard.host {self.host!r} is reachable from other machines but no login token is set: set "
                f"dashboard.login_token_file (or {ENV_PREFIX}__DASHBOARD__LOGIN_TOKEN), or insecure: true "
                f"behind a proxy that authenticates")


@dataclass
class DashboardConfig:
    cloud: CloudLinkConfig = field(default_factory=CloudLinkConfig)  # the cloud the dashboard subscribes to
    dashboard: DashboardSection = field(default_factory=DashboardSection)  # the web page


def load_dashboard_config(path: str | os.PathLike | None = None, *,
                          env: dict[str, str] | None = None) -> DashboardConfig:
    """The YAML file at ``path`` (None: defaults) under the ``LATENTCAST_DASHBOARD__*`` variables."""
    return load_config(DashboardConfig, path, env_prefix=ENV_PREFIX, env=env)
