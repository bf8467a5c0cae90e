"""The cloud's heavy stages as Ray Serve deployments (``pipeline.engine: ray``; ``pip install -e ".[ray]"``).

::

    front: latentcast cloud (gRPC streams, sessions, temporal state, the fair worker pool)
        │ each frame, from a worker thread: DeploymentHandle.<method>.remote(...).result()
        ├─► Synthesis  per-frame LCF: packet bytes ─► LatentCodec.decompress ─► RGB frame     @serve.batch
        │              temporal: the stream's ŷ and M(ẑ) (decoded in order on the front) ─► g_s ─► frame
        ├─► Compose    (composer.kind other than none) ẑ_c + ROIs ─► ControlNet ─► frame     @serve.batch
        └─► Analytics  RGB frame ─► the configured detector ─► boxes                          @serve.batch

The deployments run the same code as the embedded engine (``LatentCodec``, ``make_detector``); a batch takes
frames of many cameras (``pipeline.ray_max_batch`` within ``pipeline.ray_batch_wait_ms``); replicas autoscale
between ``ray_min_replicas`` and ``ray_max_replicas`` on ongoing requests, each with ``ray_cpus`` /
``ray_gpus``. What stays on the front: admission, the entropy decoding of temporal streams into their state
(in arrival order), the queues and their drop policy, the sinks. A temporal frame is rendered whole remotely
(the front's changed-cell rendering needs the stream's last rendered latent, which stays on the front only in
the embedded engine). With a composer, the Synthesis deployment returns ẑ_c (no latent decoder) and the
Compose deployment makes the frame; a subscriber's own sampling steps go to the same deployment.

:class:`RayStages` connects (``ray.init``: the cluster at ``ray_address``, or a local Ray), deploys the
application ``latentcast-stages`` unless it is already running (``serve run cloud/deploy/serve.yaml`` deploys
the same application), and gives the front :class:`RemoteDetector` and :class:`RemoteSynthesis`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

import numpy as np

try:
    import ray
    from ray import serve
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(f"pipeline.engine ray needs Ray Serve: pip install -e \".[ray]\" ({exc})") from exc

from .config import AnalyticsConfig, CloudConfig, CodecConfig

log = logging.getLogger(__name__)

__all__ = ["APP_NAME", "Synthesis", "Analytics", "Compose", "RayStages", "RemoteComposer", "RemoteDetector",
           "RemoteSynthesis", "StageError",
           "build_app", "app_builder"]

APP_NAME = "latentcast-stages"  # the Serve application of the stages


class _Failed:
    """A frame a stage could not process: its FrameFailure code and message (pickled back to the front)."""

    def __init__(self, code: str, message: str) -> None:
        self.code, self.message = code, message


@serve.deployment
class Synthesis:
    """g_s and the latent decoder of one codec: per-frame packets, and temporal states rendered whole."""

    def __init__(self, codec: dict, max_batch: int = 8, batch_wait_s: float = 0.005, threads: int = 0) -> None:
        import torch

        from latentcast.models.codec import LatentCodec

        if threads > 0:
            torch.set_num_threads(threads)
        cfg = CodecConfig(**codec)
        self.codec = LatentCodec.load(cfg.weights)
        self.codec.use_synthesis(cfg.synthesis)
        # temporal states render with the g_s whose M(ẑ) the front computed (codec.temporal_synthesis)
        self.codec.use_synthesis(cfg.temporal_synthesis, temporal=True)
        from latentcast.models.synthesis_runtime import render_synthesis

        # ... on the runtime the embedded engine would use (codec.render_runtime: bf16 where the CPU has it)
        self._synthesis = render_synthesis(self.codec.temporal_g_s, cfg.render_runtime, threads=threads)
        for method in (self.decompress, self.render):
            method.set_max_batch_size(max_batch)
            method.set_batch_wait_timeout_s(batch_wait_s)

    def weights_hash(self) -> bytes:
        return bytes(self.codec.weights_hash)

    @serve.batch
    async def decompress(self, items: list[tuple[bytes, bool]]) -> list[np.ndarray | tuple | _Failed]:
        """(packet bytes, latent_only) -> the frame, or (ẑ_c, mask) for a composer to make the frame from."""
        from latentcast.models.codec import CodecError

        from .decode import codec_error_code

        out: list[np.ndarray | tuple | _Failed] = []
        for data, latent_only in items:
            try:
                rec = self.codec.decompress(data, decode_frame=not latent_only)
                out.append((rec.latent, rec.mask) if latent_only else rec.frame)
            except CodecError as exc:
                out.append(_Failed(codec_error_code(exc), str(exc)))
            except (ValueError, IndexError, OverflowError) as exc:  # the range decoder on hostile bytes
                out.append(_Failed("decode_failed", f"{type(exc).__name__}: {exc}"))
        return out

    @serve.batch
    async def render(self, items: list[tuple[np.ndarray, np.ndarray, int, int]]) -> list[np.ndarray]:
        """(ŷ (M, rows, cols), M(ẑ) on the same grid, width, height) -> the frame, g_s over the whole grid."""
        import torch

        out = []
        with torch.no_grad():
            for y, gz, w, h in items:
                y_t = torch.from_numpy(np.ascontiguousarray(y))[None].float()
                latent = self._synthesis(y_t, torch.ones(1, 1, *y.shape[1:]),
                                         torch.from_numpy(np.ascontiguousarray(gz))[None])
                f = self.codec.cfg.latent_factor
                out.append(self.codec.latent_to_frame(latent[:, :, : -(-h // f), : -(-w // f)], w, h))
        return out


@serve.deployment
class Analytics:
    """The configured detector (``analytics`` of cloud.yaml)."""

    def __init__(self, analytics: dict, max_batch: int = 8, batch_wait_s: float = 0.005) -> None:
        from .analytics import make_detector

        self.detector = make_detector(AnalyticsConfig(**analytics))
        self.labels = list(getattr(self.detector, "labels", []) or [])
        self.detect.set_max_batch_size(max_batch)
        self.detect.set_batch_wait_timeout_s(batch_wait_s)

    def describe(self) -> dict:
        return {"detector": type(self.detector).__name__, "labels": self.labels}

    @serve.batch
    async def detect(self, frames: list[np.ndarray]) -> list[list | _Failed]:
        out: list[list | _Failed] = []
        for f in frames:
            try:
                out.append(list(self.detector.detect(f)))
            except Exception as exc:  # noqa: BLE001 - this frame's failure, not the replica's
                out.append(_Failed("analytics_failed", f"{type(exc).__name__}: {exc}"))
        return out


@serve.deployment
class Compose:
    """The configured composer (``composer`` of cloud.yaml, e.g. ControlNet diffusion): requests of many
    cameras composed together, as the embedded compose stage does with a worker's batch."""

    def __init__(self, codec: dict, composer: dict, max_batch: int = 8, batch_wait_s: float = 0.005,
                 threads: int = 0) -> None:
        import torch

        from latentcast.models.codec import LatentCodec

        from .compose import make_composer
        from .config import ComposerConfig

        if threads > 0:
            torch.set_num_threads(threads)
        self.composer = make_composer(ComposerConfig(**composer), LatentCodec.load(CodecConfig(**codec).weights))
        self.compose.set_max_batch_size(max_batch)
        self.compose.set_batch_wait_timeout_s(batch_wait_s)

    @serve.batch
    async def compose(self, requests: list) -> list[np.ndarray | _Failed]:
        try:
            return list(self.composer.compose(list(requests)))
        except Exception as exc:  # noqa: BLE001 - the batch's frames fail, the replica goes on
            return [_Failed("compose_failed", f"{type(exc).__name__}: {exc}")] * len(requests)


class StageError(RuntimeError):
    """A remote stage refused a frame; ``code`` is its FrameFailure code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _timed(observe, stage: str, call):
    t0 = time.monotonic()
    try:
        return call()
    finally:
        if observe is not None:
            observe(stage, time.monotonic() - t0)


class RemoteDetector:
    """The front's detector in the ray engine: the Analytics deployment behind the embedded interface."""

    def __init__(self, handle: Any, labels: list[str], name: str, observe=None) -> None:
        self._handle = handle
        self.labels = labels
        self.name = name
        self._observe = observe  # (stage, seconds) of each call, e.g. CloudMetrics.remote_seconds

    def detect(self, rgb: np.ndarray) -> list:
        out = _timed(self._observe, "analytics", lambda: self._handle.detect.remote(rgb).result())
        if isinstance(out, _Failed):
            raise StageError(out.code, out.message)
        return out


class RemoteSynthesis:
    """The front's synthesis in the ray engine (``cloud/decode.py`` and ``models/temporal.py`` call it)."""

    def __init__(self, handle: Any, observe=None) -> None:
        self._handle = handle
        self._observe = observe

    def decompress(self, data: bytes, *, latent_only: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The frame of an LCF packet, or with ``latent_only`` (ẑ_c, mask) for the composer."""
        out = _timed(self._observe, "synthesis",
                     lambda: self._handle.decompress.remote((bytes(data), bool(latent_only))).result())
        if isinstance(out, _Failed):
            raise StageError(out.code, out.message)
        return out

    def render(self, y: np.ndarray, gz: np.ndarray, width: int, height: int) -> np.ndarray:
        return _timed(self._observe, "synthesis",
                      lambda: self._handle.render.remote((y, gz, int(width), int(height))).result())


def _options(p) -> dict:
    return {"autoscaling_config": {"min_replicas": p.ray_min_replicas, "max_replicas": p.ray_max_replicas,
                                   "target_ongoing_requests": max(1, p.ray_max_batch)},
            "ray_actor_options": {"num_cpus": p.ray_cpus, "num_gpus": p.ray_gpus},
            "max_ongoing_requests": 4 * p.ray_max_batch}


def build_app(config: CloudConfig, *, threads: int = 0):
    """The Serve application of the stages for ``config`` (also what ``cloud/deploy/serve.yaml`` builds)."""
    p = config.pipeline
    wait = p.ray_batch_wait_ms / 1000.0
    synthesis = Synthesis.options(name="synthesis", **_options(p)).bind(
        asdict(config.codec), max_batch=p.ray_max_batch, batch_wait_s=wait, threads=threads)
    analytics = Analytics.options(name="analytics", **_options(p)).bind(
        asdict(config.analytics), max_batch=p.ray_max_batch, batch_wait_s=wait)
    compose = None
    if config.composer.kind != "none":
        compose = Compose.options(name="compose", **_options(p)).bind(
            asdict(config.codec), asdict(config.composer), max_batch=p.ray_max_batch, batch_wait_s=wait,
            threads=threads)
    return _Ingress.bind(synthesis, analytics, compose)


@serve.deployment(name="stages", ray_actor_options={"num_cpus": 0})
class _Ingress:
    """The application's entry (Serve needs one); the front calls the two stages by their deployment names."""

    def __init__(self, synthesis, analytics, compose=None) -> None:
        self.synthesis, self.analytics, self.compose = synthesis, analytics, compose

    def ready(self) -> bool:
        return True


class RemoteComposer:
    """The front's composer in the ray engine: each request to the Compose deployment, which batches them."""

    def __init__(self, handle: Any, observe=None) -> None:
        self._handle = handle
        self._observe = observe

    def compose(self, requests: list) -> list[np.ndarray]:
        def call():
            return [r.result() for r in [self._handle.compose.remote(q) for q in requests]]

        out = _timed(self._observe, "compose", call)
        failed = next((o for o in out if isinstance(o, _Failed)), None)
        if failed is not None:
            raise StageError(failed.code, failed.message)
        return out


class RayStages:
    """The front's connection to the stage deployments."""

    def __init__(self, config: CloudConfig, *, observe=None) -> None:
        """``observe(stage, seconds)``: called after every remote call (the front's metrics)."""
        self.config = config
        self._observe = observe
        self.synthesis: RemoteSynthesis | None = None
        self.detector: RemoteDetector | None = None
        self.composer: RemoteComposer | None = None  # composer.kind other than none
        self._started_ray = False

    def connect(self, *, threads: int = 0) -> None:
        """Join (or start) Ray, deploy the stages unless running, check the codec, and make the proxies."""
        p = self.config.pipeline
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if p.ray_address:
                kw["address"] = p.ray_address
            ray.init(**kw)
            self._started_ray = True
        serve.start(proxy_location="Disabled")  # the front calls the stages by handle: no HTTP proxy
        if APP_NAME in serve.status().applications:
            log.info("ray engine: using the running application %s", APP_NAME)
        else:
            serve.run(build_app(self.config, threads=threads), name=APP_NAME, route_prefix=None)
            log.info("ray engine: deployed %s (synthesis, analytics)", APP_NAME)
        synthesis = serve.get_deployment_handle("synthesis", app_name=APP_NAME)
        analytics = serve.get_deployment_handle("analytics", app_name=APP_NAME)
        self.synthesis = RemoteSynthesis(synthesis, self._observe)
        info = analytics.describe.remote().result()
        self.detector = RemoteDetector(analytics, info["labels"], f"ray:{info['detector']}", self._observe)
        self.weights_hash = synthesis.weights_hash.remote().result()
        if self.config.composer.kind != "none":
            self.composer = RemoteComposer(serve.get_deployment_handle("compose", app_name=APP_NAME), self._observe)

    def close(self, *, delete_app: bool = False) -> None:
        """Leave Ray (the stages keep running for other fronts unless ``delete_app``)."""
        if delete_app:
            serve.delete(APP_NAME)
        if self._started_ray:
            ray.shutdown()


def app_builder(args: dict[str, Any]):
    """The application for ``serve run`` / ``serve deploy`` (``cloud/deploy/serve.yaml``): ``args.config`` names
    a cloud.yaml whose ``codec``, ``analytics`` and ``pipeline.ray_*`` settings the stages use ("" = the
    defaults; ``LATENTCAST_CLOUD__*`` variables apply as for the front)."""
    from .config import load_cloud_config

    path = (args or {}).get("config") or None
    return build_app(load_cloud_config(path), threads=int((args or {}).get("threads", 0)))
