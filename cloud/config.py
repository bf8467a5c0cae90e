"""Configuration of the cloud service: dataclass defaults < YAML file < environment.

Load with :func:`load_cloud_config` (``load_config(CloudConfig, path, env_prefix="LATENTCAST_CLOUD")``).
Every field has a default and a comment; ``latentcast.config.describe_config(CloudConfig,
ENV_PREFIX)`` lists them with their environment variables, e.g. ``server.tokens`` is
``LATENTCAST_CLOUD__SERVER__TOKENS`` (comma-separated).

Example ``cloud.yaml``::

    server:
      host: 0.0.0.0                        # every interface: needs TLS and tokens (or insecure: true)
      port: 50051
      tokens_file: /etc/latentcast/tokens.yaml
      tls_cert_file: /etc/latentcast/tls.crt
      tls_key_file: /etc/latentcast/tls.key
    analytics:
      kind: yolox
      keep_classes: [person, car, bicycle]
    sinks:
      jsonl_path: results/cloud_frames.jsonl
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from latentcast.config import ConfigError, load_config
from latentcast.models.composer import COMPOSER_KINDS  # numpy only: importing it loads no torch
from latentcast.proto.regions import RENDER_RUNTIMES, SYNTHESIS_GROW, SYNTHESIS_HALO

__all__ = [
    "ConfigError",
    "ENV_PREFIX",
    "ServerConfig",
    "CodecConfig",
    "AnalyticsConfig",
    "PipelineConfig",
    "SessionsConfig",
    "SinksConfig",
    "CloudConfig",
    "load_cloud_config",
    "DROP_POLICIES",
    "DETECTOR_KINDS",
    "CODEC_NAMES",
]

ENV_PREFIX = "LATENTCAST_CLOUD"
DROP_POLICIES = ("drop_oldest", "drop_newest")
ENGINES = ("embedded", "ray")  # pipeline.engine: where synthesis and analytics run
DETECTOR_KINDS = ("yolox", "onnx", "none")
# the decoders the cloud has (cloud/decode.py): "latentcast" = the loaded codec (per-frame and temporal LCF),
# "jpeg" = the JPEG baseline of `latentcast bench stream` (proto/ids.py CODEC_IDS["jpeg"])
CODEC_NAMES = ("latentcast", "jpeg")


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach: 127.0.0.0/8, ::1, localhost, a unix socket."""
    import ipaddress

    h = host.strip().strip("[]")
    if h == "localhost" or h.startswith("unix:"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # address the Latentcast service listens on ("0.0.0.0" / "[::]": every interface, which
    #   needs TLS and tokens, or insecure: true)
    port: int = 50051  # Latentcast gRPC port; 0 picks a free port (tests)
    maintenance_host: str = "127.0.0.1"  # address of the maintenance server (health, reflection; no auth: keep it
    #   loopback or on a private network)
    maintenance_port: int = 50052  # health + reflection gRPC port, no auth, no TLS; 0 = free port, -1 = off
    metrics_host: str = "127.0.0.1"  # address of the Prometheus HTTP endpoint (no auth: loopback or a private network)
    metrics_port: int = 9464  # Prometheus /metrics HTTP port; 0 = free port, -1 = off
    max_message_bytes: int = 8 * 1024 * 1024  # gRPC max receive/send message (RESOURCE_EXHAUSTED beyond)
    max_packet_bytes: int = 4 * 1024 * 1024  # largest codec packet accepted in a FramePacket (INVALID_ARGUMENT beyond)
    max_concurrent_rpcs: int = 256  # streams + subscriptions served at once (gRPC refuses more with RESOURCE_EXHAUSTED)
    keepalive_time_s: float = 30.0  # server pings an idle connection this often to detect dead edges
    keepalive_timeout_s: float = 10.0  # a ping unanswered this long closes the connection
    keepalive_permit_without_calls: bool = True  # accept client keepalive pings on connections without an RPC
    min_client_ping_interval_s: float = 10.0  # clients may ping at most this often (edge keepalive must be >= this)
    max_ping_strikes: int = 2  # too-frequent client pings tolerated before GOAWAY
    tokens: list[str] = field(default_factory=list)  # bearer tokens, each an admin of every camera; prefer tokens_file
    tokens_file: str = ""  # YAML token file: name, sha256 (or token), role publish|subscribe|admin, camera globs
    #   (cloud/auth.py; `latentcast token new` makes an entry). No tokens and no file = authentication off
    insecure: bool = False  # allow a non-loopback host without TLS and tokens (e.g. behind a TLS-terminating proxy)
    tls_cert_file: str = ""  # PEM server certificate chain; empty = plaintext (loopback / behind a TLS proxy only)
    tls_key_file: str = ""  # PEM private key of tls_cert_file
    tls_client_ca_file: str = ""  # PEM CA bundle; when set, clients must present a certificate it signed (mTLS)
    grace_s: float = 5.0  # graceful shutdown: time open streams get to finish before they are cancelled
    ack_every_frames: int = 8  # send a cumulative Ack after this many received frames ...
    ack_interval_ms: float = 250.0  # ... or this long after the first unacknowledged frame, whichever first
    stream_outbox: int = 64  # per-stream messages awaiting the client before the server stops reading its frames

    def __post_init__(self) -> None:
        problem = self.exposure_problem()
        if problem:
            raise ValueError(problem)

    def exposure_problem(self) -> str | None:
        """Why this service may not listen on ``host`` as configured (a non-loopback address without both TLS
        and tokens, and no ``insecure: true``), else None. Checked on construction and again by
        ``CloudServer.start`` (a config object can be changed after it was built)."""
        has_tls = bool(self.tls_cert_file)
        has_tokens = any(self.tokens) or bool(self.tokens_file)
        if is_loopback(self.host) or self.insecure or (has_tls and has_tokens):
            return None
        missing = " and ".join(w for w, ok in (("TLS (tls_cert_file, tls_key_file)", has_tls),
                                               ("tokens (tokens_file)", has_tokens)) if not ok)
        return (f"server.host {self.host!r} is not a loopback address, and the service has no {missing}: "
                "anyone on the network could publish and subscribe to every camera. Configure them, "
                "or set server.insecure: true to serve it this way anyway (e.g. behind a "
                "TLS-terminating proxy that authenticates)")


@dataclass
class CodecConfig:
    weights: str = "elic-lite"  # codec weights: a name shipped in models/weights or a path to a .safetensors file
    synthesis: str = "own"  # g_s that renders: own (the codec's), auto (one shipped for the codec), a name or a path
    temporal_synthesis: str = "auto"  # g_s of temporal streams, as synthesis (auto: elic-lite-fast for elic-lite)
    warmup_size: int = 64  # side of the dummy frame coded and decoded once before the health turns SERVING
    temporal_tables: str = ""  # temporal streams' P-frame tables; "" = models/weights/<codec>-temporal.safetensors
    refresh_retry_s: float = 1.0  # temporal: ask again for a keyframe if frames are still refused after this long
    temporal_render: str = "changed"  # temporal: "changed" re-renders the cells that changed, "whole" every cell
    render_grow: int = SYNTHESIS_GROW  # temporal_render changed: cells around each changed cell re-rendered too
    render_halo: int = SYNTHESIS_HALO  # temporal_render changed: cells of context around each re-rendered rectangle
    render_runtime: str = "auto"  # temporal: g_s on onnx, torch, bf16 (torch in bfloat16), auto: bf16 if the CPU has it

    def __post_init__(self) -> None:
        for name in ("synthesis", "temporal_synthesis"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"codec.{name} {v!r} must be auto, own, a synthesis name or a path")
        if self.temporal_render not in ("changed", "whole"):
            raise ValueError(f"codec.temporal_render {self.temporal_render!r} is not one of changed, whole")
        if self.render_runtime not in RENDER_RUNTIMES:
            raise ValueError(f"codec.render_runtime {self.render_runtime!r} is not one of {', '.join(RENDER_RUNTIMES)}")
        for name in ("render_grow", "render_halo"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 16:
                raise ValueError(f"codec.{name} {v!r} must be an integer in 0..16")


@dataclass
class AnalyticsConfig:
    kind: str = "yolox"  # detector: "yolox" (YOLOX-nano COCO), "onnx" (boxes/scores/labels graph), "none"
    model_path: str = ""  # ONNX file; empty = the kind's default (yolox: shared models/yolox_nano.onnx)
    labels_path: str = ""  # class names, one per line in output order; empty = the kind's default (COCO 80)
    score_threshold: float = 0.3  # detections below this confidence are dropped
    nms_threshold: float = 0.45  # IoU for non-maximum suppression (yolox)
    keep_classes: list[str] = field(default_factory=list)  # class names to keep; empty = all classes
    threads: int = 1  # ONNX Runtime intra-op threads per detector (0 = ORT default: all cores)
    input_width: int = 0  # onnx kind: network input width; 0 = read from the model's static input shape
    input_height: int = 0  # onnx kind: network input height; 0 = read from the model's static input shape
    input_channels: str = "rgb"  # onnx kind: channel order fed to the network, "rgb" or "bgr"
    input_scale: float = 1.0 / 255.0  # onnx kind: pixel values (0..255) are multiplied by this


@dataclass
class PipelineConfig:
    workers: int = 0  # decode+analytics worker threads; 0 = auto: cores / torch_threads (1 when that is 0: all cores)
    torch_threads: int = 0  # intra-op threads for decoding (torch, and ONNX Runtime's g_s); 0 = each one's default
    max_batch: int = 4  # frames a worker takes at once for the composer to compose together (composer.kind none:
    #                     one at a time, so another stream's frame never waits for a whole batch)
    batch_wait_ms: float = 5.0  # a worker waits at most this long to fill a batch after its first frame
    max_queued_per_session: int = 2  # frames of one stream queued or in work (see backpressure); small = low latency
    backpressure: bool = True  # at max_queued_per_session, stop reading that stream until a frame completes, so
    #                            the edge's bounded send queue drops by its policy; false = drop here by drop_policy
    max_queued_total: int = 64  # frames of all streams queued; more are dropped by drop_policy
    drop_policy: str = "drop_oldest"  # when full: "drop_oldest" (evict the stream's oldest; globally, the oldest of the
    #                                   longest stream queue) or "drop_newest" (refuse the new frame)
    max_frame_age_s: float = 5.0  # a frame queued longer is dropped before decoding (frame_expired); 0 = no limit
    refused_backoff_max_s: float = 1.0  # a stream whose frames keep being refused as the sender's fault (undecodable,
    #   bad checksum or edge boxes, not the session's) is read more slowly: after 3 in a row, 10 ms before its next
    #   frame, doubling per refusal up to this; one analysed frame resets it. 0 = off
    engine: str = "embedded"  # where synthesis and analytics run: embedded (this process) or ray (Ray Serve
    #   deployments, cloud/serve_stages.py; pip install -e ".[ray]"). The front keeps sessions and temporal state
    ray_address: str = ""  # engine ray: the cluster to join (auto, ray://host:10001); "" = a local Ray on this machine
    ray_max_batch: int = 8  # engine ray: frames a stage replica takes at once (@serve.batch), across cameras
    ray_batch_wait_ms: float = 5.0  # engine ray: a replica waits at most this long to fill a batch
    ray_min_replicas: int = 1  # engine ray: replicas of each stage at least (autoscaling lower bound)
    ray_max_replicas: int = 1  # engine ray: replicas of each stage at most (autoscaled on ongoing requests)
    ray_gpus: float = 0.0  # engine ray: GPUs per synthesis and analytics replica (0: CPU)
    ray_cpus: float = 1.0  # engine ray: CPUs per synthesis and analytics replica
    codecs: list[str] = field(default_factory=lambda: ["latentcast"])  # codecs whose sessions are accepted:
    #   "latentcast" (the loaded codec) and "jpeg" (the JPEG baseline of `latentcast bench stream`: whole frames as
    #   JPEG, for benchmarks only; keep it off in production). Other codecs' sessions end with FAILED_PRECONDITION

    @property
    def worker_count(self) -> int:
        """The worker threads to start: ``workers``, or with 0 one per ``torch_threads`` cores (each frame's
        libraries then use their share of the machine), or 1 when ``torch_threads`` is 0 (they use it all)."""
        if self.workers:
            return self.workers
        if self.torch_threads <= 0:
            return 1
        return max(1, (os.cpu_count() or 1) // self.torch_threads)

    def __post_init__(self) -> None:
        codecs = self.codecs
        if isinstance(codecs, str) or not isinstance(codecs, (list, tuple)) or not codecs:
            raise ValueError(f"pipeline.codecs {codecs!r} must be a non-empty list of codec names "
                             f"(valid: {', '.join(CODEC_NAMES)})")
        unknown = [c for c in codecs if c not in CODEC_NAMES]
        if unknown:
            raise ValueError(f"pipeline.codecs: unknown codec name(s) {', '.join(map(repr, unknown))} "
                             f"(valid: {', '.join(CODEC_NAMES)})")
        if self.engine not in ENGINES:
            raise ValueError(f"pipeline.engine {self.engine!r} is not one of {', '.join(ENGINES)}")
        if not 1 <= self.ray_min_replicas <= self.ray_max_replicas:
            raise ValueError(f"pipeline.ray_min_replicas {self.ray_min_replicas} must be >= 1 and <= "
                             f"pipeline.ray_max_replicas {self.ray_max_replicas}")
        if self.ray_max_batch < 1 or self.ray_batch_wait_ms < 0 or self.ray_gpus < 0 or self.ray_cpus < 0:
            raise ValueError(f"pipeline.ray_max_batch {self.ray_max_batch} must be >= 1 and ray_batch_wait_ms "
                             f"{self.ray_batch_wait_ms}, ray_gpus {self.ray_gpus}, ray_cpus {self.ray_cpus} >= 0")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"pipeline.drop_policy {self.drop_policy!r} is not one of {', '.join(DROP_POLICIES)}")
        if self.workers < 0:
            raise ValueError(f"pipeline.workers must be >= 0 (0 = auto), got {self.workers}")
        for name in ("max_batch", "max_queued_per_session", "max_queued_total"):
            if getattr(self, name) < 1:
                raise ValueError(f"pipeline.{name} must be >= 1, got {getattr(self, name)}")
        if not (self.refused_backoff_max_s >= 0 and math.isfinite(self.refused_backoff_max_s)):
            raise ValueError(f"pipeline.refused_backoff_max_s must be a finite number >= 0 (0 = off), "
                             f"got {self.refused_backoff_max_s!r}")
        if not (self.max_frame_age_s >= 0 and math.isfinite(self.max_frame_age_s)):
            raise ValueError(f"pipeline.max_frame_age_s must be a finite number >= 0 (0 = no limit), "
                             f"got {self.max_frame_age_s!r}")


@dataclass
class ComposerConfig:
    kind: str = "none"  # "none": ẑ_c through the codec's latent decoder (embedded default); "controlnet": ControlNet
    # diffusion on Stable Diffusion composes the frame from the transmitted latents (paper profile, wants a GPU)
    sd: str = "stabilityai/stable-diffusion-2-1-base"  # controlnet: SD 2.1-base folder or hub id ("tiny": test model)
    controlnet: str = ""  # controlnet: trained ControlNet + adapter folder (latentcast train composer); "" = untrained
    local_files_only: bool = True  # controlnet: read hub ids from the local Hugging Face cache only, never download
    scheduler: str = "dpm++"  # controlnet: sampler, "dpm++" (DPM-Solver++ multistep) or "ddim"
    steps: int = 8  # controlnet: sampling steps for the analysed frames (machine consumers)
    start_strength: float = 1.0  # controlnet: 1 = start from pure noise; < 1 = from the decoded latent, noised
    keep_roi: bool = True  # controlnet: keep the transmitted ROI latents in the composed latent
    guidance_scale: float = 1.0  # controlnet: classifier-free guidance; 1 = off (one UNet pass per step)
    use_caption: bool = True  # controlnet: caption from the frame's ROI labels ("a photo of a car, two persons")
    seed: int = 0  # controlnet: mixed into each stream's fixed noise seed (consecutive frames do not flicker)

    def __post_init__(self) -> None:
        if self.kind not in COMPOSER_KINDS:
            raise ValueError(f"composer.kind {self.kind!r} is not one of {', '.join(COMPOSER_KINDS)}")
        if self.scheduler not in ("dpm++", "ddim"):
            raise ValueError(f"composer.scheduler {self.scheduler!r} is not one of dpm++, ddim")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"composer.steps must be an integer >= 1, got {self.steps!r}")
        if not 0.0 < self.start_strength <= 1.0:
            raise ValueError(f"composer.start_strength {self.start_strength!r} out of range (0 < value <= 1)")


@dataclass
class SessionsConfig:
    max_cameras: int = 4096  # camera states kept for resume; the least recently seen idle ones are forgotten beyond
    max_out_of_order: int = 1024  # seqs held above the contiguous watermark; beyond, the oldest gap is given up
    skip_gaps: bool = True  # seqs strictly increase on a stream, so a gap below a newer seq is lost: ack past it
    max_labels: int = 4096  # labels a SessionHeader may carry
    max_id_chars: int = 256  # longest camera_id / task / label
    takeover_after_s: float = 15.0  # a stream from another edge instance for a camera whose live stream sent a
    #   message within this is refused (ALREADY_EXISTS); a holder silent longer is superseded (a restarted edge)
    max_seq_ahead: int = 1 << 24  # a frame's seq must be below next_seq + this (else INVALID_ARGUMENT, state kept):
    #   6 days of frames at 30 fps, so an edge that was offline for long still resumes, and no seq can exhaust uint64
    max_frame_pixels: int = 1920 * 1088  # largest frame (width x height) a session may declare: 1080p coded size;
    #                                      decode cost grows with it (up to proto.bitstream.MAX_DECODE_PIXELS)

    def __post_init__(self) -> None:
        t = self.takeover_after_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t >= 0 and math.isfinite(t)):
            raise ValueError(f"sessions.takeover_after_s must be a finite number >= 0 (0 = a newer stream always "
                             f"takes over), got {t!r}")
        a = self.max_seq_ahead
        if isinstance(a, bool) or not isinstance(a, int) or not 1 <= a <= 1 << 63:
            raise ValueError(f"sessions.max_seq_ahead must be an integer in 1..2**63, got {a!r}")


@dataclass
class SinksConfig:
    jsonl_path: str = ""  # append one JSON line per analysed frame here; empty = off
    subscriber_queue: int = 16  # frames buffered per Subscribe client; the oldest are dropped for slow clients
    jpeg_quality: int = 90  # JPEG quality when a SubscribeRequest asks for 0 (server default)
    png_compression: int = 1  # cv2 PNG compression level 0..9 for subscribers asking for PNG
    recompose_queue: int = 4  # frames waiting to be composed again for subscribers' compose_steps (oldest dropped)

    def __post_init__(self) -> None:
        for name in ("subscriber_queue", "recompose_queue"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"sinks.{name} {v!r} must be an integer >= 1")


@dataclass
class CloudConfig:
    server: ServerConfig = field(default_factory=ServerConfig)  # gRPC, maintenance and metrics endpoints, auth, TLS
    codec: CodecConfig = field(default_factory=CodecConfig)  # the codec the packets are decoded with
    analytics: AnalyticsConfig = field(default_factory=AnalyticsConfig)  # detector run on every reconstruction
    composer: ComposerConfig = field(default_factory=ComposerConfig)  # how a frame is made from the decoded latent
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)  # decode/analytics worker pool and queues
    sessions: SessionsConfig = field(default_factory=SessionsConfig)  # per-camera resume state
    sinks: SinksConfig = field(default_factory=SinksConfig)  # JSON lines and Subscribe fan-out

    def __post_init__(self) -> None:
        if self.analytics.kind not in DETECTOR_KINDS:
            raise ValueError(f"analytics.kind {self.analytics.kind!r} is not one of {', '.join(DETECTOR_KINDS)}")
        if bool(self.server.tls_cert_file) != bool(self.server.tls_key_file):
            raise ValueError("server.tls_cert_file and server.tls_key_file must be set together")
        if self.server.tls_client_ca_file and not self.server.tls_cert_file:
            raise ValueError("server.tls_client_ca_file (mTLS) needs server.tls_cert_file and tls_key_file")
        if not 1 <= self.sinks.jpeg_quality <= 100:
            raise ValueError(f"sinks.jpeg_quality {self.sinks.jpeg_quality} out of range 1..100")
        if self.server.max_packet_bytes > self.server.max_message_bytes:
            raise ValueError(f"server.max_packet_bytes {self.server.max_packet_bytes} exceeds "
                             f"server.max_message_bytes {self.server.max_message_bytes}")


def load_cloud_config(path: str | os.PathLike | None = None, *, env: dict[str, str] | None = None) -> CloudConfig:
    """Defaults < the YAML file at ``path`` < ``LATENTCAST_CLOUD__...`` environment variables."""
    return load_config(CloudConfig, path, env_prefix=ENV_PREFIX, env=env)
