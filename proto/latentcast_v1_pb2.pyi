from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    IMAGE_FORMAT_JPEG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_PNG: _ClassVar[ImageFormat]
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
IMAGE_FORMAT_JPEG: ImageFormat
IMAGE_FORMAT_PNG: ImageFormat

class SessionHeader(_message.Message):
    __slots__ = ("camera_id", "task", "labels", "codec_id", "weights_hash", "width", "height", "fps", "edge_version", "instance_id", "max_in_flight")
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CODEC_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_HASH_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    EDGE_VERSION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    camera_id: str
    task: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    codec_id: int
    weights_hash: bytes
    width: int
    height: int
    fps: float
    edge_version: str
    instance_id: str
    max_in_flight: int
    def __init__(self, camera_id: _Optional[str] = ..., task: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., codec_id: _Optional[int] = ..., weights_hash: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., fps: _Optional[float] = ..., edge_version: _Optional[str] = ..., instance_id: _Optional[str] = ..., max_in_flight: _Optional[int] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x0", "y0", "x1", "y1", "label", "label_id", "score")
    X0_FIELD_NUMBER: _ClassVar[int]
    Y0_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LABEL_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    x0: float
    y0: float
    x1: float
    y1: float
    label: str
    label_id: int
    score: float
    def __init__(self, x0: _Optional[float] = ..., y0: _Optional[float] = ..., x1: _Optional[float] = ..., y1: _Optional[float] = ..., label: _Optional[str] = ..., label_id: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...

class FramePacket(_message.Message):
    __slots__ = ("seq", "capture_ts_us", "packet", "edge_boxes")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TS_US_FIELD_NUMBER: _ClassVar[int]
    PACKET_FIELD_NUMBER: _ClassVar[int]
    EDGE_BOXES_FIELD_NUMBER: _ClassVar[int]
    seq: int
    capture_ts_us: int
    packet: bytes
    edge_boxes: _containers.RepeatedCompositeFieldContainer[Box]
    def __init__(self, seq: _Optional[int] = ..., capture_ts_us: _Optional[int] = ..., packet: _Optional[bytes] = ..., edge_boxes: _Optional[_Iterable[_Union[Box, _Mapping]]] = ...) -> None: ...

class EdgeMessage(_message.Message):
    __slots__ = ("header", "frame")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    header: SessionHeader
    frame: FramePacket
    def __init__(self, header: _Optional[_Union[SessionHeader, _Mapping]] = ..., frame: _Optional[_Union[FramePacket, _Mapping]] = ...) -> None: ...

class SessionAccepted(_message.Message):
    __slots__ = ("session_id", "next_seq", "resumed")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NEXT_SEQ_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    next_seq: int
    resumed: bool
    def __init__(self, session_id: _Optional[str] = ..., next_seq: _Optional[int] = ..., resumed: _Optional[bool] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("acked_seq", "frames_received")
    ACKED_SEQ_FIELD_NUMBER: _ClassVar[int]
    FRAMES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    acked_seq: int
    frames_received: int
    def __init__(self, acked_seq: _Optional[int] = ..., frames_received: _Optional[int] = ...) -> None: ...

class FrameAnalytics(_message.Message):
    __slots__ = ("seq", "capture_ts_us", "boxes", "decode_ms", "analytics_ms", "packet_bytes", "bpp", "queue_ms", "compose_ms")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TS_US_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    ANALYTICS_MS_FIELD_NUMBER: _ClassVar[int]
    PACKET_BYTES_FIELD_NUMBER: _ClassVar[int]
    BPP_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPOSE_MS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    capture_ts_us: int
    boxes: _containers.RepeatedCompositeFieldContainer[Box]
    decode_ms: float
    analytics_ms: float
    packet_bytes: int
    bpp: float
    queue_ms: float
    compose_ms: float
    def __init__(self, seq: _Optional[int] = ..., capture_ts_us: _Optional[int] = ..., boxes: _Optional[_Iterable[_Union[Box, _Mapping]]] = ..., decode_ms: _Optional[float] = ..., analytics_ms: _Optional[float] = ..., packet_bytes: _Optional[int] = ..., bpp: _Optional[float] = ..., queue_ms: _Optional[float] = ..., compose_ms: _Optional[float] = ...) -> None: ...

class FrameError(_message.Message):
    __slots__ = ("seq", "code", "message")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    code: str
    message: str
    def __init__(self, seq: _Optional[int] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class RefreshRequest(_message.Message):
    __slots__ = ("seq", "reason")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    seq: int
    reason: str
    def __init__(self, seq: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class CloudMessage(_message.Message):
    __slots__ = ("accepted", "ack", "result", "error", "refresh")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REFRESH_FIELD_NUMBER: _ClassVar[int]
    accepted: SessionAccepted
    ack: Ack
    result: FrameAnalytics
    error: FrameError
    refresh: RefreshRequest
    def __init__(self, accepted: _Optional[_Union[SessionAccepted, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., result: _Optional[_Union[FrameAnalytics, _Mapping]] = ..., error: _Optional[_Union[FrameError, _Mapping]] = ..., refresh: _Optional[_Union[RefreshRequest, _Mapping]] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("camera_id", "task", "format", "jpeg_quality", "compose_steps")
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    JPEG_QUALITY_FIELD_NUMBER: _ClassVar[int]
    COMPOSE_STEPS_FIELD_NUMBER: _ClassVar[int]
    camera_id: str
    task: str
    format: ImageFormat
    jpeg_quality: int
    compose_steps: int
    def __init__(self, camera_id: _Optional[str] = ..., task: _Optional[str] = ..., format: _Optional[_Union[ImageFormat, str]] = ..., jpeg_quality: _Optional[int] = ..., compose_steps: _Optional[int] = ...) -> None: ...

class FrameResult(_message.Message):
    __slots__ = ("camera_id", "task", "seq", "capture_ts_us", "width", "height", "format", "image", "boxes", "edge_boxes", "packet_bytes", "bpp", "queue_ms", "decode_ms", "compose_ms", "analytics_ms", "latency_ms", "mode", "camera")
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TS_US_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    EDGE_BOXES_FIELD_NUMBER: _ClassVar[int]
    PACKET_BYTES_FIELD_NUMBER: _ClassVar[int]
    BPP_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPOSE_MS_FIELD_NUMBER: _ClassVar[int]
    ANALYTICS_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CAMERA_FIELD_NUMBER: _ClassVar[int]
    camera_id: str
    task: str
    seq: int
    capture_ts_us: int
    width: int
    height: int
    format: ImageFormat
    image: bytes
    boxes: _containers.RepeatedCompositeFieldContainer[Box]
    edge_boxes: _containers.RepeatedCompositeFieldContainer[Box]
    packet_bytes: int
    bpp: float
    queue_ms: float
    decode_ms: float
    compose_ms: float
    analytics_ms: float
    latency_ms: float
    mode: str
    camera: CameraCounters
    def __init__(self, camera_id: _Optional[str] = ..., task: _Optional[str] = ..., seq: _Optional[int] = ..., capture_ts_us: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., format: _Optional[_Union[ImageFormat, str]] = ..., image: _Optional[bytes] = ..., boxes: _Optional[_Iterable[_Union[Box, _Mapping]]] = ..., edge_boxes: _Optional[_Iterable[_Union[Box, _Mapping]]] = ..., packet_bytes: _Optional[int] = ..., bpp: _Optional[float] = ..., queue_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., compose_ms: _Optional[float] = ..., analytics_ms: _Optional[float] = ..., latency_ms: _Optional[float] = ..., mode: _Optional[str] = ..., camera: _Optional[_Union[CameraCounters, _Mapping]] = ...) -> None: ...

class CameraCounters(_message.Message):
    __slots__ = ("frames_received", "frames_analysed", "frames_failed", "bytes_received")
    FRAMES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_ANALYSED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FAILED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    frames_received: int
    frames_analysed: int
    frames_failed: int
    bytes_received: int
    def __init__(self, frames_received: _Optional[int] = ..., frames_analysed: _Optional[int] = ..., frames_failed: _Optional[int] = ..., bytes_received: _Optional[int] = ...) -> None: ...
