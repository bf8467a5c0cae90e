"""edge.grounding: label mapping, detector cadence, IoU tracking, ROI output."""

from __future__ import annotations

import numpy as np
import pytest

from latentcast.detector import Detection
from latentcast.edge.grounding import Grounder, iou_matrix, map_labels
from latentcast.proto.bitstream import Roi
from tests.conftest import shared_or_skip

COCO = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck"]


class FakeDetector:
    """Scripted detections: ``script[k]`` is returned by the k-th call."""

    labels = COCO

    def __init__(self, script):
        self.script = list(script)
        self.calls = 0

    def detect(self, rgb):
        out = self.script[self.calls] if self.calls < len(self.script) else []
        self.calls += 1
        return out


def det(x0, y0, x1, y1, cls=0, score=0.9):
    return Detection(x0=x0, y0=y0, x1=x1, y1=y1, class_id=cls, label=COCO[cls], score=score)


FRAME = np.zeros((100, 200, 3), np.uint8)


def test_map_labels_names_synonyms_plurals():
    m = map_labels(["Pedestrians", "vehicle", "bike"], COCO)
    assert m == {0: 0, 2: 1, 7: 1, 5: 1, 3: 1, 1: 2}
    assert map_labels(["cars"], COCO) == {2: 0}
    assert map_labels(["person", "people"], COCO) == {0: 0}  # a class goes to the first label that names it


@pytest.mark.parametrize("labels, msg", [
    ([], "labels is empty"),
    (["person", "unicorn"], r"unknown task label 'unicorn'.*valid.*bicycle.*pedestrian"),
    (["car", "Car"], r"labels\[1\] 'Car' is a duplicate"),
    (["car", ""], r"labels\[1\] must be a non-empty string"),
    ("person", "must be a sequence of strings"),
])
def test_map_labels_errors(labels, msg):
    with pytest.raises(ValueError, match=msg):
        map_labels(labels, COCO)


def test_constructor_errors():
    d = FakeDetector([])
    with pytest.raises(ValueError, match="every 0 must be an integer >= 1"):
        Grounder(labels=["person"], detector=d, every=0)
    with pytest.raises(ValueError, match="motion 'kalman' is not one of constant-velocity, last"):
        Grounder(labels=["person"], detector=d, motion="kalman")
    with pytest.raises(ValueError, match="margin -1"):
        Grounder(labels=["person"], detector=d, margin=-1)


def test_detector_cadence_and_label_ids():
    d = FakeDetector([[det(10, 10, 30, 50, cls=2), det(50, 10, 60, 40, cls=0), det(0, 0, 5, 5, cls=4)]] * 3)
    g = Grounder(labels=["pedestrian", "vehicle"], detector=d, every=3, margin=0)
    outs = [g.update(FRAME) for _ in range(7)]
    assert d.calls == 3 and [o.detected for o in outs] == [True, False, False, True, False, False, True]
    r = outs[0]
    assert {(x.label_id, x.x0) for x in r.rois} == {(1, 10), (0, 50)}  # airplane (class 4) is not a task class
    assert {(b.label, b.label_id) for b in r.boxes} == {("vehicle", 1), ("pedestrian", 0)}
    assert all(isinstance(x, Roi) for x in r.rois)


def test_classes_merged_into_one_label_give_one_box():
    d = FakeDetector([[det(10, 10, 50, 40, cls=7, score=0.8), det(11, 10, 50, 41, cls=2, score=0.6),
                       det(12, 10, 50, 40, cls=0, score=0.5)]])
    r = Grounder(labels=["vehicle", "person"], detector=d, margin=0).update(FRAME)
    assert sorted((b.label, round(b.score, 1)) for b in r.boxes) == [("person", 0.5), ("vehicle", 0.8)]


def test_constant_velocity_carry_and_age_out():
    d = FakeDetector([[det(10, 10, 30, 30)], [det(20, 10, 40, 30)], [], [], []])
    g = Grounder(labels=["person"], detector=d, every=2, max_missed=1, margin=0)
    o = [g.update(FRAME) for _ in range(4)]
    assert o[1].boxes[0].x0 == pytest.approx(10)  # no velocity yet: stays
    assert o[2].boxes[0].x0 == pytest.approx(20)  # matched detection; velocity = 10 px / 2 frames
    assert o[3].boxes[0].x0 == pytest.approx(25)  # extrapolated
    o4 = g.update(FRAME)  # detection run with no match: missed 1 <= max_missed, carried on
    assert o4.detected and o4.boxes[0].x0 == pytest.approx(30)
    g.update(FRAME)
    assert g.update(FRAME).boxes == []  # second miss: aged out


def test_last_position_motion_and_new_tracks():
    d = FakeDetector([[det(10, 10, 30, 30)], [det(20, 10, 40, 30), det(100, 50, 120, 90)]])
    g = Grounder(labels=["person"], detector=d, every=2, motion="last", margin=0)
    g.update(FRAME), g.update(FRAME)
    o = g.update(FRAME)
    assert sorted(b.x0 for b in o.boxes) == [20, 100]
    assert g.update(FRAME).boxes[0].x0 in (20, 100)  # not moved


def test_margin_and_clipping():
    d = FakeDetector([[det(-5.0, 2.5, 30.2, 99.0), det(195.5, 50, 210, 60)]])
    g = Grounder(labels=["person"], detector=d, margin=4)
    r = g.update(FRAME)
    a = next(x for x in r.rois if x.x0 == 0)
    assert (a.x0, a.y0, a.x1, a.y1) == (0, 0, 35, 100)
    b = next(x for x in r.rois if x.x0 != 0)
    assert (b.x0, b.x1) == (191, 200)
    assert min(bx.x0 for bx in r.boxes) == 0.0 and max(bx.x1 for bx in r.boxes) == 200.0


def test_tracks_leaving_the_frame_are_dropped():
    d = FakeDetector([[det(150, 10, 190, 30)], [det(170, 10, 200, 30)], []])
    g = Grounder(labels=["person"], detector=d, every=2, max_missed=5, margin=0)
    outs = [g.update(FRAME) for _ in range(8)]
    assert outs[3].boxes and not outs[-1].boxes


def test_iou_matrix():
    m = iou_matrix(np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]]))
    assert m[0].tolist() == pytest.approx([1.0, 1 / 3, 0.0])


def test_real_detector_pedestrians_on_vtest():
    cv2 = pytest.importorskip("cv2")
    from latentcast.detector import YoloxDetector

    path = shared_or_skip() / "data" / "video" / "vtest.avi"
    cap = cv2.VideoCapture(str(path))
    frames = []
    for _ in range(4):
        ok, bgr = cap.read()
        assert ok
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    g = Grounder(labels=["pedestrian"], detector=YoloxDetector(threads=1), every=2)
    outs = [g.update(f) for f in frames]
    assert g.detector_runs == 2
    for o in outs:
        assert len(o.rois) >= 4 and all(r.label_id == 0 for r in o.rois)
        assert all(r.x1 <= 768 and r.y1 <= 576 for r in o.rois)
        assert all(b.label == "pedestrian" for b in o.boxes)


def test_a_narrow_walker_keeps_one_track_between_detector_runs():
    """A 12-px-wide pedestrian moves 15 px between detector runs (no overlap with its last box):
    the track follows it instead of leaving a ghost box behind next to a new one."""
    script = [[det(20 + 15 * k, 30, 32 + 15 * k, 70)] for k in range(6)]
    g = Grounder(labels=["person"], detector=FakeDetector(script), every=5, margin=0)
    counts = [len(g.update(FRAME).boxes) for _ in range(30)]
    assert max(counts) == 1, counts
