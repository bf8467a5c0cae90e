"""Analytics on the reconstructed frames: the detector interface and the detectors the cloud builds.

Any object with ``labels`` and ``detect(rgb) -> list[Detection]`` is a :class:`Detector` (tests
inject fakes). :func:`make_detector` builds one from :class:`~latentcast.cloud.config.AnalyticsConfig`:

- ``kind: yolox`` (default): :class:`latentcast.detector.YoloxDetector`, YOLOX-nano COCO from the
  shared folder unless ``model_path``/``labels_path`` say otherwise.
- ``kind: onnx``: :class:`OnnxBoxesDetector`, any ONNX detector that already decodes and
  suppresses its boxes (torchvision-style exports, YOLO "end-to-end" exports). Expected layout:

  * one input, float32 ``N x 3 x H x W`` (N = 1 or dynamic). The frame is letterboxed to
    ``H x W`` (resized by ``r = min(H/h, W/w)``, pasted top-left on a canvas of 114), channel
    order ``input_channels`` ("rgb" or "bgr"), values ``pixel * input_scale`` (default 1/255).
    H and W come from the model's static input shape, or ``input_height``/``input_width``.
  * three outputs, found by name (``boxes``, ``scores``, ``labels``; also ``det_boxes``,
    ``det_scores``, ``det_classes``, ``classes``) or else in that order:
    boxes ``[1,] K x 4`` float (x0, y0, x1, y1 in input pixels), scores ``[1,] K`` float in
    0..1, labels ``[1,] K`` integer class ids indexing the label file.
  * no NMS is applied here; boxes below ``score_threshold`` are dropped, the rest mapped back
    to frame pixels (divided by r) and clipped to the frame.
- ``kind: none``: :class:`NullDetector`, no analytics (frames are still decoded and published).

``keep_classes`` wraps the detector in :class:`ClassFilter` (class names must exist in the
detector's label list; an unknown name is an error that lists the valid ones).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from latentcast.detector import Detection, letterbox
from latentcast.onnx_runtime import ort_session

from .config import AnalyticsConfig

log = logging.getLogger(__name__)

__all__ = ["Detection", "Detector", "NullDetector", "ClassFilter", "OnnxBoxesDetector", "make_detector"]

_OUTPUT_NAMES = {
    "boxes": ("boxes", "det_boxes", "bboxes"),
    "scores": ("scores", "det_scores", "confidences"),
    "labels": ("labels", "det_classes", "classes", "class_ids"),
}


@runtime_checkable
class Detector(Protocol):
    """Detects objects in an (H, W, 3) uint8 RGB frame; boxes in frame pixels, best first."""

    labels: Sequence[str]

    def detect(self, rgb: np.ndarray) -> list[Detection]: ...


class NullDetector:
    """No analytics: every frame has no detections."""

    labels: Sequence[str] = ()

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        return []


class ClassFilter:
    """Keeps only the detections whose label is in ``keep`` (names from ``detector.labels``)."""

    def __init__(self, detector: Detector, *, keep: Iterable[str]) -> None:
        keep = list(dict.fromkeys(keep))
        known = set(detector.labels)
        unknown = [k for k in keep if k not in known]
        if unknown:
            shown = ", ".join(list(detector.labels)[:100])
            raise ValueError(f"analytics.keep_classes {unknown} not among the detector's classes ({shown})")
        self.inner = detector
        self.keep = frozenset(keep)
        self.labels = detector.labels

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        return [d for d in self.inner.detect(rgb) if d.label in self.keep]


def _read_labels(path: str | Path) -> list[str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"detector label file {p} not found (analytics.labels_path)")
    return [s.strip() for s in p.read_text().splitlines() if s.strip()]


class OnnxBoxesDetector:
    """A generic ONNX detector with decoded boxes/scores/labels outputs (layout in the module doc)."""

    def __init__(self, *, model_path: str | Path, labels_path: str | Path, score_threshold: float = 0.3,
                 input_size: tuple[int, int] | None = None, input_channels: str = "rgb",
                 input_scale: float = 1.0 / 255.0, threads: int = 0) -> None:
        p = Path(model_path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"detector model {p} not found (analytics.model_path)")
        if input_channels not in ("rgb", "bgr"):
            raise ValueError(f"input_channels {input_channels!r} must be 'rgb' or 'bgr'")
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold {score_threshold!r} out of range 0..1")
        self.model_path = p
        self.labels: list[str] = _read_labels(labels_path)
        self.score_threshold = float(score_threshold)
        self.input_channels = input_channels
        self.input_scale = float(input_scale)
        self._sess = ort_session(p, threads=threads)
        inputs = self._sess.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"{p}: expected one input, the model has {[i.name for i in inputs]}")
        inp = inputs[0]
        self._input_name = inp.name
        shape = list(inp.shape)
        if len(shape) != 4 or shape[1] not in (3, "3"):
            raise ValueError(f"{p}: expected an Nx3xHxW input, got {shape}")
        if input_size is None:
            if not all(isinstance(d, int) and d > 0 for d in shape[2:]):
                raise ValueError(f"{p}: the input size is dynamic ({shape}); set analytics.input_height and "
                                 "analytics.input_width")
            input_size = (int(shape[2]), int(shape[3]))
        self.input_size: tuple[int, int] = input_size  # (height, width)
        self._out_index = self._map_outputs([o.name for o in self._sess.get_outputs()])

    def _map_outputs(self, names: list[str]) -> dict[str, int]:
        if len(names) < 3:
            raise ValueError(f"{self.model_path}: expected boxes, scores and labels outputs, got {names}")
        lower = [n.lower() for n in names]
        found = {}
        for key, cands in _OUTPUT_NAMES.items():
            for c in cands:
                if c in lower:
                    found[key] = lower.index(c)
                    break
        if len(found) == 3:
            return found
        return {"boxes": 0, "scores": 1, "labels": 2}

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"frame must be an (H, W, 3) uint8 RGB array, got {getattr(rgb, 'shape', rgb)!r}")
        h, w = rgb.shape[:2]
        img = rgb if self.input_channels == "rgb" else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        canvas, r = letterbox(img, self.input_size)
        x = np.ascontiguousarray(canvas.transpose(2, 0, 1)[None], dtype=np.float32) * np.float32(self.input_scale)
        outs = self._sess.run(None, {self._input_name: x})
        boxes = np.asarray(outs[self._out_index["boxes"]], dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(outs[self._out_index["scores"]], dtype=np.float64).reshape(-1)
        labels = np.asarray(outs[self._out_index["labels"]]).reshape(-1).astype(np.int64)
        if not (len(boxes) == len(scores) == len(labels)):
            raise ValueError(f"{self.model_path.name}: outputs disagree on the box count "
                             f"(boxes {len(boxes)}, scores {len(scores)}, labels {len(labels)})")
        out = []
        for i in np.argsort(-scores, kind="stable"):
            s, c = float(scores[i]), int(labels[i])
            if s < self.score_threshold or not 0 <= c < len(self.labels):
                continue
            x0, y0, x1, y1 = (boxes[i] / r).tolist()
            x0, x1 = min(max(x0, 0.0), w), min(max(x1, 0.0), w)
            y0, y1 = min(max(y0, 0.0), h), min(max(y1, 0.0), h)
            if x1 > x0 and y1 > y0:
                out.append(Detection(x0=x0, y0=y0, x1=x1, y1=y1, class_id=c, label=self.labels[c], score=s))
        return out


def make_detector(cfg: AnalyticsConfig) -> Detector:
    """The detector ``cfg`` describes (loads its model; may raise FileNotFoundError naming the file)."""
    if cfg.kind == "none":
        det: Detector = NullDetector()
    elif cfg.kind == "yolox":
        from latentcast.detector import YoloxDetector

        det = YoloxDetector(model_path=cfg.model_path or None, labels_path=cfg.labels_path or None,
                            score_threshold=cfg.score_threshold, nms_threshold=cfg.nms_threshold,
                            threads=cfg.threads)
    elif cfg.kind == "onnx":
        if not cfg.model_path or not cfg.labels_path:
            raise ValueError("analytics.kind 'onnx' needs analytics.model_path and analytics.labels_path")
        size = (cfg.input_height, cfg.input_width) if cfg.input_height > 0 and cfg.input_width > 0 else None
        det = OnnxBoxesDetector(model_path=cfg.model_path, labels_path=cfg.labels_path,
                                score_threshold=cfg.score_threshold, input_size=size,
                                input_channels=cfg.input_channels, input_scale=cfg.input_scale,
                                threads=cfg.threads)
    else:
        raise ValueError(f"analytics.kind {cfg.kind!r} is not one of yolox, onnx, none")
    if cfg.keep_classes:
        det = ClassFilter(det, keep=cfg.keep_classes)
    log.info("analytics: %s%s", type(det).__name__ if not isinstance(det, ClassFilter) else type(det.inner).__name__,
             f" keeping {sorted(cfg.keep_classes)}" if cfg.keep_classes else "")
    return det
