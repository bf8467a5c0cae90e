"""The decode stage: the session's codec id picks a decoder, which turns a frame's bytes into pixels or a latent.

The :class:`DecoderRegistry` holds one :class:`Decoder` per accepted codec, keyed by the wire codec id
(``proto/ids.py`` ``CODEC_IDS``); ``pipeline.codecs`` names the accepted ones:

==========  ================================================================================================
latentcast  the loaded :class:`~latentcast.models.codec.LatentCodec` (its own codec id): LCF packets, per-frame
            (decoded in a worker) or temporal (decoded in arrival order into the camera's state by the stream's
            reader, rendered in a worker). On by default.
jpeg        the JPEG baseline of ``latentcast bench stream`` (``CODEC_IDS["jpeg"]``): the packet is the whole
            frame as JPEG bytes. Off by default; a production cloud does not accept it.
==========  ================================================================================================

A decoder's steps, and where each runs::

    stream opens   session(header)       event loop  SessionHeader -> SessionSpec (SessionRejected if not)
    each frame     admit(bytes, spec)    event loop  parse and bound the bytes, O(len), nothing decoded
                                                     -> the packet, or PacketRefused (a FrameError, or the
                                                     stream ends with INVALID_ARGUMENT)
                   prepare(job, state)   event loop  temporal LCF only: into the camera's state, in order
                                         + a thread
                   decode(job)           worker      -> DecodedFrame (frame, or only the latent when a
                                                     composer makes the frame) | FrameFailure

Bounds before decoding: an LCF packet is parsed (``server.max_packet_bytes``) and its frame size must be the
session's, itself at most ``sessions.max_frame_pixels``; a JPEG's frame header is read without decoding and its
declared size must be at most ``sessions.max_frame_pixels`` and the session's.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from latentcast.models.codec import MAX_DECODE_PIXELS, CodecError, LatentCodec
from latentcast.models.temporal import is_temporal
from latentcast.proto.bitstream import (
    CRC_BYTES,
    MAGIC,
    MAX_PACKET_BYTES,
    MIN_COMPACT_PACKET_BYTES,
    VERSIONS,
    BitstreamError,
    Packet,
    SectionKind,
    StreamContext,
)
from latentcast.proto.ids import CODEC_IDS, codec_name
from latentcast.proto.temporal import TemporalError, TemporalInfo

from .config import CODEC_NAMES, CloudConfig, SessionsConfig
from .frames import DecodedFrame, FrameFailure, FrameJob
from .sessions import CameraState, SessionRejected, SessionSpec, validate_header

log = logging.getLogger(__name__)

__all__ = ["Decoder", "LatentcastDecoder", "JpegDecoder", "JpegPacket", "DecoderRegistry", "PacketRefused",
           "jpeg_frame_size", "classify_parse_error", "codec_error_code", "describe_packet", "JPEG_CODEC_ID"]

JPEG_CODEC_ID = CODEC_IDS["jpeg"]
_ZERO_HASH = b"\0\0\0\0"


class PacketRefused(Exception):
    """A frame refused before decoding: ``code`` (cloud/frames.py), ``message``; ``ends_stream``: the stream ends
    with INVALID_ARGUMENT instead of a FrameError; ``refresh``: ask the edge for a keyframe (RefreshRequest)."""

    def __init__(self, code: str, message: str, *, ends_stream: bool = False, refresh: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ends_stream = ends_stream
        self.refresh = refresh


def codec_error_code(exc: CodecError) -> str:
    """``checksum_mismatch`` for a decoder divergence (symbol CRC), else ``decode_failed``."""
    return "checksum_mismatch" if "checksum" in str(exc) else "decode_failed"


def classify_parse_error(exc: BitstreamError, data: bytes | memoryview) -> str:
    """``checksum_mismatch`` when the packet is whole enough to carry a CRC32 that does not match
    its bytes, else ``malformed_packet``."""
    mv = memoryview(data)
    n = mv.nbytes
    if n >= MIN_COMPACT_PACKET_BYTES and bytes(mv[:4]) == MAGIC and mv[4] in VERSIONS:
        stored = int.from_bytes(mv[n - CRC_BYTES:], "little")
        if stored != zlib.crc32(mv[: n - CRC_BYTES]):
            return "checksum_mismatch"
    return "malformed_packet"


def _codec_desc(codec_id: int) -> str:
    try:
        return f"{codec_id} ({codec_name(codec_id)})"
    except ValueError:
        return f"{codec_id} (unknown)"


class Decoder:
    """One codec's decoder (see the module docstring for where each step runs)."""

    name: str = ""  # its name in pipeline.codecs
    codec_id: int = 0  # the SessionHeader / packet codec id it serves

    def session(self, header, config: SessionsConfig) -> SessionSpec:
        """The validated SessionHeader of a stream of this codec (raises SessionRejected)."""
        raise NotImplementedError

    def admit(self, data: bytes, spec: SessionSpec) -> object:
        """The frame's bytes parsed and bounded, without decoding (on the event loop; raises PacketRefused)."""
        raise NotImplementedError

    def frame_size(self, packet: object) -> tuple[int, int]:
        """(width, height) an admitted packet declares."""
        raise NotImplementedError

    def needs_prepare(self, packet: object) -> bool:
        """True when the frame must go through :meth:`prepare` on the stream's reader, in arrival order."""
        return False

    async def prepare(self, job: FrameJob, packet: object, state: CameraState) -> None:
        """Decode the frame into the camera's state in arrival order; sets ``job.prepared`` (raises PacketRefused)."""
        raise NotImplementedError

    def decode(self, job: FrameJob, *, latent_only: bool) -> tuple[object, np.ndarray | None, int, int, list[str]] \
            | FrameFailure:
        """In a worker: (reconstruction, frame or None, width, height, ROI labels) or a FrameFailure. With
        ``latent_only`` a composer makes the frame: the decoder may leave it None."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------ latentcast
class LatentcastDecoder(Decoder):
    """LCF packets of the loaded codec, per-frame and temporal."""

    name = "latentcast"

    def __init__(self, codec: LatentCodec, *, max_packet_bytes: int = MAX_PACKET_BYTES, temporal_tables: str = "",
                 refresh_retry_s: float = 1.0, render: dict | None = None, remote=None) -> None:
        """``temporal_tables``: the P-frame tables of temporal streams ("" = the codec's shipped ones), loaded on
        first use; ``refresh_retry_s``: a missing reference asks again for a keyframe after this long;
        ``render``: the TemporalDecoder's render settings (``tiled``, ``grow``, ``halo``; None: its defaults);
        ``remote``: the ray engine's synthesis (``serve_stages.RemoteSynthesis``), which then makes the pixels
        (None: this process does)."""
        self.render = dict(render or {})
        self.remote = remote
        if remote is not None:
            self.render["remote_render"] = remote.render
        self.codec = codec
        self.codec_id = int(codec.codec_id)
        self.max_packet_bytes = max_packet_bytes
        self.temporal_tables_path = temporal_tables
        self.refresh_retry_s = refresh_retry_s
        self._tables = None

    def session(self, header, config: SessionsConfig) -> SessionSpec:
        return validate_header(header, codec_id=self.codec.codec_id, weights_hash=self.codec.weights_hash,
                               config=config)

    def stream_context(self, spec: SessionSpec) -> StreamContext:
        """What a compact P frame of this session leaves out: the cloud's codec and the session's frame size
        and label set (a packet that meant another stream fails its symbol checksum)."""
        c = self.codec
        return StreamContext(codec_id=c.codec_id, weights_hash=c.weights_hash, latent_space_id=c.latent_space_id,
                             width=spec.width, height=spec.height, label_set_hash=spec.label_set_hash)

    def admit(self, data: bytes, spec: SessionSpec) -> Packet:
        try:
            return Packet.from_bytes(data, max_packet_bytes=self.max_packet_bytes, stream=self.stream_context(spec))
        except BitstreamError as exc:
            code = classify_parse_error(exc, data)
            if code == "checksum_mismatch":
                raise PacketRefused(code, str(exc)) from None
            raise PacketRefused("malformed_packet", f"malformed packet: {exc}", ends_stream=True) from None

    def frame_size(self, packet: Packet) -> tuple[int, int]:
        return packet.header.width, packet.header.height

    def check(self, job: FrameJob, packet: Packet) -> FrameFailure | None:
        """The packet against the session and the loaded codec (codec, size, label set); None if it fits."""
        spec = job.spec
        hd = packet.header
        codec = self.codec
        if hd.codec_id != codec.codec_id or hd.weights_hash != codec.weights_hash:
            return FrameFailure(job=job, code="wrong_codec", message=(
                f"packet codec_id {hd.codec_id} weights {hd.weights_hash.hex()} is not the cloud's codec_id "
                f"{codec.codec_id} weights {codec.weights_hash.hex()}"))
        if (hd.width, hd.height) != (spec.width, spec.height):
            return FrameFailure(job=job, code="frame_size_mismatch", message=(
                f"packet frame size {hd.width}x{hd.height} is not the session's {spec.width}x{spec.height}"))
        if hd.label_set_hash != spec.label_set_hash and not (hd.label_set_hash == _ZERO_HASH and not hd.rois):
            return FrameFailure(job=job, code="label_set_mismatch", message=(
                f"packet label_set_hash {hd.label_set_hash.hex()} is not the session's {spec.label_set_hash.hex()} "
                f"(labels {list(spec.labels)[:8]}{'...' if len(spec.labels) > 8 else ''})"))
        bad_ids = sorted({r.label_id for r in hd.rois if r.label_id >= len(spec.labels)})
        if bad_ids:
            return FrameFailure(job=job, code="label_set_mismatch", message=(
                f"ROI label id(s) {bad_ids[:8]} outside the session's {len(spec.labels)} labels"))
        return None

    # ---------------------------------------------------------------- temporal
    def temporal_tables(self):
        """The P-frame tables of temporal streams, loaded on first use."""
        if self._tables is None:
            from latentcast.models.temporal import default_tables_path
            from latentcast.proto.temporal import TemporalTables

            path = self.temporal_tables_path or default_tables_path(self.codec)
            self._tables = TemporalTables.load(path, weights_hash=self.codec.weights_hash)
        return self._tables

    def needs_prepare(self, packet: object) -> bool:
        return isinstance(packet, Packet) and is_temporal(packet)

    async def prepare(self, job: FrameJob, packet: Packet, state: CameraState) -> None:
        """Decode a temporal packet into the camera's state, in arrival order; ``job.prepared`` renders it.
        Raises PacketRefused (``refresh`` when a reference is missing and no keyframe was asked for within
        ``refresh_retry_s``)."""
        from latentcast.models.temporal import MissingReference, TemporalDecoder

        failure = self.check(job, packet)
        if failure is not None:
            raise PacketRefused(failure.code, failure.message)
        try:
            if state.temporal is None:
                state.temporal = TemporalDecoder(codec=self.codec, tables=self.temporal_tables(), **self.render)
            t0 = time.monotonic()
            render = await asyncio.to_thread(state.temporal.prepare, packet)
            job.prepare_ms = (time.monotonic() - t0) * 1000.0
            job.prepared = render
        except MissingReference as exc:
            now = time.monotonic()
            refresh = now - state.refresh_asked >= self.refresh_retry_s
            if refresh:
                state.refresh_asked = now
            raise PacketRefused("missing_reference", str(exc), refresh=refresh) from None
        except CodecError as exc:
            raise PacketRefused(codec_error_code(exc), str(exc)) from None
        except (ValueError, IndexError, OverflowError, OSError) as exc:  # hostile bytes, missing tables
            raise PacketRefused("decode_failed", f"{type(exc).__name__}: {exc}") from None

    # ---------------------------------------------------------------- worker
    def decode(self, job: FrameJob, *, latent_only: bool):
        packet = job.packet
        if not isinstance(packet, Packet):
            try:
                packet = Packet.from_bytes(packet, max_packet_bytes=self.max_packet_bytes,
                                           stream=self.stream_context(job.spec))
            except BitstreamError as exc:
                return FrameFailure(job=job, code=classify_parse_error(exc, job.packet), message=str(exc))
        failure = self.check(job, packet)
        if failure is not None:
            return failure
        hd = packet.header
        codec = self.codec
        try:
            # a composer makes the frame from the latent: skip the latent decoder then
            if job.prepared is not None:
                # temporal: every cell of the stream's latent was transmitted, nothing is left to compose
                rec = job.prepared(True)
            elif self.remote is not None:  # the ray engine: the Synthesis deployment makes the pixels (or ẑ_c)
                rec = self._remote_decompress(job, packet, latent_only)
                if isinstance(rec, FrameFailure):
                    return rec
            elif not latent_only:
                rec = codec.decompress(packet)
            else:
                rec = codec.decompress(packet, decode_frame=False)
        except CodecError as exc:
            return FrameFailure(job=job, code=codec_error_code(exc), message=str(exc))
        except (ValueError, IndexError, OverflowError) as exc:  # the range decoder on hostile section bytes
            return FrameFailure(job=job, code="decode_failed", message=f"{type(exc).__name__}: {exc}")
        return rec, rec.frame, hd.width, hd.height, [job.spec.labels[r.label_id] for r in hd.rois]


    def _remote_decompress(self, job: FrameJob, packet: Packet, latent_only: bool):
        from latentcast.models.codec import Reconstruction

        from .serve_stages import StageError

        data = job.packet if isinstance(job.packet, (bytes, bytearray, memoryview)) else packet.to_bytes()
        try:
            out = self.remote.decompress(bytes(data), latent_only=latent_only)
        except StageError as exc:
            return FrameFailure(job=job, code=exc.code, message=str(exc))
        if latent_only:
            latent, mask = out
            return Reconstruction(latent=latent, frame=None, packet=packet, mask=mask)
        return Reconstruction(latent=None, frame=out, packet=packet, mask=None)


# ------------------------------------------------------------------------------------------ JPEG baseline
@dataclass(frozen=True)
class JpegPacket:
    """An admitted JPEG frame: its bytes and the size its frame header declares."""

    data: bytes
    width: int
    height: int


def describe_packet(packet: object) -> str:
    """How an admitted frame was coded, in a few words for subscribers and logs: ``jpeg``; ``temporal key q2``
    (``temporal key q3 bg q0``: its cells outside the ROIs at rate point 0) or ``temporal p q0 bg q0`` (ROI
    step, background-update step); ``frame full q2``, ``frame roi q1`` or ``frame roi q1 bg q0`` (an
    independent frame: whole, ROIs only, ROIs over a coded background); ``raw`` for bytes not parsed yet."""
    if isinstance(packet, JpegPacket):
        return "jpeg"
    if not isinstance(packet, Packet):
        return "raw"
    hd = packet.header
    t = packet.sections.get(SectionKind.T)
    if t is not None:
        try:
            info = TemporalInfo.from_bytes(t)
        except TemporalError:  # refused when it is decoded; the description does not judge
            return f"temporal ? q{hd.rate_point}"
        if info.is_key:
            return f"temporal key q{hd.rate_point}" + ("" if hd.bg_rate_point is None else f" bg q{hd.bg_rate_point}")
        return f"temporal p q{hd.rate_point} bg q{info.bg_rate_point}"
    if not hd.roi_only:
        return f"frame full q{hd.rate_point}"
    return f"frame roi q{hd.rate_point}" + ("" if hd.bg_rate_point is None else f" bg q{hd.bg_rate_point}")


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_MAX_STEPS = 1024  # markers and fill bytes read before the frame header (real files: about ten segments)


def jpeg_frame_size(data: bytes | memoryview) -> tuple[int, int]:
    """(width, height) from a JPEG's frame header (SOFn), without decoding; ValueError naming what is wrong.

    Walks the segments from SOI by their lengths (O(segments), at most 1024 steps), so it costs the same
    for a hostile file as for a real one."""
    mv = memoryview(data)
    n = mv.nbytes
    if n < 4 or mv[0] != 0xFF or mv[1] != 0xD8:
        raise ValueError(f"{n} bytes that do not start with the JPEG SOI marker ffd8 (start: {bytes(mv[:4]).hex()})")
    i = 2
    for _ in range(_JPEG_MAX_STEPS):
        if i >= n:
            raise ValueError(f"truncated after {n} bytes, before its frame header (SOFn)")
        if mv[i] != 0xFF:
            raise ValueError(f"byte {i}: expected a marker (ff), got {mv[i]:02x}")
        i += 1
        if i < n and mv[i] == 0xFF:  # a fill byte
            continue
        if i >= n:
            raise ValueError(f"truncated after {n} bytes, before its frame header (SOFn)")
        marker = mv[i]
        i += 1
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers: no length
            continue
        if marker in (0x00, 0xD8, 0xD9, 0xDA):
            what = {0x00: "a stuffed zero", 0xD8: "a second SOI", 0xD9: "EOI, the end of the image",
                    0xDA: "SOS, the scan"}[marker]
            raise ValueError(f"byte {i - 2}: marker ff{marker:02x} ({what}) before the frame header (SOFn)")
        if i + 2 > n:
            raise ValueError(f"truncated in the length of segment ff{marker:02x} at byte {i - 2}")
        length = int.from_bytes(mv[i:i + 2], "big")
        if length < 2:
            raise ValueError(f"segment ff{marker:02x} at byte {i - 2} has length {length} (< 2)")
        if marker in _SOF_MARKERS:
            if length < 8 or i + 7 > n:
                raise ValueError(f"frame header ff{marker:02x} at byte {i - 2} is truncated ({length} bytes declared, "
                                 f"{n - i} left)")
            height = int.from_bytes(mv[i + 3:i + 5], "big")
            width = int.from_bytes(mv[i + 5:i + 7], "big")
            if width == 0 or height == 0:
                raise ValueError(f"frame header declares {width}x{height} (a size defined later by DNL is not "
                                 "supported)")
            return width, height
        i += length
    raise ValueError(f"no frame header (SOFn) within the first {_JPEG_MAX_STEPS} markers")


class JpegDecoder(Decoder):
    """The JPEG baseline: each packet is a whole frame as JPEG, decoded with OpenCV (off by default)."""

    name = "jpeg"
    codec_id = JPEG_CODEC_ID

    def __init__(self, *, max_frame_pixels: int = SessionsConfig().max_frame_pixels) -> None:
        self.max_frame_pixels = min(int(max_frame_pixels), MAX_DECODE_PIXELS)

    def session(self, header, config: SessionsConfig) -> SessionSpec:
        # a JPEG has no weights: whatever weights hash the edge sends is accepted
        return validate_header(header, codec_id=self.codec_id, weights_hash=bytes(header.weights_hash), config=config)

    def admit(self, data: bytes, spec: SessionSpec) -> JpegPacket:
        try:
            w, h = jpeg_frame_size(data)
        except ValueError as exc:
            raise PacketRefused("malformed_packet", f"not a JPEG frame: {exc}") from None
        if w * h > self.max_frame_pixels:
            raise PacketRefused("frame_size_mismatch", (
                f"JPEG frame header declares {w}x{h} ({w * h} pixels), above the cloud's limit of "
                f"{self.max_frame_pixels} pixels (sessions.max_frame_pixels); not decoded"))
        if (w, h) != (spec.width, spec.height):
            raise PacketRefused("frame_size_mismatch",
                                f"JPEG frame size {w}x{h} is not the session's {spec.width}x{spec.height}")
        return JpegPacket(data=bytes(data), width=w, height=h)

    def frame_size(self, packet: JpegPacket) -> tuple[int, int]:
        return packet.width, packet.height

    def decode(self, job: FrameJob, *, latent_only: bool):
        import cv2

        packet = job.packet
        if not isinstance(packet, JpegPacket):
            try:
                packet = self.admit(packet, job.spec)
            except PacketRefused as exc:
                return FrameFailure(job=job, code=exc.code, message=exc.message)
        try:
            bgr = cv2.imdecode(np.frombuffer(packet.data, np.uint8), cv2.IMREAD_COLOR)
        except cv2.error as exc:
            return FrameFailure(job=job, code="decode_failed", message=f"OpenCV cannot decode the JPEG: {exc}")
        if bgr is None or bgr.shape[:2] != (packet.height, packet.width):
            got = "nothing" if bgr is None else f"{bgr.shape[1]}x{bgr.shape[0]}"
            return FrameFailure(job=job, code="decode_failed", message=(
                f"OpenCV decoded {got} from the {len(packet.data)}-byte JPEG declaring {packet.width}x{packet.height}"))
        return None, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), packet.width, packet.height, []


# ------------------------------------------------------------------------------------------ registry
class DecoderRegistry:
    """The accepted codecs' decoders by codec id; picks a stream's decoder from its SessionHeader."""

    def __init__(self, decoders: Iterable[Decoder], *, default: Decoder | None = None) -> None:
        """``default``: the decoder of jobs without a codec id (the loaded latentcast codec's)."""
        decoders = list(decoders)
        self.names: tuple[str, ...] = tuple(d.name for d in decoders)  # as in pipeline.codecs
        self._by_id: dict[int, Decoder] = {}
        for d in decoders:
            if d.codec_id in self._by_id:
                raise ValueError(f"two decoders for codec_id {d.codec_id}: {self._by_id[d.codec_id].name} and {d.name}")
            self._by_id[d.codec_id] = d
        self.default = default

    @classmethod
    def for_codec(cls, codec: LatentCodec, *, names: Sequence[str] = ("latentcast",),
                  max_packet_bytes: int = MAX_PACKET_BYTES, max_frame_pixels: int = SessionsConfig().max_frame_pixels,
                  temporal_tables: str = "", refresh_retry_s: float = 1.0,
                  render: dict | None = None, remote=None) -> DecoderRegistry:
        """The decoders of ``names`` (from ``CODEC_NAMES``) around the loaded ``codec`` (``remote``: the ray
        engine's synthesis, see :class:`LatentcastDecoder`)."""
        unknown = [n for n in names if n not in CODEC_NAMES]
        if unknown:
            raise ValueError(f"unknown codec name(s) {unknown} (valid: {', '.join(CODEC_NAMES)})")
        lc = LatentcastDecoder(codec, max_packet_bytes=max_packet_bytes, temporal_tables=temporal_tables,
                               refresh_retry_s=refresh_retry_s, render=render, remote=remote)
        made = {"latentcast": lambda: lc, "jpeg": lambda: JpegDecoder(max_frame_pixels=max_frame_pixels)}
        return cls([made[n]() for n in dict.fromkeys(names)], default=lc if "latentcast" in names else None)

    @classmethod
    def from_config(cls, config: CloudConfig, codec: LatentCodec, *, remote=None) -> DecoderRegistry:
        """The decoders of ``pipeline.codecs``, bounded by ``server.max_packet_bytes`` and
        ``sessions.max_frame_pixels``, temporal settings from ``codec.*``."""
        return cls.for_codec(codec, names=config.pipeline.codecs, max_packet_bytes=config.server.max_packet_bytes,
                             max_frame_pixels=config.sessions.max_frame_pixels,
                             temporal_tables=config.codec.temporal_tables,
                             refresh_retry_s=config.codec.refresh_retry_s,
                             render={"tiled": config.codec.temporal_render == "changed",
                                     "grow": config.codec.render_grow, "halo": config.codec.render_halo,
                                     "runtime": config.codec.render_runtime,
                                     "threads": config.pipeline.torch_threads},
                             remote=remote)

    def __contains__(self, codec_id: object) -> bool:
        return codec_id in self._by_id

    def get(self, codec_id: int | None) -> Decoder | None:
        """The decoder of ``codec_id`` (None: the default), None when that codec is not accepted."""
        return self.default if codec_id is None else self._by_id.get(codec_id)

    def describe(self) -> str:
        """The accepted codecs, e.g. ``1 (elic-lite) or 100 (jpeg)``."""
        return " or ".join(_codec_desc(i) for i in self._by_id) or "(none)"

    def session(self, header, config: SessionsConfig) -> tuple[SessionSpec, Decoder]:
        """The stream's validated SessionSpec and its decoder. Raises SessionRejected: INVALID_ARGUMENT for a
        malformed header, FAILED_PRECONDITION for a codec this cloud does not accept (the message names the
        accepted ones) or another codec's weights."""
        decoder = self._by_id.get(int(header.codec_id))
        if decoder is not None:
            return decoder.session(header, config), decoder
        # the rest of the header first: a malformed header is INVALID_ARGUMENT whatever its codec
        validate_header(header, codec_id=header.codec_id, weights_hash=bytes(header.weights_hash), config=config)
        raise SessionRejected(grpc.StatusCode.FAILED_PRECONDITION, (
            f"session codec_id {_codec_desc(header.codec_id)} does not match the cloud's codec {self.describe()} "
            f"(pipeline.codecs: {', '.join(self.names) or '(none)'}; known: {', '.join(CODEC_NAMES)})"))

    def decode(self, job: FrameJob, *, latent_only: bool = False) -> DecodedFrame | FrameFailure:
        """Decode ``job`` with its session's decoder (in a worker); times it (queue wait, decode)."""
        t0 = time.monotonic()
        queue_ms = (t0 - job.enqueued) * 1000.0
        decoder = self.get(job.codec_id)
        if decoder is None:
            return FrameFailure(job=job, code="wrong_codec", message=(
                f"codec_id {'(the loaded codec)' if job.codec_id is None else job.codec_id} is not accepted by this "
                f"cloud (accepted: {self.describe()}; pipeline.codecs: {', '.join(self.names) or '(none)'})"))
        out = decoder.decode(job, latent_only=latent_only)
        if isinstance(out, FrameFailure):
            return out
        rec, frame, width, height, labels = out
        return DecodedFrame(job=job, rec=rec, frame=frame, width=width, height=height, labels=labels,
                            queue_ms=queue_ms, decode_ms=(time.monotonic() - t0) * 1000.0 + job.prepare_ms)
