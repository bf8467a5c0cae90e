"""edge.capture: folders, the real vtest.avi, pacing, reconnect with backoff, frame-size rules."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from latentcast.edge.capture import CaptureError, FrameSource, source_kind
from tests.conftest import shared_or_skip

cv2 = pytest.importorskip("cv2")


def _write_images(folder, sizes):
    folder.mkdir(exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        img = np.full((h, w, 3), (i * 20, 0, 255), np.uint8)  # BGR: red channel 255
        cv2.imwrite(str(folder / f"img_{i:03d}.png"), img)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_source_kinds(tmp_path):
    f = tmp_path / "v.avi"
    f.write_bytes(b"x")
    assert source_kind(0) == ("device", 0)
    assert source_kind("2") == ("device", 2)
    assert source_kind("/dev/video1") == ("device", "/dev/video1")
    assert source_kind("rtsp://cam/stream")[0] == "stream"
    assert source_kind("https://cam/mjpg")[0] == "stream"
    assert source_kind(tmp_path) == ("folder", str(tmp_path))
    assert source_kind(str(f)) == ("file", str(f))
    with pytest.raises(FileNotFoundError, match="'nope.mp4' is not an existing file"):
        source_kind("nope.mp4")
    with pytest.raises(ValueError, match="source '' is empty"):
        source_kind("")


def test_bad_options(tmp_path):
    with pytest.raises(ValueError, match="pace 'fast' is not one of realtime, none"):
        FrameSource(source=tmp_path, pace="fast")
    with pytest.raises(ValueError, match="fps -1 must be a number > 0"):
        FrameSource(source=tmp_path, fps=-1)
    with pytest.raises(ValueError, match=r"resize \(640,\) must be \(width, height\)"):
        FrameSource(source=tmp_path, resize=(640,))


def test_image_folder_sorted_rgb_and_loop(tmp_path):
    folder = _write_images(tmp_path / "imgs", [(32, 24)] * 3)
    src = FrameSource(source=folder, pace="none")
    frames = list(src)
    assert [f.index for f in frames] == [0, 1, 2]
    assert frames[0].rgb.shape == (24, 32, 3) and frames[0].rgb.dtype == np.uint8
    assert (frames[0].rgb[0, 0] == (255, 0, 0)).all()  # converted to RGB
    assert [int(f.rgb[0, 0, 2]) for f in frames] == [0, 20, 40]  # name order
    assert all(b.capture_ts_us >= a.capture_ts_us for a, b in itertools.pairwise(frames))
    assert abs(frames[0].capture_ts_us - time.time_ns() // 1000) < 60_000_000
    looped = list(itertools.islice(FrameSource(source=folder, pace="none", loop=True), 7))
    assert [f.index for f in looped] == list(range(7))
    assert [int(f.rgb[0, 0, 2]) for f in looped] == [0, 20, 40, 0, 20, 40, 0]


def test_frame_size_change_is_an_error_unless_resize(tmp_path):
    folder = _write_images(tmp_path / "mixed", [(32, 24), (40, 30)])
    with pytest.raises(ValueError, match=r"frame 1 of .* is 40x30 but the session's frames are 32x24; set resize"):
        list(FrameSource(source=folder, pace="none"))
    frames = list(FrameSource(source=folder, pace="none", resize=(16, 12)))
    assert [f.rgb.shape for f in frames] == [(12, 16, 3), (12, 16, 3)]


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptureError, match="has no images"):
        list(FrameSource(source=tmp_path / "empty"))


def test_vtest_video_file():
    path = shared_or_skip() / "data" / "video" / "vtest.avi"
    src = FrameSource(source=path, pace="none")
    frames = list(itertools.islice(src, 3))
    src.close()
    assert [f.rgb.shape for f in frames] == [(576, 768, 3)] * 3
    assert src.source_fps == pytest.approx(10.0) and src.fps == pytest.approx(10.0)
    assert src.frame_size == (768, 576) and not src.live


def test_realtime_pacing(tmp_path):
    folder = _write_images(tmp_path / "p", [(8, 8)] * 6)
    t = time.monotonic()
    n = sum(1 for _ in FrameSource(source=folder, pace="realtime", fps=50.0))
    dt = time.monotonic() - t
    assert n == 6
    assert 0.08 <= dt < 2.0  # 5 periods of 20 ms after the first frame (loose: shared CPU)


class FakeReader:
    def __init__(self, frames):
        self.frames = list(frames)
        self.released = False

    def isOpened(self):
        return True

    def read(self):
        if not self.frames:
            return False, None
        return True, self.frames.pop(0)

    def get(self, prop):
        return 25.0

    def release(self):
        self.released = True


class Closed(FakeReader):
    def isOpened(self):
        return False


def test_live_reconnect_with_backoff():
    img = np.zeros((4, 6, 3), np.uint8)
    # open 1: two frames then a read failure; opens 2-3 fail; open 4: one frame then failure; then none
    readers = [FakeReader([img, img]), Closed([]), Closed([]), FakeReader([img])]
    sleeps = []

    def opener(kind, target):
        assert (kind, target) == ("stream", "rtsp://cam")
        return readers.pop(0) if readers else Closed([])

    src = FrameSource(source="rtsp://cam", opener=opener, sleep=sleeps.append, reconnect_attempts=3,
                      backoff_initial_s=0.1, backoff_max_s=0.25)
    got = []
    with pytest.raises(CaptureError, match="gave up after 4 failure"):
        for f in src:
            got.append(f.index)
    assert got == [0, 1, 2]
    assert src.reconnects == 1
    assert sleeps == [0.1, 0.2, 0.25] + [0.1, 0.2, 0.25]  # backoff doubles, capped; resets after success
    assert src.read_failures == 3 + 4


def test_live_source_is_not_paced():
    img = np.zeros((4, 6, 3), np.uint8)
    sleeps = []
    src = FrameSource(source=0, opener=lambda k, t: FakeReader([img] * 5), sleep=sleeps.append,
                      reconnect_attempts=0)
    with pytest.raises(CaptureError):
        list(src)
    assert src.frames_read == 5 and sleeps == []
