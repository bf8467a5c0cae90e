"""Task labels → detector boxes → packet ROIs (the embedded profile's grounding; no torch).

The task's label list (``SessionHeader.labels``) is mapped once to detector classes:

- a label that is a detector class name (case-insensitive) maps to that class;
- else a label in :data:`SYNONYMS` maps to the classes listed there;
- else a plural ("s", "es", "ies" -> "y") whose singular is one of the above maps like the singular;
- ``strict=True`` (the default): anything else is a ``ValueError`` that lists the valid names;
- ``strict=False`` (task lists of 100+ labels, most of which a closed-set detector cannot see): a
  multi-word label whose trailing words resolve as above maps like them ("school bus" -> bus,
  "police car" -> car, "truck driver" -> person; words from a preposition on are dropped first:
  "person with an umbrella" -> person, "group of people" -> nothing); anything else is skipped,
  reported once in the log with a count. It is still an error when no label can be grounded.

A detector class goes to the label that names it (itself or its plural), else to the first label
that reaches it through a synonym or its trailing words. Detections of classes that reach no task
label are not ROIs (the task-related filter of DISCOVER's Fig. 3).

The detector runs every ``every`` frames (its boxes are then NMS-merged per task label, so a
vehicle seen as both "car" and "truck" gives one ROI); in between, a small IoU tracker carries the boxes
(``motion="constant-velocity"`` extrapolates each box by its per-frame velocity measured between
its last two detections, ``"last"`` keeps it in place). A track not matched by ``max_missed``
detection runs in a row is dropped. Output per frame: packet ``Roi`` values (integer pixels,
expanded by ``margin``, clipped to the frame; ``label_id`` indexes the TASK label list) and the
wire ``Box`` messages the ROIs came from (float pixels, clipped, without the margin).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from latentcast.boxes import iou_matrix
from latentcast.detector import Detector, nms
from latentcast.proto.bitstream import MAX_ROIS, Roi
from latentcast.proto.latentcast_v1_pb2 import Box

log = logging.getLogger(__name__)

__all__ = ["SYNONYMS", "MOTIONS", "Grounding", "Grounder", "LabelCoverage", "label_coverage", "map_labels",
           "iou_matrix"]

# task label -> detector (COCO) class names; labels that are COCO names need no entry
SYNONYMS: dict[str, tuple[str, ...]] = {
    "pedestrian": ("person",),
    "people": ("person",),
    "persons": ("person",),
    "human": ("person",),
    "man": ("person",),
    "men": ("person",),
    "woman": ("person",),
    "women": ("person",),
    "child": ("person",),
    "children": ("person",),
    "kid": ("person",),
    "boy": ("person",),
    "girl": ("person",),
    "adult": ("person",),
    "driver": ("person",),
    "passenger": ("person",),
    "shopper": ("person",),
    "customer": ("person",),
    "worker": ("person",),
    "vehicle": ("car", "truck", "bus", "motorcycle"),
    "automobile": ("car",),
    "taxi": ("car",),
    "cab": ("car",),
    "sedan": ("car",),
    "suv": ("car",),
    "jeep": ("car",),
    "minivan": ("car",),
    "van": ("car", "truck"),
    "lorry": ("truck",),
    "pickup": ("truck",),
    "coach": ("bus",),
    "minibus": ("bus",),
    "tram": ("train",),
    "streetcar": ("train",),
    "locomotive": ("train",),
    "bike": ("bicycle",),
    "cyclist": ("bicycle",),
    "motorbike": ("motorcycle",),
    "motorcyclist": ("motorcycle",),
    "scooter": ("motorcycle",),
    "moped": ("motorcycle",),
    "plane": ("airplane",),
    "aeroplane": ("airplane",),
    "aircraft": ("airplane",),
    "airliner": ("airplane",),
    "ship": ("boat",),
    "sailboat": ("boat",),
    "canoe": ("boat",),
    "kayak": ("boat",),
    "ferry": ("boat",),
    "yacht": ("boat",),
    "traffic signal": ("traffic light",),
    "animal": ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"),
    "puppy": ("dog",),
    "kitten": ("cat",),
    "pony": ("horse",),
    "cattle": ("cow",),
    "lamb": ("sheep",),
    "sofa": ("couch",),
    "television": ("tv",),
    "monitor": ("tv",),
    "phone": ("cell phone",),
    "mobile phone": ("cell phone",),
    "smartphone": ("cell phone",),
    "cellphone": ("cell phone",),
    "fridge": ("refrigerator",),
    "table": ("dining table",),
    "plant": ("potted plant",),
    "houseplant": ("potted plant",),
    "purse": ("handbag",),
    "luggage": ("suitcase",),
    "ball": ("sports ball",),
    "doughnut": ("donut",),
    "hair dryer": ("hair drier",),
    "remote control": ("remote",),
    "racket": ("tennis racket",),
}

MOTIONS = ("constant-velocity", "last")


@dataclass(frozen=True)
class LabelCoverage:
    """How a task label list meets a detector's classes (see the module doc for the rules)."""

    class_to_label: dict[int, int]  # detector class id -> task label index
    grounded: tuple[int, ...]  # label indices some detector class maps to
    shadowed: tuple[int, ...]  # labels that resolve, but every class they reach goes to another label
    unknown: tuple[int, ...]  # labels the detector's classes cannot express


def _singulars(key: str) -> list[str]:
    out = [key]
    if len(key) > 3 and key.endswith("ies"):
        out.append(key[:-3] + "y")
    if len(key) > 2 and key.endswith("es"):
        out.append(key[:-2])
    if len(key) > 1 and key.endswith("s"):
        out.append(key[:-1])
    return out


def _resolve_label(key: str, by_name: dict[str, int]) -> tuple[tuple[str, ...], bool] | None:
    """(class names, exact) for a normalised label, or None; ``exact``: the label names the class."""
    for cand in _singulars(key):
        if cand in by_name:
            return (cand,), True
    for cand in _singulars(key):
        if cand in SYNONYMS and all(n in by_name for n in SYNONYMS[cand]):
            return SYNONYMS[cand], False
    return None


_PREPOSITIONS = frozenset({"of", "with", "on", "in", "at", "for", "from", "by", "under", "near", "behind", "inside"})


def _resolve_lenient(key: str, by_name: dict[str, int]) -> tuple[str, ...] | None:
    words = key.replace("-", " ").split()
    for i, w in enumerate(words):  # the head of "group of people" / "person with an umbrella" comes first
        if w in _PREPOSITIONS:
            words = words[:i]
            break
    if len(words) == 1:
        r = _resolve_label(words[0], by_name)
        return r[0] if r is not None else None
    for i in range(1, len(words)):  # longest trailing phrase first: "red fire hydrant" -> "fire hydrant"
        r = _resolve_label(" ".join(words[i:]), by_name)
        if r is not None:
            return r[0]
    return None


def label_coverage(labels: Sequence[str], classes: Sequence[str], *, strict: bool = True) -> LabelCoverage:
    """Maps task labels to detector classes (module doc). Raises ``ValueError`` for an empty list, a
    non-string, a duplicate, and with ``strict`` an unknown label; never for unknown labels otherwise."""
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise ValueError(f"labels must be a sequence of strings, got {type(labels).__name__} {labels!r}")
    if len(labels) == 0:
        raise ValueError("labels is empty: the task needs at least one label to ground (e.g. ['person', 'vehicle'])")
    by_name = {c.strip().lower(): i for i, c in enumerate(classes)}
    exact: list[tuple[int, tuple[str, ...]]] = []
    loose: list[tuple[int, tuple[str, ...]]] = []
    unknown: list[int] = []
    seen: set[str] = set()
    for k, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"labels[{k}] must be a non-empty string, got {label!r}")
        key = " ".join(label.split()).lower()
        if key in seen:
            raise ValueError(f"labels[{k}] {label!r} is a duplicate (labels: {list(labels)!r})")
        seen.add(key)
        r = _resolve_label(key, by_name)
        if r is not None:
            (exact if r[1] else loose).append((k, r[0]))
            continue
        if strict:
            valid = ", ".join(sorted(set(by_name) | set(SYNONYMS)))
            raise ValueError(f"unknown task label {label!r}: not a detector class or a known synonym "
                             f"(valid, case-insensitive, plurals accepted: {valid})")
        names = _resolve_lenient(key, by_name)
        if names is None:
            unknown.append(k)
        else:
            loose.append((k, names))
    out: dict[int, int] = {}
    for k, names in exact + sorted(loose):  # a label naming the class first, then list order
        for n in names:
            out.setdefault(by_name[n], k)
    grounded = sorted(set(out.values()))
    resolved = sorted(k for k, _ in exact + loose)
    return LabelCoverage(class_to_label=out, grounded=tuple(grounded),
                         shadowed=tuple(k for k in resolved if k not in out.values()), unknown=tuple(unknown))


def map_labels(labels: Sequence[str], classes: Sequence[str], *, strict: bool = True) -> dict[int, int]:
    """Detector class id -> task label index (module doc). Raises ``ValueError`` for an empty list, a
    non-string or a duplicate; with ``strict`` also for an unknown label. Not strict: unknown labels are
    skipped and logged once with a count; ``ValueError`` when no label at all can be grounded."""
    cov = label_coverage(labels, classes, strict=strict)
    if not strict:
        if not cov.class_to_label:
            shown = ", ".join(list(classes)[:20])
            raise ValueError(f"none of the {len(labels)} task labels can be grounded by the detector (its classes: "
                             f"{shown}{', ...' if len(classes) > 20 else ''}; synonyms: edge/grounding.py SYNONYMS)")
        if cov.unknown:
            names = [labels[k] for k in cov.unknown]
            log.info("the detector cannot ground %d of %d task labels (skipped): %s%s", len(names), len(labels),
                     ", ".join(names[:30]), ", ..." if len(names) > 30 else "")
    return cov.class_to_label


@dataclass
class _Track:
    track_id: int
    box: np.ndarray  # current (predicted or detected) x0,y0,x1,y1, float64
    label_id: int  # task label index
    class_id: int  # detector class id of the last detection
    score: float
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4))  # per frame
    last_det_box: np.ndarray | None = None
    last_det_frame: int = 0
    missed: int = 0  # detection runs in a row without a match


@dataclass(frozen=True)
class Grounding:
    """One frame's grounding result."""

    rois: list[Roi]  # packet ROIs: int pixels, margin added, clipped; label_id = task label index
    boxes: list[Box]  # wire boxes (FramePacket.edge_boxes): float pixels, clipped, no margin
    detected: bool  # whether the detector ran on this frame (False: tracked boxes)


class Grounder:
    """Grounds a task's labels on frames: detector every ``every`` frames, IoU tracking in between."""

    def __init__(self, *, labels: Sequence[str], detector: Detector, every: int = 5, max_missed: int = 2,
                 margin: int = 8, iou_match: float = 0.3, motion: str = "constant-velocity",
                 max_rois: int = 64, strict_labels: bool = True):
        """``strict_labels=False``: labels the detector cannot ground are skipped (logged once) instead of
        being an error; a task list from ``latentcast task`` (100+ labels) needs it with a closed-set detector."""
        for name, v, lo in (("every", every, 1), ("max_missed", max_missed, 0), ("margin", margin, 0),
                            ("max_rois", max_rois, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} {v!r} must be an integer >= {lo}")
        if max_rois > MAX_ROIS:
            raise ValueError(f"max_rois {max_rois!r} exceeds the packet limit {MAX_ROIS}")
        if isinstance(iou_match, bool) or not isinstance(iou_match, (int, float)) or not 0.0 < iou_match <= 1.0:
            raise ValueError(f"iou_match {iou_match!r} out of range (0 < value <= 1)")
        if motion not in MOTIONS:
            raise ValueError(f"motion {motion!r} is not one of {', '.join(MOTIONS)}")
        self.labels = list(labels)
        self.detector = detector
        self.strict_labels = bool(strict_labels)
        self.class_to_label = map_labels(self.labels, detector.labels, strict=self.strict_labels)
        self.every, self.max_missed, self.margin = every, max_missed, margin
        self.iou_match, self.motion, self.max_rois = float(iou_match), motion, max_rois
        self.detector_nms = float(getattr(detector, "nms_threshold", 0.45))  # per task label, after class mapping
        self._tracks: list[_Track] = []
        self._next_id = 0
        self.frame_index = 0  # frames seen
        self.detector_runs = 0
        via = {detector.labels[c]: self.labels[k] for c, k in sorted(self.class_to_label.items())}
        if len(self.labels) <= 16:
            log.info("grounding %s via detector classes %s, every %d frames", self.labels, via, every)
        else:
            log.info("grounding %d task labels (%d reached by detector classes) via %s, every %d frames",
                     len(self.labels), len(set(via.values())), via, every)

    def reset(self) -> None:
        """Forget all tracks (e.g. after a scene cut); the next frame runs the detector."""
        self._tracks.clear()
        self.frame_index = 0

    def __call__(self, rgb: np.ndarray) -> Grounding:
        return self.update(rgb)

    def update(self, rgb: np.ndarray) -> Grounding:
        """Ground one (H, W, 3) uint8 RGB frame."""
        h, w = rgb.shape[:2]
        detect = self.frame_index % self.every == 0
        if detect:
            self._detect(rgb)
            self.detector_runs += 1
        else:
            self._predict(w, h)
        self.frame_index += 1
        return self._output(w, h, detect)

    # ------------------------------------------------------------------ tracking

    def _detect(self, rgb: np.ndarray) -> None:
        h, w = rgb.shape[:2]
        # task-related labels only (DISCOVER Fig. 3): a detection whose class reaches no task label is no ROI
        dets = [(d, self.class_to_label[d.class_id]) for d in self.detector.detect(rgb)
                if d.class_id in self.class_to_label]
        det_boxes = np.array([[d.x0, d.y0, d.x1, d.y1] for d, _ in dets], dtype=np.float64).reshape(-1, 4)
        if len(dets) > 1:  # classes merged into one task label (car + truck -> vehicle): one box per object
            keep = nms(det_boxes, np.array([d.score for d, _ in dets]), self.detector_nms,
                       class_ids=np.array([k for _, k in dets]))
            dets, det_boxes = [dets[i] for i in keep], det_boxes[keep]
        matched_t: set[int] = set()
        matched_d: set[int] = set()
        if self._tracks and dets:
            self._predict(w, h)  # compare detections with where the tracks should be now
            tboxes = np.stack([t.box for t in self._tracks])
            iou = iou_matrix(tboxes, det_boxes)
            same = np.array([[t.label_id == k for _, k in dets] for t in self._tracks])
            # a pair matches on overlap, or when the detection's centre lies within the track's own size
            # of the track's centre: a narrow pedestrian walking sideways can leave its box between two
            # detector runs, and an unmatched track would linger as a ghost next to a new one
            tc = (tboxes[:, None, :2] + tboxes[:, None, 2:]) / 2
            dc = (det_boxes[None, :, :2] + det_boxes[None, :, 2:]) / 2
            size = np.maximum(tboxes[:, 2] - tboxes[:, 0], tboxes[:, 3] - tboxes[:, 1])[:, None]
            near = np.linalg.norm(tc - dc, axis=2) <= size
            ok = same & ((iou >= self.iou_match) | near)
            # best overlap first, then nearest centre
            score = np.where(ok, iou + 1.0 / (1.0 + np.linalg.norm(tc - dc, axis=2)), -1.0)
            for ti, di in sorted(np.argwhere(ok).tolist(), key=lambda p: -score[p[0], p[1]]):
                if ti in matched_t or di in matched_d:
                    continue
                matched_t.add(ti)
                matched_d.add(di)
                t, (d, _) = self._tracks[ti], dets[di]
                if t.last_det_box is not None and self.motion == "constant-velocity":
                    dt = max(1, self.frame_index - t.last_det_frame)
                    t.velocity = (det_boxes[di] - t.last_det_box) / dt
                t.box = det_boxes[di].copy()
                t.last_det_box, t.last_det_frame = t.box.copy(), self.frame_index
                t.score, t.class_id, t.missed = d.score, d.class_id, 0
        elif self._tracks:
            self._predict(w, h)
        kept = []
        for i, t in enumerate(self._tracks):
            if i not in matched_t:
                t.missed += 1
                if t.missed > self.max_missed:
                    continue
            kept.append(t)
        for di, (d, k) in enumerate(dets):
            if di not in matched_d:
                kept.append(_Track(track_id=self._next_id, box=det_boxes[di].copy(), label_id=k, class_id=d.class_id,
                                   score=d.score, last_det_box=det_boxes[di].copy(), last_det_frame=self.frame_index))
                self._next_id += 1
        self._tracks = kept

    def _predict(self, w: int, h: int) -> None:
        if self.motion == "last":
            return
        alive = []
        for t in self._tracks:
            t.box = t.box + t.velocity
            if t.box[2] <= 0 or t.box[3] <= 0 or t.box[0] >= w or t.box[1] >= h:
                continue  # left the frame
            alive.append(t)
        self._tracks = alive

    # ------------------------------------------------------------------ output

    def _output(self, w: int, h: int, detected: bool) -> Grounding:
        rois: list[Roi] = []
        boxes: list[Box] = []
        for t in sorted(self._tracks, key=lambda t: -t.score)[: self.max_rois]:
            x0, y0, x1, y1 = (float(v) for v in t.box)
            cx0, cy0, cx1, cy1 = max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)
            if cx1 <= cx0 or cy1 <= cy0:
                continue
            score = min(1.0, max(0.0, float(t.score)))
            m = self.margin
            rx0, ry0 = max(0, math.floor(cx0) - m), max(0, math.floor(cy0) - m)
            rx1, ry1 = min(w, math.ceil(cx1) + m), min(h, math.ceil(cy1) + m)
            if rx1 <= rx0 or ry1 <= ry0:
                continue
            rois.append(Roi(x0=rx0, y0=ry0, x1=rx1, y1=ry1, label_id=t.label_id, score=score))
            boxes.append(Box(x0=cx0, y0=cy0, x1=cx1, y1=cy1, label=self.labels[t.label_id], label_id=t.label_id,
                             score=score))
        return Grounding(rois=rois, boxes=boxes, detected=detected)
