"""latentcast.detector: YOLOX-nano through ONNX Runtime on a real street frame."""

from __future__ import annotations

import numpy as np
import pytest

from latentcast.detector import PAD_VALUE, Detection, YoloxDetector, letterbox, nms
from tests.conftest import shared_or_skip

cv2 = pytest.importorskip("cv2")


@pytest.fixture(scope="module")
def detector() -> YoloxDetector:
    shared_or_skip()
    return YoloxDetector(threads=1)


@pytest.fixture(scope="module")
def frame0() -> np.ndarray:
    path = shared_or_skip() / "data" / "video" / "vtest.avi"
    cap = cv2.VideoCapture(str(path))
    ok, bgr = cap.read()
    cap.release()
    assert ok
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _iou(a: Detection, b: Detection) -> float:
    w = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    h = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    inter = w * h
    return inter / ((a.x1 - a.x0) * (a.y1 - a.y0) + (b.x1 - b.x0) * (b.y1 - b.y0) - inter)


def test_model_facts(detector):
    assert detector.input_size == (416, 416)
    assert len(detector.labels) == 80 and detector.labels[0] == "person" and detector.labels[2] == "car"


def test_pedestrians_on_vtest_frame0(detector, frame0):
    dets = detector.detect(frame0)
    people = [d for d in dets if d.label == "person"]
    assert len(people) >= 4
    h, w = frame0.shape[:2]
    for d in dets:
        assert 0 <= d.x0 < d.x1 <= w and 0 <= d.y0 < d.y1 <= h
        assert detector.score_threshold <= d.score <= 1.0
        assert d.label == detector.labels[d.class_id]
    for p in people:  # upright pedestrians: taller than wide, 20..200 px tall in a 576-row frame
        assert p.y1 - p.y0 > p.x1 - p.x0
        assert 20 < p.y1 - p.y0 < 200
    scores = [d.score for d in dets]
    assert scores == sorted(scores, reverse=True)


def test_letterbox_is_top_left():
    img = np.full((100, 200, 3), 7, np.uint8)
    canvas, r = letterbox(img, (416, 416))
    assert r == pytest.approx(416 / 200)
    assert canvas.shape == (416, 416, 3)
    assert (canvas[:208, :416] == 7).all() and (canvas[208:] == PAD_VALUE).all()


def test_padding_right_bottom_does_not_move_boxes(detector, frame0):
    """A frame padded (with the letterbox value) on the right and bottom to a square keeps the same
    resize ratio, so the same objects must come out at the same pixel coordinates."""
    h, w = frame0.shape[:2]
    padded = np.full((w, w, 3), PAD_VALUE, np.uint8)
    padded[:h, :w] = frame0
    a, b = detector.detect(frame0), detector.detect(padded)
    strong = [d for d in a if d.score > 0.5]
    assert strong
    for d in strong:
        best = max((e for e in b if e.class_id == d.class_id), key=lambda e: _iou(d, e))
        assert _iou(d, best) > 0.9
        assert abs(best.x0 - d.x0) < 3 and abs(best.y1 - d.y1) < 3


def test_horizontal_flip_mirrors_boxes(detector, frame0):
    """Decoding geometry: a mirrored frame gives mirrored boxes (checks grid offsets, strides, ratio)."""
    w = frame0.shape[1]
    a = [d for d in detector.detect(frame0) if d.label == "person" and d.score > 0.6]
    b = detector.detect(np.ascontiguousarray(frame0[:, ::-1]))
    assert a
    for d in a:
        m = Detection(x0=w - d.x1, y0=d.y0, x1=w - d.x0, y1=d.y1, class_id=d.class_id, label=d.label, score=d.score)
        assert max(_iou(m, e) for e in b if e.class_id == d.class_id) > 0.75


def test_nms_class_aware():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    assert nms(boxes, scores, 0.45).tolist() == [0, 3]
    assert nms(boxes, scores, 0.45, class_ids=np.array([0, 0, 1, 0])).tolist() == [0, 2, 3]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []


def test_bad_inputs(detector, tmp_path):
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        detector.detect(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        detector.detect(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="score_threshold 1.5"):
        YoloxDetector(score_threshold=1.5)
    with pytest.raises(ValueError, match="nms_threshold 0"):
        YoloxDetector(nms_threshold=0)
    with pytest.raises(FileNotFoundError, match="nope.onnx.*LATENTCAST_SHARED"):
        YoloxDetector(model_path=tmp_path / "nope.onnx")


def test_missing_shared_folder_names_the_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("LATENTCAST_SHARED", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="yolox_nano.onnx.*LATENTCAST_SHARED"):
        YoloxDetector()
