"""YOLOX object detector through ONNX Runtime (numpy + onnxruntime + OpenCV; no torch).

Used by the edge (grounding task labels to boxes) and by the cloud (analytics on the
reconstruction). The default model is the shared YOLOX-nano COCO export::

    RGB frame (H,W,3 uint8) ─► BGR, resize by r = min(S_h/H, S_w/W), paste at the top-left of an
    S_h x S_w canvas filled with 114 (the YOLOX reference ``preproc``) ─► float32 1x3xS_hxS_w, 0-255
    ─► model ─► (1, A, 5 + C): per anchor (x, y, log w, log h, objectness, C class scores), the
    scores already through a sigmoid
    ─► decode (YOLOX ``demo_postprocess``): xy = (out_xy + grid) * stride, wh = exp(out_wh) * stride
    ─► score = objectness * best class score ─► threshold ─► class-aware NMS ─► boxes / r, clipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from latentcast.boxes import iou_matrix
from latentcast.onnx_runtime import ort_session
from latentcast.proto.symbols import check_frame
from latentcast.shared import ENV_VAR, shared_path

log = logging.getLogger(__name__)

__all__ = ["Detection", "Detector", "YoloxDetector", "nms", "letterbox", "detector_model_path", "STRIDES", "PAD_VALUE"]

STRIDES = (8, 16, 32)  # YOLOX head strides, in the model's anchor order
PAD_VALUE = 114  # letterbox fill value of the YOLOX reference preprocessing


@dataclass(frozen=True)
class Detection:
    """One detected object; box in frame pixels (float, x1 > x0, y1 > y0, inside the frame)."""

    x0: float
    y0: float
    x1: float
    y1: float
    class_id: int
    label: str
    score: float


@runtime_checkable
class Detector(Protocol):
    """What the edge's grounding needs from any backend (closed-set YOLOX, the exported open-vocabulary
    Grounding DINO on ONNX Runtime or TensorRT): its class names, and frame -> labelled boxes."""

    labels: list[str]  # class names; Detection.class_id indexes this list

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Objects in an (H, W, 3) uint8 RGB frame, boxes in frame pixels."""
        ...


def _resolve(path: str | Path | None, default_name: str, what: str) -> Path:
    if path is None or str(path) == "":
        try:
            return shared_path("models", default_name)
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"{what} models/{default_name} not found in the shared folder ({exc}); set {ENV_VAR} "
                f"to the folder holding models/{default_name} or pass the file explicitly"
            ) from None
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p} not found (pass an existing file, or leave it unset to use "
                                f"models/{default_name} from the shared folder set by {ENV_VAR})")
    return p


def detector_model_path(path: str | Path | None = None) -> Path:
    """The detector ONNX file: ``path``, or the shared YOLOX-nano when it is None or empty."""
    return _resolve(path, "yolox_nano.onnx", "detector model")


def letterbox(bgr: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """The YOLOX reference ``preproc``: resize by ``r = min(h_in/H, w_in/W)`` and paste at the
    top-left of a ``size`` = (h_in, w_in) canvas filled with 114. Returns (canvas uint8, r)."""
    ih, iw = size
    h, w = bgr.shape[:2]
    r = min(ih / h, iw / w)
    nw, nh = max(1, int(w * r)), max(1, int(h * r))
    canvas = np.full((ih, iw, 3), PAD_VALUE, dtype=np.uint8)
    resized = cv2.resize(bgr, (nw, nh), interpolation=cv2.INTER_LINEAR) if (nw, nh) != (w, h) else bgr
    canvas[:nh, :nw] = resized
    return canvas, r


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float,
        class_ids: np.ndarray | None = None) -> np.ndarray:
    """Greedy non-maximum suppression on (N,4) x0,y0,x1,y1 boxes; indices kept, best score first.
    With ``class_ids``, boxes of different classes never suppress each other."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    if class_ids is not None:  # offset each class into its own region: no cross-class overlap
        span = float(boxes.max() - min(boxes.min(), 0.0)) + 1.0
        boxes = boxes + (np.asarray(class_ids, dtype=np.float64).reshape(-1, 1) * span)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        iou = iou_matrix(boxes[i:i + 1], boxes[rest])[0]
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


class YoloxDetector:
    """A YOLOX ONNX model (default: the shared YOLOX-nano COCO export) with its label file."""

    def __init__(self, *, model_path: str | Path | None = None, labels_path: str | Path | None = None,
                 score_threshold: float = 0.3, nms_threshold: float = 0.45, threads: int = 0):
        for name, v, lo_open in (("score_threshold", score_threshold, False), ("nms_threshold", nms_threshold, True)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                    (0.0 < v <= 1.0) if lo_open else (0.0 <= v <= 1.0)):
                rng = "0 < value <= 1" if lo_open else "0 <= value <= 1"
                raise ValueError(f"{name} {v!r} out of range ({rng})")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ValueError(f"threads {threads!r} must be an integer >= 0 (0 = ONNX Runtime's default)")
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.model_path = detector_model_path(model_path)
        self.labels_path = _resolve(labels_path, "coco80_labels.txt", "detector label file")
        self.labels: list[str] = [s.strip() for s in self.labels_path.read_text().splitlines() if s.strip()]

        self._sess = ort_session(self.model_path, threads=threads)
        inp = self._sess.get_inputs()[0]
        self._input_name = inp.name
        shape = list(inp.shape)
        if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[2:]) or shape[1] not in (3, "3"):
            raise ValueError(f"{self.model_path}: expected a fixed 1x3xHxW input, got {shape}")
        self.input_size: tuple[int, int] = (int(shape[2]), int(shape[3]))  # (height, width)
        ih, iw = self.input_size
        grids, strides = [], []
        for s in STRIDES:
            hs, ws = ih // s, iw // s
            xv, yv = np.meshgrid(np.arange(ws), np.arange(hs))
            grids.append(np.stack((xv, yv), axis=2).reshape(-1, 2))
            strides.append(np.full((hs * ws, 1), s))
        self._grid = np.concatenate(grids).astype(np.float32)
        self._stride = np.concatenate(strides).astype(np.float32)
        out = self._sess.get_outputs()[0].shape
        n_anchor = len(self._grid)
        if isinstance(out[1], int) and out[1] != n_anchor:
            raise ValueError(f"{self.model_path}: output has {out[1]} anchors, expected {n_anchor} for input "
                             f"{ih}x{iw} and strides {STRIDES}")
        if isinstance(out[2], int) and out[2] - 5 != len(self.labels):
            raise ValueError(f"{self.labels_path}: {len(self.labels)} labels but the model {self.model_path.name} "
                             f"has {out[2] - 5} classes")
        log.debug("YOLOX %s: input %dx%d, %d classes", self.model_path.name, ih, iw, len(self.labels))

    def _raw(self, rgb: np.ndarray) -> tuple[np.ndarray, float]:
        canvas, r = letterbox(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), self.input_size)
        x = np.ascontiguousarray(canvas.transpose(2, 0, 1)[None], dtype=np.float32)
        (out,) = self._sess.run(None, {self._input_name: x})
        return out[0], r

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Objects in an (H, W, 3) uint8 RGB frame, best score first; boxes in frame pixels, clipped."""
        check_frame(rgb)
        h, w = rgb.shape[:2]
        out, r = self._raw(rgb)
        cls_scores = out[:, 5:]
        cls = cls_scores.argmax(axis=1)
        scores = out[:, 4] * cls_scores[np.arange(len(cls)), cls]
        sel = np.flatnonzero(scores >= self.score_threshold)
        if sel.size == 0:
            return []
        xy = (out[sel, :2] + self._grid[sel]) * self._stride[sel]
        wh = np.exp(out[sel, 2:4]) * self._stride[sel]
        boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1) / r
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, sc, cl = boxes[ok], scores[sel][ok], cls[sel][ok]
        keep = nms(boxes, sc, self.nms_threshold, class_ids=cl)
        return [Detection(x0=float(boxes[i, 0]), y0=float(boxes[i, 1]), x1=float(boxes[i, 2]), y1=float(boxes[i, 3]),
                          class_id=int(cl[i]), label=self.labels[int(cl[i])], score=float(sc[i])) for i in keep]
