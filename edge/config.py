"""The edge service's configuration: dataclass defaults < YAML file < ``LATENTCAST_EDGE__*`` variables.

::

    cfg = load_edge_config("edge.yaml")          # or load_config(EdgeConfig, path, env_prefix=ENV_PREFIX)
    LATENTCAST_EDGE__SERVER__TOKEN=...           # e.g. the token from the environment, not the file

``describe_config(EdgeConfig, ENV_PREFIX)`` lists every key, its variable and its default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from latentcast.channel import read_token
from latentcast.config import load_config
from latentcast.proto.symbols import check_rdoq, parse_background

__all__ = [
    "ANALYSIS_PRECISIONS",
    "ENV_PREFIX",
    "EdgeConfig",
    "SourceConfig",
    "GroundingConfig",
    "CodecConfig",
    "TemporalConfig",
    "SenderConfig",
    "ServerConfig",
    "load_edge_config",
]

ENV_PREFIX = "LATENTCAST_EDGE"

_PACES = ("realtime", "none")
_POLICIES = ("drop-oldest", "drop-newest")
_MOTIONS = ("constant-velocity", "last")
_BACKENDS = ("yolox", "open-vocab")  # grounding backends
_PROVIDERS = ("cpu", "cuda", "tensorrt")  # ONNX Runtime execution providers of the open-vocab backend
_TEMPORAL_MODES = ("auto", "temporal", "frames")  # temporal.mode
ANALYSIS_PRECISIONS = ("int8", "float32")  # codec.analysis: the arithmetic of the edge's g_a


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name} {value!r} is not one of {', '.join(valid)}")


def _check_min(name: str, value: float, lo: float, *, strict: bool = False) -> None:
    if value < lo or (strict and value == lo):
        raise ValueError(f"{name} {value!r} must be {'>' if strict else '>='} {lo}")


def _check_bounds(section: str, cfg: object, *, at_least: dict[str, float] | None = None,
                  above: dict[str, float] | None = None) -> None:
    """Each field of ``cfg`` named in ``above`` must be > its bound, each in ``at_least`` >= its bound;
    errors name the YAML key (``section.field``)."""
    for name, lo in (above or {}).items():
        _check_min(f"{section}.{name}", getattr(cfg, name), lo, strict=True)
    for name, lo in (at_least or {}).items():
        _check_min(f"{section}.{name}", getattr(cfg, name), lo)


@dataclass
class SourceConfig:
    uri: str = ""  # video file, image folder, rtsp:// or http(s):// URL, /dev/videoN or a device index
    pace: str = "realtime"  # files and folders: "realtime" (at fps) or "none" (as fast as encoded)
    fps: float = 0.0  # pacing and nominal rate; 0 = the source's own rate (10 when it has none)
    loop: bool = False  # restart files and folders at their end
    resize: tuple[int, ...] = ()  # (width, height) to scale every frame to; () = keep the first frame's size
    reconnect_attempts: int = 10  # live sources: failed reopen attempts in a row before giving up
    backoff_initial_s: float = 0.5  # live sources: first reopen delay, doubled per failure
    backoff_max_s: float = 10.0  # live sources: longest reopen delay
    frame_queue: int = 1  # captured frames waiting for the encoder; older ones are dropped (live first)

    def __post_init__(self) -> None:
        _check_choice("source.pace", self.pace, _PACES)
        _check_min("source.fps", self.fps, 0.0)
        if len(self.resize) not in (0, 2) or any(v <= 0 for v in self.resize):
            raise ValueError(f"source.resize {self.resize!r} must be [width, height] (two integers > 0) or empty")
        _check_min("source.reconnect_attempts", self.reconnect_attempts, 0)
        _check_min("source.backoff_initial_s", self.backoff_initial_s, 0.0, strict=True)
        _check_min("source.backoff_max_s", self.backoff_max_s, self.backoff_initial_s)
        _check_min("source.frame_queue", self.frame_queue, 1)


@dataclass
class GroundingConfig:
    task: str = "traffic"  # task name sent in the session header (and the task list to load, see labels_from_task)
    labels: list[str] = field(default_factory=lambda: ["person", "vehicle", "bicycle"])  # task labels to ground
    labels_from_task: bool = False  # true: ground the label list of the task named by "task" instead of
    # "labels" (user cache $LATENTCAST_CACHE/tasks, then the shipped lists; see latentcast task list); its
    # labels and hash go into the session and packet headers, and labels the detector cannot ground are
    # skipped. latentcast edge --task NAME sets task and this
    backend: str = "yolox"  # "yolox": closed-set YOLOX (labels mapped to its COCO classes); "open-vocab":
    # a Grounding DINO bundle from `latentcast export grounding` (ONNX Runtime; its labels must be the task's)
    bundle: str = ""  # open-vocab: the exported bundle folder (manifest.json, image.onnx, text.npz)
    provider: str = "cpu"  # open-vocab: ONNX Runtime execution provider, "cpu", "cuda" or "tensorrt"
    box_threshold: float = 0.0  # open-vocab: query confidence to keep a box; 0 = the bundle's (0.35)
    text_threshold: float = 0.0  # open-vocab: label score to name a box; 0 = the bundle's (0.25)
    model: str = ""  # yolox: YOLOX ONNX file; "" = models/yolox_nano.onnx in the shared folder
    labels_file: str = ""  # yolox: detector class names; "" = models/coco80_labels.txt in the shared folder
    score_threshold: float = 0.3  # yolox: detector confidence to keep a box
    nms_threshold: float = 0.45  # IoU above which same-class boxes are merged
    every: int = 5  # run the detector every N frames; track boxes in between
    max_missed: int = 2  # detector runs a track may go unmatched before it is dropped
    margin: int = 8  # pixels added around each box for its ROI
    motion: str = "constant-velocity"  # box motion between detections: "constant-velocity" or "last"
    threads: int = 0  # ONNX Runtime threads for the detector; 0 = its default

    def use_task(self, name: str) -> None:
        """Ground the label list of task ``name`` (``latentcast ... --task NAME``): sets ``task`` and
        ``labels_from_task``; an invalid name is a ``TaskError``, an unknown one fails when the edge loads it."""
        from latentcast.edge.tasks import check_task_name

        self.task, self.labels_from_task = check_task_name(name), True

    def __post_init__(self) -> None:
        if not self.labels:
            raise ValueError("grounding.labels is empty: give at least one task label (e.g. [person, vehicle])")
        if self.labels_from_task:
            from latentcast.edge.tasks import check_task_name

            check_task_name(self.task)
        _check_choice("grounding.motion", self.motion, _MOTIONS)
        _check_choice("grounding.backend", self.backend, _BACKENDS)
        _check_choice("grounding.provider", self.provider, _PROVIDERS)
        if self.backend == "open-vocab" and not self.bundle:
            raise ValueError("grounding.bundle is empty: the open-vocab backend needs the folder written by "
                             "`latentcast export grounding` (or set grounding.backend: yolox)")
        for name in ("box_threshold", "text_threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"grounding.{name} {v!r} out of range (0 <= value <= 1; 0 = the bundle's)")
        _check_bounds("grounding", self, at_least={"every": 1, "max_missed": 0, "margin": 0, "threads": 0})


@dataclass
class CodecConfig:
    bundle: str = ""  # edge bundle folder (ONNX); "" = the one shipped in models/weights
    rate_point: int = 1  # codec rate point, 0 (lowest rate) .. n_rates-1 of the bundle (elic-lite: 0..2)
    roi_only: bool = True  # code only the ROI latent cells (+ z); False = the whole frame
    background: str = "none"  # with roi_only: rate point 0..rate_point the other cells are coded at (ROI-QP), or none
    target_kbps: float = 0.0  # rate control of independent frames (0: off): background coarser, then none, then ROIs
    threads: int = 0  # ONNX Runtime threads for the encoder; 0 = its default
    analysis: str = "int8"  # g_a: int8 (the bundle's quantized stages, about 2x faster) or float32
    rdoq: float | None = None  # RDOQ λ: bits against rounding error per symbol; 0 = plain rounding; unset = the codec's

    def __post_init__(self) -> None:
        _check_bounds("codec", self, at_least={"rate_point": 0, "threads": 0, "target_kbps": 0})
        _check_choice("codec.analysis", self.analysis, ANALYSIS_PRECISIONS)
        try:
            self.rdoq = None if self.rdoq is None else check_rdoq(self.rdoq)
        except ValueError as exc:
            raise ValueError(f"codec.{exc}") from None
        self.background = str(self.background).strip().lower()
        try:
            level = parse_background(self.background)
        except ValueError as exc:
            raise ValueError(f"codec.{exc}") from None
        if level is not None and level > self.rate_point:
            raise ValueError(f"codec.background {level} out of range: none or a rate point 0..{self.rate_point} "
                             f"(at most codec.rate_point {self.rate_point})")

    @property
    def background_level(self) -> int | None:
        """The background's rate point, or None (ROI-only)."""
        return parse_background(self.background)


@dataclass
class TemporalConfig:
    """How the edge codes a stream over time (``edge.yaml``: ``temporal``)."""

    mode: str = "auto"  # temporal (keyframe, then changed cells), frames (independent), auto: temporal if tables exist
    key_rate_point: int = 2  # rate point of keyframes: the background every P frame draws on
    key_background: int = -1  # keyframes: rate point of the cells outside the ROIs (-1: all at key_rate_point)
    rate_point: int = 0  # quantization step of ROI cells in P frames (without rate control)
    threshold: int = 1  # a ROI cell is re-coded when its change has this many nonzero symbols
    interior_threshold: int = 0  # ROI cells a whole cell inside a box: re-coded at this threshold if higher (0: off)
    bg_rate_point: int = 0  # quantization step of background updates
    bg_threshold: int = 8  # a background cell is re-coded when its change has this many nonzero symbols
    deadzone: float = 0.0  # widening of the residual quantizer's zero bin (0..0.5): fewer bits, a little less detail
    refresh_s: float = 60.0  # a keyframe at least this often (0: only at start, scene change and request)
    scene_change: float = 0.4  # a keyframe when this fraction of all cells changed by bg_threshold symbols (a cut)
    target_kbps: float = 0.0  # rate control target (0: off): picks rate point, threshold, keyframe cost and period
    change_threshold: float = 8.0  # P frames: g_a only on 16x16 cells that changed by more (mean grey levels; 0: all)
    tables: str = ""  # P-frame entropy tables; "" = models/weights/<codec>-temporal.safetensors next to the bundle
    compact_p: bool = True  # P frames in the compact container (LCF v3: 26 bytes of header, not 61); off for old clouds
    motion: bool = True  # P frames: coded ROI cells predicted from the previous latent moved per grounded box (P_MC)
    camera_motion: bool = False  # P frames also send the camera's motion (a moving or handheld camera; off: fixed)
    rd: float = 0.0  # a coded ROI cell must save rd * step**2 of squared latent error per bit it costs (0: off)

    def __post_init__(self) -> None:
        _check_choice("temporal.mode", self.mode, _TEMPORAL_MODES)
        for name in ("key_rate_point", "rate_point", "bg_rate_point"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"temporal.{name} {v!r} must be a rate point index >= 0")
        for name in ("threshold", "bg_threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"temporal.{name} {v!r} must be an integer >= 1")
        v = self.key_background
        if isinstance(v, bool) or not isinstance(v, int) or v < -1:
            raise ValueError(f"temporal.key_background {v!r} must be a rate point index >= 0, or -1 (every cell at "
                             f"key_rate_point)")
        v = self.interior_threshold
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"temporal.interior_threshold {v!r} must be an integer >= 0 (0: off)")
        for name, lo, hi in (("refresh_s", 0.0, float("inf")), ("scene_change", 0.0, 1.0), ("deadzone", 0.0, 0.5),
                             ("rd", 0.0, 10.0),
                             ("target_kbps", 0.0, float("inf")), ("change_threshold", 0.0, 255.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise ValueError(f"temporal.{name} {v!r} out of range [{lo}, {hi}]")


@dataclass
class SenderConfig:
    queue_size: int = 2  # encoded frames waiting for the stream (small = low latency; older ones are dropped)
    policy: str = "drop-oldest"  # when the queue is full: "drop-oldest" or "drop-newest"
    max_in_flight: int = 2  # frames sent and not yet acknowledged; more wait in the queue (0 = no limit)
    backlog_frames: int = 300  # sent-but-unacked frames kept for resume (30 s at 10 fps)
    backlog_bytes: int = 64 * 1024 * 1024  # byte bound of that backlog
    drain_timeout_s: float = 10.0  # at the end of a run, how long to wait for the last acks

    def __post_init__(self) -> None:
        _check_choice("sender.policy", self.policy, _POLICIES)
        _check_bounds("sender", self, at_least={"queue_size": 1, "max_in_flight": 0, "backlog_frames": 1,
                                                "backlog_bytes": 1, "drain_timeout_s": 0.0})


@dataclass
class ServerConfig:
    target: str = "127.0.0.1:50051"  # cloud address, host:port
    fronts: list[str] = field(default_factory=list)  # cloud fronts (host:port), tried in rendezvous order by camera_id
    token: str = ""  # bearer token ("" = none); prefer LATENTCAST_EDGE__SERVER__TOKEN or token_file
    token_file: str = ""  # file whose first line is the bearer token (used when token is "")
    tls: bool = False  # use TLS (system roots unless tls_root_certs is set)
    tls_root_certs: str = ""  # PEM CA bundle that signs the server certificate
    tls_client_cert: str = ""  # PEM client certificate chain, for mTLS
    tls_client_key: str = ""  # PEM client private key, for mTLS
    tls_server_name: str = ""  # name to verify in the server certificate instead of the target host
    keepalive_s: float = 30.0  # HTTP/2 keepalive ping interval (the server must permit it)
    keepalive_timeout_s: float = 10.0  # ping ack timeout before the connection counts as dead
    max_message_bytes: int = 16 * 1024 * 1024  # max send/receive message size
    backoff_initial_s: float = 0.5  # first reconnect delay, doubled per failure
    backoff_max_s: float = 30.0  # longest reconnect delay
    backoff_jitter: float = 0.2  # delays are scaled by a random factor in 1 +- this
    max_reconnect_attempts: int = 0  # failed attempts in a row before giving up; 0 = never give up
    accept_timeout_s: float = 10.0  # wait for SessionAccepted after opening the stream
    already_exists_retry_s: float = 60.0  # the cloud says another edge publishes this camera_id (ALREADY_EXISTS):
    #   retry this long, then stop with that error; above the cloud's sessions.takeover_after_s (15 s) plus the
    #   reconnect backoff (attempts near 15 s and 31 s), so an edge restarted after a crash gets the camera back
    max_unknown_retries: int = 5  # streams ending with UNKNOWN (a cloud bug, not the network) without a frame acked
    #   in between before stopping; a few, as a transport reset can end one stream with UNKNOWN

    def __post_init__(self) -> None:
        if not self.target.strip():
            raise ValueError("server.target is empty: give host:port, e.g. 127.0.0.1:50051")
        _check_bounds("server", self,
                      above={"keepalive_s": 0.0, "keepalive_timeout_s": 0.0, "backoff_initial_s": 0.0,
                             "accept_timeout_s": 0.0},
                      at_least={"max_message_bytes": 1024, "backoff_max_s": self.backoff_initial_s,
                                "max_reconnect_attempts": 0, "already_exists_retry_s": 0.0, "max_unknown_retries": 0})
        if not 0.0 <= self.backoff_jitter < 1.0:
            raise ValueError(f"server.backoff_jitter {self.backoff_jitter!r} out of range 0 <= value < 1")

    def resolved_token(self) -> str | None:
        """The token, from ``token`` or else ``token_file``; None when neither is set."""
        return read_token(self.token, self.token_file, key="server.token_file")


@dataclass
class EdgeConfig:
    camera_id: str = "camera-0"  # stable camera id: the cloud keys resume state by it
    source: SourceConfig = field(default_factory=SourceConfig)  # where frames come from
    grounding: GroundingConfig = field(default_factory=GroundingConfig)  # task labels -> ROIs
    codec: CodecConfig = field(default_factory=CodecConfig)  # the ONNX encoder
    temporal: TemporalConfig = field(default_factory=TemporalConfig)  # video coding: keyframes + changed ROI cells
    sender: SenderConfig = field(default_factory=SenderConfig)  # send queue and backlog bounds
    server: ServerConfig = field(default_factory=ServerConfig)  # the cloud connection

    def __post_init__(self) -> None:
        if not self.camera_id.strip():
            raise ValueError("camera_id is empty: the cloud keys resume state by it")


def load_edge_config(path: str | os.PathLike | None = None, *, env: dict[str, str] | None = None) -> EdgeConfig:
    """``load_config(EdgeConfig, path, env_prefix="LATENTCAST_EDGE")``."""
    return load_config(EdgeConfig, path, env_prefix=ENV_PREFIX, env=env)
