"""The records a frame travels the cloud's chain in, and the per-frame error codes (data only, no work).

::

    FrameJob ─► (decode) DecodedFrame ─► (compose) its frame ─► (analytics) AnalysedFrame
         └──── any stage, or the worker pool's drop policy ────► FrameFailure(code)

Per-frame problems never stop a worker; they become a :class:`FrameFailure` with a code:

====================  ======================================================================
malformed_packet      the bytes are not a valid packet of the session's codec: LCF (BitstreamError; the
                      server parses LCF packets before submitting and ends such a stream with
                      INVALID_ARGUMENT, so for LCF this code only appears for raw-bytes jobs) or JPEG
                      (no JPEG frame header: a FrameError, the stream goes on)
checksum_mismatch     the packet's CRC32 does not match its bytes (corrupt in transit), or the
                      decoded symbols do not match the header's symbol CRC (decoder divergence):
                      the frame is not rendered
wrong_codec           the packet names another codec id or weights hash than the loaded codec
frame_size_mismatch   the packet's frame size is not the session's (a JPEG declaring more than
                      ``sessions.max_frame_pixels`` is refused so, before it is decoded)
label_set_mismatch    the packet's label-set hash is not the session's label list's (an all-zero
                      hash is accepted only on a packet without ROIs), or an ROI label id is
                      outside the session's label list
invalid_edge_boxes    the frame's edge boxes are not finite, outside the frame, too many, or name a
                      label outside the session's list (checked by the server; never decoded)
decode_failed         any other decoder refusal (CodecError: rate point, missing section, ...;
                      a JPEG that OpenCV cannot decode)
missing_reference     temporal streams: the frame is predicted from a frame or keyframe the cloud
                      does not hold (lost or dropped on the way); it is not rendered and the
                      server asks the edge for a keyframe (RefreshRequest)
compose_failed        the composer (e.g. ControlNet diffusion) raised on the frame's batch
analytics_failed      the detector raised
cloud_overloaded      dropped by the queue's drop policy, never decoded
frame_expired         waited in the queue longer than ``pipeline.max_frame_age_s``, never decoded
stream_ended          still queued when its stream ended (client gone, refused or superseded),
                      never decoded (:meth:`~latentcast.cloud.pipeline.Pipeline.cancel`)
server_shutdown       still queued when the pipeline stopped
internal_error        anything else (logged with its traceback, rate-limited)
====================  ======================================================================
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from latentcast.detector import Detection
from latentcast.proto.bitstream import Packet

from .sessions import CameraState, SessionSpec

__all__ = ["FrameJob", "DecodedFrame", "AnalysedFrame", "FrameFailure", "FrameOutcome", "ERROR_CODES",
           "DROP_CODES", "CLIENT_FAULT_CODES"]

ERROR_CODES = ("malformed_packet", "checksum_mismatch", "wrong_codec", "frame_size_mismatch", "label_set_mismatch",
               "invalid_edge_boxes", "decode_failed", "missing_reference", "compose_failed", "analytics_failed",
               "cloud_overloaded", "frame_expired", "stream_ended", "server_shutdown", "internal_error")
DROP_CODES = ("cloud_overloaded", "frame_expired", "stream_ended", "server_shutdown")  # never decoded: counted as drops
# the sender's fault: frames a correct edge never sends (a stream that keeps sending them is read more slowly)
CLIENT_FAULT_CODES = ("malformed_packet", "checksum_mismatch", "wrong_codec", "frame_size_mismatch",
                      "label_set_mismatch", "invalid_edge_boxes", "decode_failed")


@dataclass
class FrameJob:
    """One received frame on its way through the pipeline."""

    stream_id: str  # the stream (session id) the frame came on
    spec: SessionSpec  # that stream's validated SessionHeader
    seq: int
    capture_ts_us: int  # edge clock, microseconds since the epoch (0 = unknown)
    packet: Packet | bytes | object  # parsed packet (the server parses first: an LCF Packet, a JpegPacket) or raw bytes
    packet_bytes: int  # size of the packet on the wire
    edge_boxes: tuple[Detection, ...] = ()  # the edge's grounding boxes (class_id = label id)
    deliver: Callable[[FrameOutcome], None] | None = None  # thread-safe hand-back to the stream
    enqueued: float = field(default_factory=time.monotonic)
    # temporal streams: the stream's reader decoded the packet in order into its state; this renders
    # the frame from a copy of that state (``prepared(decode_frame) -> Reconstruction``)
    prepared: Callable[[bool], object] | None = None
    prepare_ms: float = 0.0  # time the reader spent decoding it into the state (part of decode_ms)
    codec_id: int | None = None  # the session's codec id (picks the decoder); None = the loaded latentcast codec
    mode: str = ""  # how the frame was coded, for subscribers and logs (decode.describe_packet)
    camera: CameraState | None = None  # the camera's state: its counters (frames analysed) are kept there


@dataclass
class DecodedFrame:
    """A frame between decoding and analytics (its ``frame`` is None until composed)."""

    job: FrameJob
    rec: object  # models.codec.Reconstruction (None for a codec without a latent, e.g. JPEG)
    frame: np.ndarray | None
    width: int
    height: int
    labels: list[str]  # the task labels of the packet's ROIs (the composer's caption)
    queue_ms: float
    decode_ms: float
    request: object = None  # the ComposeRequest, once composed
    compose_ms: float = 0.0  # the composer's share of the batch it was composed in


@dataclass
class AnalysedFrame:
    """A decoded and analysed frame."""

    job: FrameJob
    frame: np.ndarray  # (H, W, 3) uint8 RGB reconstruction
    detections: list[Detection]
    queue_ms: float
    decode_ms: float
    analytics_ms: float
    compose_ms: float
    capture_to_result_ms: float | None  # None when the capture time is unknown (0)
    bpp: float  # packet bits per frame pixel
    compose_request: object = None  # with a composer: the ComposeRequest that made ``frame`` (recomposable)

    @property
    def seq(self) -> int:
        return self.job.seq


@dataclass
class FrameFailure:
    """A frame that produced no result, and why."""

    job: FrameJob
    code: str  # one of ERROR_CODES
    message: str

    @property
    def seq(self) -> int:
        return self.job.seq


FrameOutcome = AnalysedFrame | FrameFailure
