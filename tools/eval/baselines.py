"""Classical baseline codecs for ``latentcast eval``: JPEG, WebP, x264, x265 and "send smaller frames".

Every codec has ``name`` (its curve), ``param_name``, ``params`` (the sweep, ordered from the lowest
rate to the highest), ``describe()`` (its settings, for the results JSON) and
``run(clip, param) -> CodecRun``. :func:`make_baselines` builds them by name.

::

    jpeg, webp    scored frame ─► RGB→BGR ─► cv2.imencode (one file per frame) ─► bytes
                  ─► cv2.imdecode ─► BGR→RGB ─► reconstruction
    x264, x265    EVERY frame, in order ─► pad (edge replication) to even / encoder-minimum size
                  ─► rgb24→yuv420p (swscale) ─► libx264 / libx265 ─► one bitstream (packets)
                  ─► FFmpeg h264 / hevc decoder ─► count == n_frames? ─► for scored frames only:
                  yuv420p→rgb24 ─► crop ─► reconstruction
    downscale     frame ─► cv2.resize 1/scale (INTER_AREA) ─► the x264 path above at CRF ``crf``
                  (videos) or the JPEG path at quality ``jpeg_quality`` (single images)
                  ─► decoded frame ─► cv2.resize back to the original size (INTER_CUBIC, saturated to uint8)

Rate: ``bytes`` are real coded bytes. Image codecs: the sum of the scored frames' files (complete
JFIF / RIFF-WebP files, headers included); ``pixels`` = scored frames x width x height. Video codecs:
the sum of all packets of the whole clip (``n_frames`` frames) plus ``len(extradata)``. The encoders
are opened WITHOUT the global-header flag, so libx264 / libx265 write their parameter sets in-band
(SPS + PPS, and VPS for HEVC, in the first packet and again at every keyframe) and the extradata is
empty; it is still added (and handed to the decoder) should a build ever set it. ``pixels`` =
``n_frames`` x width x height at the clip's ORIGINAL size (also for ``downscale``: bpp is relative to
the original frame).

Encoder settings (the defaults; ``describe()`` reports the values actually used):

- JPEG: OpenCV ``cv2.imencode(".jpg")`` (libjpeg-turbo), ``IMWRITE_JPEG_QUALITY`` = the parameter
  (IJG quality scaling of the standard tables), ``IMWRITE_JPEG_SAMPLING_FACTOR`` 4:2:0, baseline
  (``IMWRITE_JPEG_PROGRESSIVE`` 0), ``IMWRITE_JPEG_OPTIMIZE`` 1 (optimised Huffman tables: lossless,
  decodable by every JPEG decoder, and about 500 bytes smaller per file than the standard tables,
  which matters at the low-rate end; ``optimize=False`` gives OpenCV's default, as in
  ``tools/bench/codec.py``). JFIF YCbCr: BT.601, full range. Quality 1..100.
- WebP: OpenCV ``cv2.imencode(".webp")`` (libwebp, lossy), ``IMWRITE_WEBP_QUALITY`` = the parameter,
  ``IMWRITE_WEBP_LOSSLESS_MODE`` off; libwebp's defaults otherwise (4:2:0). Quality 1..100 (OpenCV
  maps 0 to 1 with a warning, so 0 is not a distinct setting).
- x264 / x265: PyAV ``av.CodecContext.create("libx264" | "libx265", "w")``, AVOptions
  ``preset`` (default ``medium``), ``tune=zerolatency`` (no B-frames, no lookahead; x264: sliced
  threads, no mb-tree; x265: one frame thread, no scenecut, no cu-tree), ``crf`` = the parameter
  (0..51, higher = lower rate), pix_fmt ``yuv420p`` (8 bit), time base ``1/fps``, GOP = the
  encoder's default (keyint 250) unless ``gop`` is given (then ``gop_size`` and ``keyint=gop`` in
  ``x264-params`` / ``x265-params``), ``x265-params log-level=error``, ``threads`` (0 = auto; x264:
  ``thread_count``, x265: ``pools``). The encoders' informational SEI (x264's version + option
  string, ~600 bytes; x265's, ~2.3 KB) is not part of the counted bitstream by default
  (``info_sei=False``: x265 ``info=0``; x264 has no switch, so that one SEI NAL unit is cut from the
  packets before counting and decoding); it carries nothing a decoder needs and would otherwise
  dominate the rate of short clips and single images.
- downscale: ``cv2.resize`` to ``round(w / scale) x round(h / scale)`` (INTER_AREA), x264 as above
  at CRF 23 / JPEG as above at quality 85, ``cv2.resize`` back (INTER_CUBIC).

Colour: ``av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")`` converts with
swscale's default for untagged frames (colorspace and colour range "unspecified"): BT.601
coefficients, limited ("MPEG", 16..235 / 16..240) range (checked: RGB red -> Y 81, Cb 90, Cr 240).
No colour tags are written to the stream; the decoded frames are likewise untagged (x265 marks the
range as limited) and ``to_ndarray(format="rgb24")`` inverts with the same BT.601 limited-range
matrix, so the colour round trip is consistent (x264 at CRF 0, which is lossless, reproduces the
swscale round trip bit for bit). The 4:2:0 chroma subsampling alone caps the PSNR of strongly
coloured, detailed content.

Caveat: with ``tune=zerolatency`` x264 codes one slice per thread, so its rate depends on
``threads`` (about +2 % at 2 threads against 1 on 640x480); pass ``threads=1`` for numbers that do
not depend on the machine. x265's bitstream does not depend on its thread count.

Timing (``time.perf_counter``): ``encode_seconds`` = frame transform + colour conversion +
encoding (+ flushing); ``decode_seconds`` = decoding every frame + colour conversion and inverse
transform of the kept (scored) frames. Reading the clip's frames is not timed.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import numbers
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from latentcast.tools.eval.data import Clip, CodecRun

log = logging.getLogger(__name__)

__all__ = ["BASELINES", "DownscaleCodec", "JpegCodec", "PRESETS", "WebpCodec", "X264Codec", "X265Codec",
           "make_baselines"]

BASELINES = ("jpeg", "webp", "x264", "x265", "downscale")
PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo")
TUNE = "zerolatency"
PIX_FMT = "yuv420p"
CRF_RANGE = (0, 51)
COLOUR = ("BT.601 matrix, limited range (swscale default for untagged rgb24 <-> yuv420p); "
          "no colour tags in the stream")

_X264_INFO_UUID = bytes.fromhex("dc45e9bde6d948b7962cd820d923eeef")  # x264's user-data-unregistered SEI


# ---------------------------------------------------------------------------------------------- checks


def _number(value: Any, what: str, lo: float, hi: float | None, *, integer: bool) -> int | float:
    """``value`` as a Python int (or float), or ValueError quoting it and the valid range."""
    valid = f"{'an integer' if integer else 'a number'} in {lo}..{hi}" if hi is not None else \
        f"{'an integer' if integer else 'a number'} >= {lo}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} {value!r} is not valid: must be {valid}")
    if isinstance(value, numbers.Integral):
        v: int | float = int(value)
    elif integer:
        raise ValueError(f"{what} {value!r} is not valid: must be {valid}")
    else:
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"{what} {value!r} is not valid: must be {valid}")
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{what} {value!r} is out of range: must be {valid}")
    return v


def _sweep(values: Iterable[Any] | None, default: tuple, check: Callable[[Any], int | float], what: str,
           *, descending: bool) -> tuple:
    """The checked sweep sorted into rate order (``descending`` when a larger value is a lower rate)."""
    vals = [check(v) for v in (default if values is None else values)]
    if not vals:
        raise ValueError(f"{what} sweep is empty: give at least one value")
    dup = sorted({v for v in vals if vals.count(v) > 1})
    if dup:
        raise ValueError(f"{what} sweep lists {', '.join(map(str, dup))} more than once: {tuple(vals)!r}")
    return tuple(sorted(vals, reverse=descending))


def _import_av():
    try:
        import av
    except ImportError as exc:
        raise ImportError("the x264 / x265 / downscale baselines need PyAV: pip install av "
                          "(or pip install 'latentcast[eval]')") from exc
    return av


def _check_frame(clip: Clip, index: int, frame: np.ndarray) -> None:
    if frame.shape != (clip.height, clip.width, 3) or frame.dtype != np.uint8:
        raise ValueError(f"{clip.name}: frame {index} is {frame.dtype} {frame.shape}, expected uint8 "
                         f"{(clip.height, clip.width, 3)} (RGB)")


def _clip_fps(clip: Clip) -> Fraction:
    if not (isinstance(clip.fps, numbers.Real) and math.isfinite(clip.fps) and clip.fps > 0):
        raise ValueError(f"{clip.name}: fps {clip.fps!r} is not valid: must be a number > 0")
    return Fraction(clip.fps).limit_denominator(1001)


# ---------------------------------------------------------------------------------------------- frame maps


@dataclass(frozen=True)
class _FrameMap:
    """What happens to a frame around the codec: ``forward`` before coding, ``inverse`` after decoding."""

    scale: float = 1.0  # 1: the identity

    def coded_size(self, width: int, height: int) -> tuple[int, int]:
        if self.scale == 1:
            return width, height
        return max(1, round(width / self.scale)), max(1, round(height / self.scale))

    def forward(self, rgb: np.ndarray) -> np.ndarray:
        if self.scale == 1:
            return rgb
        import cv2

        w, h = self.coded_size(rgb.shape[1], rgb.shape[0])
        return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)

    def inverse(self, rgb: np.ndarray, width: int, height: int) -> np.ndarray:
        if self.scale == 1:
            return np.ascontiguousarray(rgb)
        import cv2

        return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_CUBIC)  # uint8 in: saturates to 0..255


_IDENTITY = _FrameMap()


# ---------------------------------------------------------------------------------------------- image path


@dataclass(frozen=True)
class _ImageFormat:
    kind: str  # "jpeg" | "webp"
    optimize: bool = True  # JPEG only: optimised Huffman tables

    def encode_flags(self, quality: int) -> list[int]:
        import cv2

        if self.kind == "jpeg":
            return [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_OPTIMIZE, int(self.optimize),
                    cv2.IMWRITE_JPEG_PROGRESSIVE, 0, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                    cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420]
        flags = [cv2.IMWRITE_WEBP_QUALITY, quality]
        if hasattr(cv2, "IMWRITE_WEBP_LOSSLESS_MODE"):  # OpenCV >= 4.13; before, quality <= 100 is lossy anyway
            flags += [cv2.IMWRITE_WEBP_LOSSLESS_MODE, cv2.IMWRITE_WEBP_LOSSLESS_OFF]
        return flags

    @property
    def ext(self) -> str:
        return ".jpg" if self.kind == "jpeg" else ".webp"


def _code_images(clip: Clip, fmt: _ImageFormat, quality: int, fmap: _FrameMap = _IDENTITY) -> CodecRun:
    """Each scored frame of ``clip`` through ``fmap`` and one image file of ``fmt``."""
    import cv2

    flags = fmt.encode_flags(quality)
    n_bytes = 0
    recon: dict[int, np.ndarray] = {}
    t_enc = t_dec = 0.0
    for i, rgb in clip.scored_frames():
        _check_frame(clip, i, rgb)
        t0 = time.perf_counter()
        ok, buf = cv2.imencode(fmt.ext, cv2.cvtColor(fmap.forward(rgb), cv2.COLOR_RGB2BGR), flags)
        t1 = time.perf_counter()
        if not ok:
            raise RuntimeError(f"{clip.name}: OpenCV could not encode frame {i} as {fmt.kind} (quality {quality})")
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        if bgr is None:
            raise RuntimeError(f"{clip.name}: OpenCV could not decode its own {fmt.kind} file of frame {i}")
        recon[i] = fmap.inverse(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), clip.width, clip.height)
        t_enc += t1 - t0
        t_dec += time.perf_counter() - t1
        n_bytes += len(buf)
    if len(recon) != len(clip.scored):
        missing = sorted(set(clip.scored) - set(recon))
        raise RuntimeError(f"{clip.name}: the clip ended before scored frame(s) {missing[:5]} "
                           f"(n_frames {clip.n_frames})")
    return CodecRun(bytes=n_bytes, pixels=len(recon) * clip.width * clip.height, frames_coded=len(recon),
                    recon=recon, encode_seconds=t_enc, decode_seconds=t_dec)


# ---------------------------------------------------------------------------------------------- video path


@dataclass(frozen=True)
class _VideoSettings:
    """libx264 / libx265 in the low-latency configuration, and the matching FFmpeg decoder."""

    codec: str  # "x264" | "x265"
    preset: str = "medium"
    gop: int | None = None
    threads: int = 0
    info_sei: bool = False
    extra_params: tuple[str, ...] = ()  # more x264-params / x265-params entries (the task-aware anchors: qg-size)

    @property
    def encoder(self) -> str:
        return "lib" + self.codec

    @property
    def decoder(self) -> str:
        return "h264" if self.codec == "x264" else "hevc"

    @property
    def min_size(self) -> int:
        return 2 if self.codec == "x264" else 16  # libx265 refuses pictures under 16x16

    def params(self) -> str:
        """The ``x264-params`` / ``x265-params`` string ('' when none)."""
        p = ["log-level=error"] if self.codec == "x265" else []
        if self.codec == "x265" and not self.info_sei:
            p.append("info=0")
        if self.gop is not None:
            p.append(f"keyint={self.gop}")
        if self.codec == "x265" and self.threads > 0:
            p.append(f"pools={self.threads}")
        p += list(self.extra_params)
        return ":".join(p)

    def options(self, crf: float | None) -> dict[str, str]:
        """The encoder's AVOptions (``crf`` None: without it, for describe())."""
        opts = {"preset": self.preset, "tune": TUNE}
        if crf is not None:
            opts["crf"] = f"{crf:g}"
        if self.params():
            opts[f"{self.codec}-params"] = self.params()
        return opts

    def describe(self) -> dict:
        try:  # downscale runs on single images without PyAV
            av = _import_av()
        except ImportError:
            av = None
        return {
            "encoder": f"{self.encoder} (FFmpeg, via PyAV)",
            "encoder_version": _encoder_version(self.encoder) if av else None,
            "pyav": av.__version__ if av else None,
            "libavcodec": ".".join(map(str, av.library_versions.get("libavcodec", ()))) if av else None,
            "decoder": f"{self.decoder} (FFmpeg)",
            "preset": self.preset,
            "tune": TUNE,
            "rate_control": "crf",
            "gop": self.gop if self.gop is not None else "encoder default (keyint 250)",
            "b_frames": 0,
            "pix_fmt": PIX_FMT,
            "colour": COLOUR,
            "threads": self.threads if self.threads else "auto",
            "info_sei": self.info_sei,
            "av_options": self.options(None),
            "bytes": "all packets of the whole clip + extradata (no global header: parameter sets in-band)",
        }


@dataclass(frozen=True)
class _Bitstream:
    packets: list[bytes]
    extradata: bytes
    frames: int  # frames encoded
    coded_size: tuple[int, int]  # (w, h) of the frames before padding
    seconds: float

    @property
    def nbytes(self) -> int:
        return sum(map(len, self.packets)) + len(self.extradata)


def _pad(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    if (w, h) == (width, height):
        return rgb
    return np.pad(rgb, ((0, height - h), (0, width - w), (0, 0)), mode="edge")


def _strip_x264_info_sei(packet: bytes) -> bytes:
    """``packet`` without x264's informational SEI NAL unit (user data unregistered: version + options)."""
    if _X264_INFO_UUID not in packet:
        return packet
    starts = []  # (start of the start code, start of the NAL unit)
    i = packet.find(b"\x00\x00\x01")
    while i >= 0:
        starts.append((i - 1 if i > 0 and packet[i - 1] == 0 else i, i + 3))
        i = packet.find(b"\x00\x00\x01", i + 3)
    out = bytearray(packet[: starts[0][0]] if starts else packet)
    for k, (sc, nal) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else len(packet)
        body = packet[nal:end]
        if len(body) > 2 and body[0] & 0x1F == 6 and body[1] == 5:  # SEI, first payload: user data unregistered
            j = 2
            while j < len(body) and body[j] == 0xFF:  # payload size: 0xFF bytes + a last byte
                j += 1
            if body[j + 1: j + 17] == _X264_INFO_UUID:
                continue
        out += packet[sc:end]
    return bytes(out)


def open_encoder(clip: Clip, s: _VideoSettings, crf: float, fmap: _FrameMap = _IDENTITY):
    """An open ``s.encoder`` context for ``clip``: (context, coded (w, h), encoded (w, h) after padding)."""
    av = _import_av()
    cw, ch = fmap.coded_size(clip.width, clip.height)
    ew, eh = max(cw + cw % 2, s.min_size), max(ch + ch % 2, s.min_size)
    fps = _clip_fps(clip)
    enc = av.CodecContext.create(s.encoder, "w")
    enc.width, enc.height, enc.pix_fmt = ew, eh, PIX_FMT
    enc.time_base, enc.framerate = 1 / fps, fps
    enc.thread_count = s.threads
    if s.gop is not None:
        enc.gop_size = s.gop
    enc.options = s.options(crf)
    try:
        enc.open()
    except av.FFmpegError as exc:
        raise RuntimeError(f"{clip.name}: {s.encoder} refused {ew}x{eh} at {s.options(crf)}: {exc}") from exc
    return enc, (cw, ch), (ew, eh)


FramePrepare = Callable[[int, np.ndarray], np.ndarray]  # (frame index, RGB) -> the RGB frame the encoder gets
FrameDecorate = Callable[[int, Any], Any]  # (frame index, yuv420p av.VideoFrame) -> the frame with side data


def _encode_video(clip: Clip, s: _VideoSettings, crf: float, fmap: _FrameMap = _IDENTITY, *,
                  prepare: FramePrepare | None = None, decorate: FrameDecorate | None = None) -> _Bitstream:
    """All ``clip.n_frames`` frames, in order, through ``fmap`` into one ``s.encoder`` bitstream. ``prepare``
    changes a frame's pixels before it is converted (after ``fmap``); ``decorate`` attaches side data to the
    converted frame (both timed as encoding)."""
    av = _import_av()
    enc, (cw, ch), (ew, eh) = open_encoder(clip, s, crf, fmap)
    packets: list[bytes] = []
    seconds = 0.0
    n = 0
    for i, rgb in clip.frames():
        _check_frame(clip, i, rgb)
        t0 = time.perf_counter()
        pixels = fmap.forward(rgb)
        if prepare is not None:
            pixels = prepare(i, pixels)
        frame = av.VideoFrame.from_ndarray(_pad(pixels, ew, eh), format="rgb24").reformat(format=PIX_FMT)
        frame.pts = i
        frame.time_base = enc.time_base
        if decorate is not None:
            frame = decorate(i, frame)
        packets += [bytes(p) for p in enc.encode(frame)]
        seconds += time.perf_counter() - t0
        n += 1
    if n != clip.n_frames:
        raise RuntimeError(f"{clip.name}: the clip yielded {n} frames, not n_frames {clip.n_frames}")
    t0 = time.perf_counter()
    packets += [bytes(p) for p in enc.encode(None)]
    if s.codec == "x264" and not s.info_sei:
        packets = [_strip_x264_info_sei(p) for p in packets]
    seconds += time.perf_counter() - t0
    return _Bitstream(packets=packets, extradata=bytes(enc.extradata or b""), frames=n, coded_size=(cw, ch),
                      seconds=seconds)


def _decode_video(clip: Clip, s: _VideoSettings, bs: _Bitstream,
                  fmap: _FrameMap = _IDENTITY) -> tuple[dict[int, np.ndarray], float]:
    """Decode ``bs`` in order; reconstructions of the scored frames only, and the decode seconds."""
    av = _import_av()
    cw, ch = bs.coded_size
    keep = set(clip.scored)
    recon: dict[int, np.ndarray] = {}
    count = 0
    t0 = time.perf_counter()
    dec = av.CodecContext.create(s.decoder, "r")
    dec.thread_count = s.threads
    if bs.extradata:
        dec.extradata = bs.extradata

    def take(frames) -> None:
        nonlocal count
        for f in frames:
            if count in keep:
                rgb = f.to_ndarray(format="rgb24")[:ch, :cw]
                recon[count] = fmap.inverse(rgb, clip.width, clip.height)
            count += 1

    for p in bs.packets:
        take(dec.decode(av.Packet(p)))
    take(dec.decode(None))
    seconds = time.perf_counter() - t0
    if count != bs.frames:
        raise RuntimeError(f"{clip.name}: the {s.decoder} decoder returned {count} frames for the {bs.frames} "
                           f"frames {s.encoder} coded")
    return recon, seconds


def _code_video(clip: Clip, s: _VideoSettings, crf: float, fmap: _FrameMap = _IDENTITY, *,
                prepare: FramePrepare | None = None, decorate: FrameDecorate | None = None) -> CodecRun:
    bs = _encode_video(clip, s, crf, fmap, prepare=prepare, decorate=decorate)
    recon, dec_s = _decode_video(clip, s, bs, fmap)
    return CodecRun(bytes=bs.nbytes, pixels=bs.frames * clip.width * clip.height, frames_coded=bs.frames,
                    recon=recon, encode_seconds=bs.seconds, decode_seconds=dec_s)


@functools.cache
def _encoder_version(encoder: str) -> str | None:
    """The encoder's own version string, read from the informational SEI of a one-frame probe."""
    try:
        av = _import_av()
        enc = av.CodecContext.create(encoder, "w")
        enc.width = enc.height = 16
        enc.pix_fmt, enc.time_base = PIX_FMT, Fraction(1, 25)
        enc.options = {"preset": "ultrafast"} | ({"x265-params": "log-level=error"} if encoder == "libx265" else {})
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24").reformat(format=PIX_FMT)
        data = b"".join(bytes(p) for p in [*enc.encode(frame), *enc.encode(None)])
    except Exception as exc:  # noqa: BLE001 (provenance only: never fail a run over it)
        log.debug("cannot probe the %s version: %s", encoder, exc)
        return None
    for head, tail in ((b"x264 - core", b" - H.264"), (b"x265 (build", b" - H.265")):
        i = data.find(head)
        if i >= 0:
            j = data.find(tail, i)
            return data[i: j if j > 0 else i + 80].decode("ascii", "replace")
    return None


@functools.cache
def _opencv_media(kind: str) -> str | None:
    """The image library line of OpenCV's build information, e.g. 'build-libjpeg-turbo (ver 3.1.2-70)'."""
    import cv2

    key = {"jpeg": "JPEG:", "webp": "WEBP:"}[kind]
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith(key):
            return line.split(":", 1)[1].strip()
    return None


# ---------------------------------------------------------------------------------------------- codecs


class _ImageCodec:
    """Shared by JPEG and WebP: scored frames only, one file each."""

    name: str
    param_name = "quality"
    _range: tuple[int, int]
    _default: tuple[int, ...]

    def __init__(self, fmt: _ImageFormat, params: Sequence[int] | None) -> None:
        self._fmt = fmt
        self.params: tuple[int, ...] = _sweep(params, self._default, self._check, f"{self.name} quality",
                                              descending=False)

    def _check(self, q: Any) -> int:
        return int(_number(q, f"{self.name} quality", *self._range, integer=True))

    def run(self, clip: Clip, param: int) -> CodecRun:
        run = _code_images(clip, self._fmt, self._check(param))
        log.debug("%s quality %s on %s: %d bytes, %d frames", self.name, param, clip.name, run.bytes,
                  run.frames_coded)
        return run

    def describe(self) -> dict:
        import cv2

        return {"encoder": f"OpenCV cv2.imencode('{self._fmt.ext}')", "opencv": cv2.__version__,
                "library": _opencv_media(self._fmt.kind), "quality_range": list(self._range),
                "frames": "scored frames only, one file each", "bytes": "complete files (headers included)"}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(params={self.params!r})"


class JpegCodec(_ImageCodec):
    """JPEG through OpenCV (libjpeg-turbo): 4:2:0, baseline, optimised Huffman tables unless ``optimize=False``."""

    name = "jpeg"
    _range = (1, 100)
    _default = (1, 3, 5, 8, 12, 20, 30, 50, 75, 90)

    def __init__(self, *, params: Sequence[int] | None = None, optimize: bool = True) -> None:
        if not isinstance(optimize, bool):
            raise ValueError(f"optimize {optimize!r} is not valid: must be True or False")
        super().__init__(_ImageFormat("jpeg", optimize=optimize), params)

    def describe(self) -> dict:
        return super().describe() | {"chroma": "4:2:0", "progressive": False, "optimize_huffman": self._fmt.optimize,
                                     "colour": "JFIF YCbCr: BT.601, full range"}


class WebpCodec(_ImageCodec):
    """Lossy WebP through OpenCV (libwebp defaults, 4:2:0)."""

    name = "webp"
    _range = (1, 100)
    _default = (1, 2, 5, 10, 20, 35, 50, 75, 90)

    def __init__(self, *, params: Sequence[int] | None = None) -> None:
        super().__init__(_ImageFormat("webp"), params)

    def describe(self) -> dict:
        return super().describe() | {"chroma": "4:2:0", "lossless": False,
                                     "colour": "libwebp RGB->YUV (BT.601, limited)"}


def _video_settings(codec: str, preset: str, gop: int | None, threads: int, info_sei: bool,
                    extra_params: tuple[str, ...] = ()) -> _VideoSettings:
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is not valid: must be one of {', '.join(PRESETS)}")
    if gop is not None:
        gop = int(_number(gop, "gop", 1, None, integer=True))
    threads = int(_number(threads, "threads", 0, None, integer=True))
    if not isinstance(info_sei, bool):
        raise ValueError(f"info_sei {info_sei!r} is not valid: must be True or False")
    return _VideoSettings(codec=codec, preset=preset, gop=gop, threads=threads, info_sei=info_sei,
                          extra_params=tuple(extra_params))


def _check_crf(crf: Any) -> int | float:
    return _number(crf, "crf", *CRF_RANGE, integer=False)


class _VideoCodec:
    """Shared by x264 and x265: the whole clip as one low-latency bitstream, CRF sweep."""

    name: str
    param_name = "crf"
    _default = (18, 23, 28, 33, 38, 41, 44, 47, 51)

    def __init__(self, *, params: Sequence[int | float] | None = None, preset: str = "medium", gop: int | None = None,
                 threads: int = 0, info_sei: bool = False) -> None:
        self._settings = _video_settings(self.name, preset, gop, threads, info_sei)
        self.params: tuple[int | float, ...] = _sweep(params, self._default, _check_crf, f"{self.name} crf",
                                                      descending=True)  # higher CRF = lower rate
        av = _import_av()
        if self._settings.encoder not in av.codecs_available:
            raise RuntimeError(f"this PyAV build has no {self._settings.encoder} encoder (the PyPI wheels of PyAV "
                               "ship libx264 and libx265: pip install av)")

    def run(self, clip: Clip, param: float) -> CodecRun:
        run = _code_video(clip, self._settings, _check_crf(param))
        log.debug("%s crf %s on %s: %d bytes, %d frames", self.name, param, clip.name, run.bytes, run.frames_coded)
        return run

    def describe(self) -> dict:
        return self._settings.describe()

    def __repr__(self) -> str:
        s = self._settings
        return (f"{type(self).__name__}(params={self.params!r}, preset={s.preset!r}, gop={s.gop!r}, "
                f"threads={s.threads!r}, info_sei={s.info_sei!r})")


class X264Codec(_VideoCodec):
    """H.264 (libx264), low-latency: ``tune=zerolatency``, CRF, yuv420p."""

    name = "x264"


class X265Codec(_VideoCodec):
    """HEVC (libx265), low-latency: ``tune=zerolatency``, CRF, yuv420p."""

    name = "x265"


class DownscaleCodec:
    """"Send smaller frames": 1/scale with INTER_AREA, x264 (videos) or JPEG (single images), INTER_CUBIC back."""

    name = "downscale"
    param_name = "scale"
    _default = (8, 6, 4, 3, 2)

    def __init__(self, *, params: Sequence[int | float] | None = None, crf: float = 23,
                 jpeg_quality: int = 85, preset: str = "medium", gop: int | None = None, threads: int = 0,
                 info_sei: bool = False) -> None:
        self.params: tuple[int | float, ...] = _sweep(params, self._default, self._check, "downscale scale",
                                                      descending=True)  # larger scale = smaller frames
        self.crf = _check_crf(crf)
        self.jpeg_quality = int(_number(jpeg_quality, "jpeg_quality", *JpegCodec._range, integer=True))
        self._video = _video_settings("x264", preset, gop, threads, info_sei)  # PyAV is needed only for videos
        self._image = _ImageFormat("jpeg")

    @staticmethod
    def _check(scale: Any) -> int | float:
        return _number(scale, "downscale scale", 1, None, integer=False)

    def run(self, clip: Clip, param: float) -> CodecRun:
        fmap = _FrameMap(scale=self._check(param))
        if clip.n_frames > 1:
            run = _code_video(clip, self._video, self.crf, fmap)
        else:
            run = _code_images(clip, self._image, self.jpeg_quality, fmap)
        log.debug("downscale %s on %s (%dx%d coded): %d bytes", param, clip.name,
                  *fmap.coded_size(clip.width, clip.height), run.bytes)
        return run

    def describe(self) -> dict:
        import cv2

        return {"down": "cv2.resize INTER_AREA to round(w/scale) x round(h/scale)",
                "up": "cv2.resize INTER_CUBIC to the original size, saturated to uint8",
                "opencv": cv2.__version__,
                "pixels": "counted at the original size",
                "video": {"codec": "x264", "crf": self.crf, **self._video.describe()},
                "image": {"codec": "jpeg", "quality": self.jpeg_quality, "optimize_huffman": self._image.optimize,
                          "library": _opencv_media("jpeg")}}

    def __repr__(self) -> str:
        return f"DownscaleCodec(params={self.params!r}, crf={self.crf!r}, jpeg_quality={self.jpeg_quality!r})"


# ---------------------------------------------------------------------------------------------- factory

_CLASSES: dict[str, type] = {"jpeg": JpegCodec, "webp": WebpCodec, "x264": X264Codec, "x265": X265Codec,
                             "downscale": DownscaleCodec}


def _keywords(cls: type) -> set[str]:
    return {p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY}


def make_baselines(names: Sequence[str], *, sweeps: Mapping[str, Sequence] | None = None, **options: Any) -> list:
    """Baseline codecs by name (:data:`BASELINES`), in the order given.

    ``options`` (``preset``, ``gop``, ``threads``, ``info_sei``, ``optimize``, ``crf``, ``jpeg_quality``) go
    to every named codec whose constructor takes them, and are ignored by the others (``preset`` means
    nothing to JPEG); ``sweeps`` maps a codec name to its ``params`` (default: the codec's own sweep)."""
    if isinstance(names, str):
        raise ValueError(f"names {names!r} must be a sequence of codec names, e.g. [{names!r}]")
    for n in names:
        if n not in _CLASSES:
            raise ValueError(f"unknown baseline codec {n!r}: valid names are {', '.join(BASELINES)}")
    dup = sorted({n for n in names if list(names).count(n) > 1})
    if dup:
        raise ValueError(f"baseline codec(s) {', '.join(map(repr, dup))} listed more than once in {list(names)!r}")
    sweeps = dict(sweeps or {})
    for n in sweeps:
        if n not in _CLASSES:
            raise ValueError(f"sweeps: unknown baseline codec {n!r}: valid names are {', '.join(BASELINES)}")
    known = set().union(*(_keywords(c) for c in _CLASSES.values())) - {"params"}
    for k in options:
        if k not in known:
            raise ValueError(f"unknown baseline option {k!r}: valid options are {', '.join(sorted(known))}")
    codecs = []
    for n in names:
        cls = _CLASSES[n]
        kw = {k: v for k, v in options.items() if k in _keywords(cls)}
        if n in sweeps:
            kw["params"] = sweeps[n]
        codecs.append(cls(**kw))
    return codecs
