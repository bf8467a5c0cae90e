"""Frame sources for the edge: a video file, an RTSP/HTTP stream, a V4L2 device or an image folder.

``FrameSource`` yields :class:`CapturedFrame` ``(index, capture_ts_us, rgb)`` tuples (index counts
the frames yielded, from 0; ``capture_ts_us`` is the wall-clock read time in microseconds since the
Unix epoch; ``rgb`` is (H, W, 3) uint8). Iteration blocks (reads and pacing sleeps): the app runs
it in a worker thread.

- Kinds: an ``int`` or a digit string or ``/dev/videoN`` → V4L2 device (live); ``rtsp://``,
  ``rtsps://``, ``rtmp://``, ``http://``, ``https://``, ``udp://``, ``tcp://`` → stream (live); an
  existing folder → its images in name order; an existing file → video file.
- Pacing (files and folders only; live sources pace themselves): ``pace="realtime"`` yields frame
  k at ``t0 + k / fps`` (``fps``: the override, else the file's own rate, else 10); when reads fall
  more than one frame period behind, the schedule restarts from now instead of bursting.
  ``pace="none"`` reads as fast as the consumer asks.
- ``loop=True`` restarts files and folders at their end (the index keeps counting).
- A live source whose read fails is released and reopened with exponential backoff
  (``backoff_initial_s`` doubling up to ``backoff_max_s``); after ``reconnect_attempts`` failed
  attempts in a row, :class:`CaptureError` is raised. ``reconnects`` counts successful reopenings.
- The session has one frame size: a frame whose size differs from the first is a ``ValueError``
  unless ``resize=(width, height)`` is set (then every frame is resized to it).
"""

from __future__ import annotations

import collections
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["CapturedFrame", "CaptureError", "FrameSource", "Reader", "IMAGE_EXTENSIONS", "PACES", "KINDS",
           "DEFAULT_FPS", "source_kind"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
PACES = ("realtime", "none")
KINDS = ("file", "folder", "stream", "device")
DEFAULT_FPS = 10.0  # pacing rate when neither the override nor the source gives one
_STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")
_DEVICE_RE = re.compile(r"^/dev/video(\d+)$")


class CaptureError(RuntimeError):
    """A source that cannot be opened or read (after the configured reconnect attempts)."""


class CapturedFrame(NamedTuple):
    index: int  # frames yielded before this one
    capture_ts_us: int  # wall-clock read time, microseconds since the Unix epoch
    rgb: np.ndarray  # (H, W, 3) uint8


class Reader(Protocol):
    """What an opener returns (``cv2.VideoCapture`` satisfies it)."""

    def isOpened(self) -> bool: ...
    def read(self) -> tuple[bool, Any]: ...
    def get(self, prop: int) -> float: ...
    def release(self) -> None: ...


class _FolderReader:
    """Images of a folder in name order, read like a video."""

    def __init__(self, folder: Path):
        self.files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        self.pos = 0

    def isOpened(self) -> bool:
        return bool(self.files)

    def read(self) -> tuple[bool, Any]:
        import cv2

        if self.pos >= len(self.files):
            return False, None
        p = self.files[self.pos]
        self.pos += 1
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            raise CaptureError(f"image {p} could not be read (not an image, or a format OpenCV cannot decode)")
        return True, img

    def get(self, prop: int) -> float:
        return 0.0

    def release(self) -> None:
        self.pos = len(self.files)


def source_kind(source: str | int | os.PathLike) -> tuple[str, str | int]:
    """(kind, what to open) for a source; raises ``ValueError``/``FileNotFoundError`` naming it."""
    if isinstance(source, bool):
        raise ValueError(f"source {source!r} is not a path, URL or device index")
    if isinstance(source, int):
        if source < 0:
            raise ValueError(f"device index {source} must be >= 0")
        return "device", source
    s = os.fspath(source).strip() if isinstance(source, (str, os.PathLike)) else None
    if not s:
        raise ValueError(f"source {source!r} is empty: give a video file, an image folder, an "
                         "rtsp:// or http(s):// URL, /dev/videoN or a device index")
    if s.isdigit():
        return "device", int(s)
    m = _DEVICE_RE.match(s)
    if m:
        return "device", s
    if s.lower().startswith(_STREAM_SCHEMES):
        return "stream", s
    p = Path(s).expanduser()
    if p.is_dir():
        return "folder", str(p)
    if p.is_file():
        return "file", str(p)
    raise FileNotFoundError(f"source {s!r} is not an existing file or folder, a URL "
                            f"({', '.join(_STREAM_SCHEMES)}) or a device (/dev/videoN, index)")


def _default_opener(kind: str, target: str | int) -> Reader:
    import cv2

    if kind == "folder":
        return _FolderReader(Path(target))
    return cv2.VideoCapture(target)


class FrameSource:
    """An iterable of :class:`CapturedFrame` from one camera-like source (see the module doc)."""

    def __init__(self, *, source: str | int | os.PathLike, pace: str = "realtime", fps: float | None = None,
                 loop: bool = False, resize: tuple[int, int] | None = None, reconnect_attempts: int = 10,
                 backoff_initial_s: float = 0.5, backoff_max_s: float = 10.0,
                 opener: Callable[[str, str | int], Reader] | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        if pace not in PACES:
            raise ValueError(f"pace {pace!r} is not one of {', '.join(PACES)}")
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
            raise ValueError(f"fps {fps!r} must be a number > 0 (or None for the source's own rate)")
        if resize is not None:
            if (not isinstance(resize, (tuple, list)) or len(resize) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in resize)):
                raise ValueError(f"resize {resize!r} must be (width, height), two integers > 0, or None")
            resize = (int(resize[0]), int(resize[1]))
        if isinstance(reconnect_attempts, bool) or not isinstance(reconnect_attempts, int) or reconnect_attempts < 0:
            raise ValueError(f"reconnect_attempts {reconnect_attempts!r} must be an integer >= 0")
        if not (0 < backoff_initial_s <= backoff_max_s):
            raise ValueError(f"backoff_initial_s {backoff_initial_s!r} and backoff_max_s {backoff_max_s!r} must "
                             "satisfy 0 < initial <= max")
        self.kind, self._target = source_kind(source)
        self.source = source
        self.live = self.kind in ("stream", "device")
        self.pace, self.fps_override, self.loop, self.resize = pace, fps, bool(loop), resize
        self.reconnect_attempts = reconnect_attempts
        self.backoff_initial_s, self.backoff_max_s = float(backoff_initial_s), float(backoff_max_s)
        self._opener = opener or _default_opener
        self._sleep, self._clock = sleep, clock
        self.read_ms: collections.deque[float] = collections.deque(maxlen=1000)  # per frame, the last 1000
        self._reader: Reader | None = None
        self.frame_size: tuple[int, int] | None = resize  # (width, height), known after the first frame
        self.frames_read = 0
        self.reconnects = 0  # live source reopened after a failure
        self.read_failures = 0  # failed reads or opens of a live source
        self.loops = 0  # restarts of a looping file or folder
        self.source_fps: float | None = None
        self._closed = False
        self._opened_once = False

    # ------------------------------------------------------------------ opening

    @property
    def fps(self) -> float:
        """The nominal rate: the override, else the source's, else :data:`DEFAULT_FPS`."""
        return float(self.fps_override or self.source_fps or DEFAULT_FPS)

    def _open(self) -> Reader:
        import cv2

        r = self._opener(self.kind, self._target)
        if not r.isOpened():
            r.release()
            what = "has no images" if self.kind == "folder" else "could not be opened"
            raise CaptureError(f"{self.kind} source {self._target!r} {what}")
        fps = float(r.get(cv2.CAP_PROP_FPS) or 0.0)
        if fps > 0 and np.isfinite(fps) and fps < 1000:
            self.source_fps = fps
        return r

    def open(self) -> FrameSource:
        """Open the source now (the first read opens it otherwise); returns self. A live source
        that cannot be opened is retried like a failed read."""
        if self._reader is None:
            if self.live:
                self._reader = self._live_reader()
            else:
                self._reader = self._open()
            self._opened_once = True
        return self

    def _live_reader(self, first_error: str | None = None) -> Reader:
        """Open the live source, retrying with exponential backoff; counts reconnects."""
        failures = 0
        err = first_error
        while True:
            if err is not None:
                self.read_failures += 1
                failures += 1
                if failures > self.reconnect_attempts:
                    raise CaptureError(f"{err}; gave up after {failures} failure(s) in a row "
                                       f"(reconnect_attempts={self.reconnect_attempts})")
                delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (failures - 1))
                log.warning("capture: %s; reconnecting in %.2f s (%d of %d)", err, delay, failures,
                            self.reconnect_attempts)
                self._sleep(delay)
                if self._closed:
                    raise CaptureError(f"{self.kind} source {self._target!r} closed while reconnecting")
            try:
                r = self._open()
            except CaptureError as exc:
                err = str(exc)
                continue
            if self._opened_once:
                self.reconnects += 1
                log.info("capture: reopened %s source %r (reconnect %d)", self.kind, self._target, self.reconnects)
            return r

    def close(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.release()
            self._reader = None

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reading

    def _to_rgb(self, img: Any) -> np.ndarray:
        import cv2

        img = np.asarray(img)
        if img.dtype != np.uint8:
            raise CaptureError(f"{self.kind} source {self._target!r} gave {img.dtype} frames (need 8-bit)")
        if img.ndim == 2:
            rgb = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
        elif img.ndim == 3 and img.shape[2] == 4:
            rgb = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
        elif img.ndim == 3 and img.shape[2] == 3:
            rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        else:
            raise CaptureError(f"{self.kind} source {self._target!r} gave a frame of shape {img.shape}")
        h, w = rgb.shape[:2]
        if self.resize is not None:
            if (w, h) != self.resize:
                rgb = cv2.resize(rgb, self.resize, interpolation=cv2.INTER_AREA)
        elif self.frame_size is None:
            self.frame_size = (w, h)
        elif (w, h) != self.frame_size:
            raise ValueError(f"frame {self.frames_read} of {self._target!r} is {w}x{h} but the session's frames are "
                             f"{self.frame_size[0]}x{self.frame_size[1]}; set resize=(width, height) to scale "
                             "every frame to one size")
        return rgb

    def _read_raw(self) -> Any | None:
        """The next raw frame, or None at the end of a non-looping file/folder."""
        self.open()
        reader = self._reader
        if reader is None:  # closed meanwhile
            return None
        if not self.live:
            ok, img = reader.read()
            if ok and img is not None:
                return img
            if not self.loop or self.frames_read == 0:
                return None
            reader.release()
            self._reader = reader = self._open()
            self.loops += 1
            ok, img = reader.read()
            return img if ok and img is not None else None
        while True:
            try:
                ok, img = reader.read()
            except CaptureError:
                raise
            except Exception as exc:  # OpenCV backends can raise on broken streams
                ok, img = False, f"raised {exc}"
            if ok and img is not None:
                return img
            if self._closed:
                return None
            why = img if isinstance(img, str) else "returned no frame"
            reader.release()
            self._reader = None
            self._reader = reader = self._live_reader(f"read from {self.kind} source {self._target!r} {why}")

    def __iter__(self) -> Iterator[CapturedFrame]:
        period = 0.0
        t0 = 0.0
        k = 0
        while not self._closed:
            t_read = time.perf_counter()
            img = self._read_raw()
            if img is None:
                return
            read_s = time.perf_counter() - t_read
            if self.pace == "realtime" and not self.live:
                if k == 0 and period == 0.0:
                    period = 1.0 / self.fps
                    t0 = self._clock()
                due = t0 + k * period
                now = self._clock()
                if now < due:
                    self._sleep(due - now)
                elif now - due > period:  # fell behind: restart the schedule, no burst
                    t0, k = now, 0
                k += 1
            t_rgb = time.perf_counter()
            rgb = self._to_rgb(img)
            self.read_ms.append((read_s + time.perf_counter() - t_rgb) * 1e3)  # reading and converting, no pacing
            frame = CapturedFrame(self.frames_read, time.time_ns() // 1000, rgb)
            self.frames_read += 1
            yield frame

    def stats(self) -> dict[str, Any]:
        return {"kind": self.kind, "frames_read": self.frames_read, "reconnects": self.reconnects,
                "read_failures": self.read_failures, "loops": self.loops, "fps": self.fps,
                "frame_size": self.frame_size}
