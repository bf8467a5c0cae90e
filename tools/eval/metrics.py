"""Metrics of ``latentcast eval``: image fidelity, machine-task accuracy, and rate-quality curves.

Fidelity (reconstruction against the original, both RGB uint8 of the same shape):

- :func:`psnr`: ``10 log10(1 / MSE)`` on pixels scaled to [0, 1] (peak 255), the MSE floored at
  1e-10, so identical images give 100 dB (the CompressAI convention).
- :func:`ms_ssim`: multi-scale SSIM (Wang, Simoncelli & Bovik 2003) exactly as pytorch_msssim
  computes it (and so CompressAI's evaluation): an 11-tap Gaussian window (sigma 1.5), K1 0.01,
  K2 0.03, data range 255, "valid" filtering (no padded border), five scales with weights
  (0.0448, 0.2856, 0.3001, 0.2363, 0.1333) and 2x2 average pooling between them (an odd side gets
  a zero row/column in front, divided by 4 all the same: torch's ``avg_pool2d(padding=1)``). The
  contrast-structure term ``cs`` is used at the four finer scales, the full SSIM at the coarsest;
  each is clamped at 0 before its power; the product is taken per channel and the channels are
  averaged. Both sides need at least :data:`MS_SSIM_MIN_SIDE` (161) pixels. :func:`ssim` is the
  single-scale SSIM with the same window and constants.

Machine-task accuracy:

- :func:`detection_map`: COCO box mAP through pycocotools (``COCOeval``, ``iouType="bbox"``,
  101-point interpolated precision, at most 100 detections per image and class, crowd boxes
  ignored): ``map50`` is AP at IoU 0.5, ``map`` the mean AP over IoU 0.50:0.05:0.95, both
  averaged over the scored classes that have ground truth, plus AP50 per class.
- :class:`Classifier` and :func:`top1_agreement`: an ImageNet MobileNet-v2 (quantized tflite)
  top-1 class on the original and on the reconstruction; the agreement is the fraction of frames
  on which they are the same class (no labels needed: the original's prediction is the reference).

Rate-quality curves (points are ``(rate, quality)``, rate > 0, e.g. bits per pixel):

- :func:`pareto_front`: the points no cheaper point matches or beats in quality.
- :func:`bd_rate`: Bjøntegaard delta rate, the average rate difference (percent, negative: the test
  codec needs fewer bits) at equal quality, over the quality interval both curves cover
  (:func:`bd_overlap`). Each curve's Pareto front is interpolated piecewise-cubically (PCHIP,
  monotone, so no overshoot between points) as log-rate over quality, the gap between the two
  integrated exactly over the interval, and the mean gap ``d`` reported as ``(exp(d) - 1) * 100``.
- :func:`bd_quality`: the same with the axes swapped: the mean quality gain at equal rate, over the
  log-rate interval both curves cover, in the quality's own units.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:
    from latentcast.detector import Detection
    from latentcast.tools.eval.data import GtBox

log = logging.getLogger(__name__)

__all__ = [
    "MS_SSIM_MIN_SIDE",
    "MS_SSIM_WEIGHTS",
    "Classifier",
    "bd_overlap",
    "bd_quality",
    "bd_rate",
    "detection_map",
    "ms_ssim",
    "pareto_front",
    "psnr",
    "ssim",
    "top1_agreement",
]

_EXTRA = 'pip install -e ".[eval]"'

# SSIM constants (Wang et al. 2004) and the MS-SSIM scale weights (Wang et al. 2003)
SSIM_WIN = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 255.0
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_MIN_SIDE = (SSIM_WIN - 1) * 2 ** (len(MS_SSIM_WEIGHTS) - 1) + 1  # 161: pytorch_msssim needs > 160
PSNR_MSE_FLOOR = 1e-10  # on [0, 1] pixels: caps PSNR at 100 dB


def _need(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{what} needs {module.split('.')[0]} ({exc}); install the eval extra: {_EXTRA}") from exc


# ------------------------------------------------------------------------------------------ fidelity


def _pair(a: np.ndarray, b: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim not in (2, 3) or x.size == 0:
            desc = f"{type(x).__name__} {getattr(x, 'shape', '')} {getattr(x, 'dtype', '')}".rstrip()
            raise ValueError(f"{what}: {name} must be a non-empty (H, W) or (H, W, C) uint8 image, got {desc}")
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ: {a.shape} vs {b.shape}")
    return a, b


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images of the same shape (peak 255; identical images: 100 dB)."""
    a, b = _pair(a, b, "psnr")
    d = a.astype(np.float64) - b.astype(np.float64)
    mse = float(np.mean(d * d)) / (DATA_RANGE * DATA_RANGE)
    return -10.0 * math.log10(max(mse, PSNR_MSE_FLOOR))


def _gauss_window() -> np.ndarray:
    x = np.arange(SSIM_WIN, dtype=np.float64) - SSIM_WIN // 2
    g = np.exp(-(x * x) / (2.0 * SSIM_SIGMA**2))
    return g / g.sum()


_WINDOW = _gauss_window()


def _filt(x: np.ndarray) -> np.ndarray:
    """Gaussian filtering of a 2-D float64 plane, "valid" part only (the border of half a window cropped)."""
    r = SSIM_WIN // 2
    y = cv2.sepFilter2D(x, cv2.CV_64F, _WINDOW, _WINDOW, borderType=cv2.BORDER_REFLECT)
    return y[r:-r, r:-r]


def _ssim_cs(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean SSIM, mean contrast-structure term) of two 2-D float64 planes on the 0-255 scale."""
    c1 = (SSIM_K1 * DATA_RANGE) ** 2
    c2 = (SSIM_K2 * DATA_RANGE) ** 2
    mu1, mu2 = _filt(x), _filt(y)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    s1 = _filt(x * x) - mu1_sq
    s2 = _filt(y * y) - mu2_sq
    s12 = _filt(x * y) - mu12
    cs_map = (2.0 * s12 + c2) / (s1 + s2 + c2)
    ssim_map = (2.0 * mu12 + c1) / (mu1_sq + mu2_sq + c1) * cs_map
    return float(ssim_map.mean()), float(cs_map.mean())


def _pool2(x: np.ndarray) -> np.ndarray:
    """2x2 average pooling as torch ``avg_pool2d(kernel 2, padding = side % 2)``: an odd side gets a zero
    row/column in front (the one behind is never reached) and every window is divided by 4."""
    h, w = x.shape
    if h % 2 or w % 2:
        x = np.pad(x, ((h % 2, 0), (w % 2, 0)))
    return 0.25 * (x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2])


def _planes(a: np.ndarray) -> list[np.ndarray]:
    a = a.astype(np.float64)
    return [a] if a.ndim == 2 else [np.ascontiguousarray(a[:, :, c]) for c in range(a.shape[2])]


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Single-scale SSIM of two uint8 images (window 11, sigma 1.5, valid part), averaged over channels."""
    a, b = _pair(a, b, "ssim")
    if min(a.shape[:2]) < SSIM_WIN:
        raise ValueError(f"ssim: image {a.shape[1]}x{a.shape[0]} is smaller than the {SSIM_WIN}-px window")
    return float(np.mean([_ssim_cs(x, y)[0] for x, y in zip(_planes(a), _planes(b))]))


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """MS-SSIM of two uint8 images (pytorch_msssim's definition, data range 255), averaged over channels.

    Both sides must be at least :data:`MS_SSIM_MIN_SIDE` pixels."""
    a, b = _pair(a, b, "ms_ssim")
    h, w = a.shape[:2]
    if min(h, w) < MS_SSIM_MIN_SIDE:
        raise ValueError(f"ms_ssim: image {w}x{h} is too small: {len(MS_SSIM_WEIGHTS)} scales of an {SSIM_WIN}-px "
                         f"window need at least {MS_SSIM_MIN_SIDE} px on each side")
    per_channel = []
    for x, y in zip(_planes(a), _planes(b)):
        val = 1.0
        for i, wgt in enumerate(MS_SSIM_WEIGHTS):
            s, cs = _ssim_cs(x, y)
            if i < len(MS_SSIM_WEIGHTS) - 1:
                val *= max(cs, 0.0) ** wgt
                x, y = _pool2(x), _pool2(y)
            else:
                val *= max(s, 0.0) ** wgt
        per_channel.append(val)
    return float(np.mean(per_channel))


# ------------------------------------------------------------------------------------------ detection


def _box_xywh(b: Any, what: str, image_id: int) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in (b.x0, b.y0, b.x1, b.y1))
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        raise ValueError(f"{what} on image {image_id}: box ({x0}, {y0}, {x1}, {y1}) needs finite coordinates "
                         "with x1 > x0 and y1 > y0")
    return [x0, y0, x1 - x0, y1 - y0]


def _class_ids(class_ids: Sequence[int], class_names: Sequence[str] | None) -> tuple[list[int], list[str | int]]:
    if isinstance(class_ids, (str, bytes)) or not isinstance(class_ids, Sequence):
        raise ValueError(f"class_ids must be a sequence of class ids, got {class_ids!r}")
    ids = list(class_ids)
    if not ids:
        raise ValueError("class_ids is empty: give at least one class to score")
    for c in ids:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0:
            raise ValueError(f"class id {c!r} in class_ids must be an integer >= 0")
    ids = [int(c) for c in ids]
    if len(set(ids)) != len(ids):
        raise ValueError(f"class_ids {ids} has duplicates")
    if class_names is None:
        return ids, list(ids)
    names = list(class_names)
    if len(names) != len(ids):
        raise ValueError(f"class_names has {len(names)} names for {len(ids)} class_ids {ids}")
    if len(set(names)) != len(names):
        raise ValueError(f"class_names {names} has duplicates")
    return ids, names


def _ap(prec: np.ndarray) -> float | None:
    """The mean of a COCOeval precision slice over its defined entries (COCOeval's -1: no ground truth)."""
    v = prec[prec > -1]
    return float(v.mean()) if v.size else None


def detection_map(gt: Mapping[int, Sequence[GtBox]], pred: Mapping[int, Sequence[Detection]], *,
                  class_ids: Sequence[int], class_names: Sequence[str] | None = None) -> dict:
    """COCO box mAP of ``pred`` against ``gt``, both keyed by image id, over the classes ``class_ids``.

    Every key of ``gt`` is an evaluated image (an empty list: an image without objects, where every
    prediction is a false positive); ``pred`` may lack images (no detections there) but must not
    have images ``gt`` lacks. Boxes and predictions of other classes are ignored. Returns::

        {"map50": AP at IoU 0.5, "map": AP at IoU 0.50:0.95 (None for both without ground truth),
         "gt_boxes": ground-truth boxes of the scored classes (crowd boxes not counted),
         "pred_boxes": predictions of the scored classes,
         "per_class_ap50": {class name (or id without class_names): AP50, None without ground truth}}
    """
    ids, names = _class_ids(class_ids, class_names)
    for k in gt:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ValueError(f"gt image id {k!r} must be an integer")
    extra = set(pred) - set(gt)
    if extra:
        shown = ", ".join(repr(k) for k in sorted(extra, key=repr)[:5])
        raise ValueError(f"pred has {len(extra)} image id(s) not in gt: {shown}{', ...' if len(extra) > 5 else ''}")
    scored = set(ids)
    img_ids = sorted(int(k) for k in gt)
    gt_anns: list[dict] = []
    for k in img_ids:
        for b in gt[k]:
            xywh = _box_xywh(b, "ground-truth box", k)
            if int(b.class_id) in scored:
                gt_anns.append({"id": len(gt_anns) + 1, "image_id": k, "category_id": int(b.class_id), "bbox": xywh,
                                "area": xywh[2] * xywh[3], "iscrowd": int(bool(b.iscrowd))})
    dt_anns: list[dict] = []
    for k in sorted(int(k) for k in pred):
        for d in pred[k]:
            xywh = _box_xywh(d, "detection", k)
            score = float(d.score)
            if not math.isfinite(score):
                raise ValueError(f"detection on image {k}: score {d.score!r} is not finite")
            if int(d.class_id) in scored:
                dt_anns.append({"image_id": k, "category_id": int(d.class_id), "bbox": xywh, "score": score})
    n_gt = sum(1 for a in gt_anns if not a["iscrowd"])
    out: dict[str, Any] = {"map50": None, "map": None, "gt_boxes": n_gt, "pred_boxes": len(dt_anns),
                           "per_class_ap50": {n: None for n in names}}
    if n_gt == 0:
        log.debug("detection_map: no ground-truth box of classes %s on %d images", ids, len(img_ids))
        return out

    coco_mod = _need("pycocotools.coco", "detection_map")
    eval_mod = _need("pycocotools.cocoeval", "detection_map")
    cats = [{"id": c, "name": str(n)} for c, n in zip(ids, names)]
    images = [{"id": k} for k in img_ids]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco_mod.COCO()
        coco_gt.dataset = {"info": {}, "licenses": [], "images": images, "annotations": gt_anns, "categories": cats}
        coco_gt.createIndex()
        if dt_anns:
            coco_dt = coco_gt.loadRes(dt_anns)
        else:  # loadRes fails on an empty list; an empty result set scores AP 0 where there is ground truth
            coco_dt = coco_mod.COCO()
            coco_dt.dataset = {"info": {}, "licenses": [], "images": list(images), "annotations": [],
                               "categories": cats}
            coco_dt.createIndex()
        ev = eval_mod.COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.catIds = list(ids)
        ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
    p = ev.params
    prec = ev.eval["precision"]  # [IoU thresholds, recall points, classes (p.catIds order), area ranges, maxDets]
    t50 = int(np.flatnonzero(np.isclose(p.iouThrs, 0.5))[0])
    a_all = p.areaRngLbl.index("all")
    m_max = len(p.maxDets) - 1  # 100 detections (maxDets sorted by evaluate)
    out["map"] = _ap(prec[:, :, :, a_all, m_max])
    out["map50"] = _ap(prec[t50, :, :, a_all, m_max])
    name_of = dict(zip(ids, names))
    for j, c in enumerate(p.catIds):
        out["per_class_ap50"][name_of[int(c)]] = _ap(prec[t50, :, j, a_all, m_max])
    log.debug("detection_map: %d images, %d gt, %d pred boxes: map50 %s, map %s", len(img_ids), n_gt, len(dt_anns),
              out["map50"], out["map"])
    return out


# ------------------------------------------------------------------------------------------ rate-quality curves


def _points(points: Sequence[tuple[float, float]], what: str) -> list[tuple[float, float]]:
    out = []
    for pt in points:
        try:
            r, q = (float(v) for v in pt)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: point {pt!r} is not a (rate, quality) pair of numbers") from None
        if not (math.isfinite(r) and math.isfinite(q)):
            raise ValueError(f"{what}: point {pt!r} is not finite")
        out.append((r, q))
    return out


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (rate, quality) points, by increasing rate, whose quality is strictly higher than that of
    every point of lower rate (of points with the same rate, only the best can stay)."""
    pts = sorted(_points(points, "pareto_front"), key=lambda p: (p[0], -p[1]))
    front: list[tuple[float, float]] = []
    for r, q in pts:
        if not front or q > front[-1][1]:
            front.append((r, q))
    return front


def _front(points: Sequence[tuple[float, float]], what: str) -> tuple[np.ndarray, np.ndarray]:
    pts = _points(points, what)
    bad = [p for p in pts if p[0] <= 0]
    if bad:
        raise ValueError(f"{what}: rates must be > 0 (log scale), got {bad[0]!r}")
    front = pareto_front(pts)
    return np.log([r for r, _ in front]), np.array([q for _, q in front], dtype=np.float64)


def _bd(anchor, test, *, over_quality: bool, what: str) -> tuple[float, float, float] | None:
    """(low, high, mean test-minus-anchor gap) of the PCHIP curves over the shared interval of x, where
    x is quality and the curve log-rate (``over_quality``), or x is log-rate and the curve quality."""
    (lra, qa), (lrt, qt) = _front(anchor, f"{what} anchor"), _front(test, f"{what} test")
    if len(qa) < 2 or len(qt) < 2:
        return None
    (xa, ya), (xt, yt) = ((qa, lra), (qt, lrt)) if over_quality else ((lra, qa), (lrt, qt))
    lo, hi = max(xa[0], xt[0]), min(xa[-1], xt[-1])  # fronts increase in both rate and quality
    if not hi > lo:
        return None
    interp = _need("scipy.interpolate", what).PchipInterpolator
    gap = (float(interp(xt, yt).integrate(lo, hi)) - float(interp(xa, ya).integrate(lo, hi))) / (hi - lo)
    return float(lo), float(hi), gap


def bd_rate(anchor: Sequence[tuple[float, float]], test: Sequence[tuple[float, float]]) -> float | None:
    """Bjøntegaard delta rate of ``test`` against ``anchor`` in percent (negative: fewer bits for the same
    quality); None when a Pareto front has fewer than 2 points or the quality ranges do not overlap."""
    r = _bd(anchor, test, over_quality=True, what="bd_rate")
    return None if r is None else (math.exp(r[2]) - 1.0) * 100.0


def bd_quality(anchor: Sequence[tuple[float, float]], test: Sequence[tuple[float, float]]) -> float | None:
    """Bjøntegaard delta quality: the mean quality gain of ``test`` over ``anchor`` at equal rate (over the
    shared log-rate range); None when a Pareto front has fewer than 2 points or the rates do not overlap."""
    r = _bd(anchor, test, over_quality=False, what="bd_quality")
    return None if r is None else r[2]


def bd_overlap(
    anchor: Sequence[tuple[float, float]], test: Sequence[tuple[float, float]]
) -> tuple[float, float] | None:
    """The quality interval :func:`bd_rate` averages over, or None where it returns None."""
    r = _bd(anchor, test, over_quality=True, what="bd_overlap")
    return None if r is None else (r[0], r[1])


# ------------------------------------------------------------------------------------------ classification


class Classifier:
    """ImageNet top-1 class of a frame by a tflite classifier (default: the shared quantized
    MobileNet-v2 1.0/224, 1001 classes with "background" at index 0, and its label file).

    The whole frame is resized (``INTER_AREA``, no crop) to the model's input size; a uint8 model
    gets the pixels as they are (its input quantization maps 0..255 to its [-1, 1) range), a float32
    model ``pixel / 127.5 - 1``."""

    def __init__(self, *, model_path: str | Path | None = None, labels_path: str | Path | None = None,
                 threads: int = 1):
        from latentcast.detector import _resolve

        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads {threads!r} must be an integer >= 1")
        self.model_path = _resolve(model_path, "mobilenet_v2_1.0_224_quant.tflite", "classifier model")
        self.labels_path = _resolve(labels_path, "imagenet_labels.txt", "classifier label file")
        self.labels: list[str] = [s.strip() for s in self.labels_path.read_text().splitlines() if s.strip()]
        Interpreter = _need("ai_edge_litert.interpreter", "Classifier").Interpreter
        self._interp = Interpreter(model_path=str(self.model_path), num_threads=threads)
        self._interp.allocate_tensors()
        inp = self._interp.get_input_details()[0]
        outp = self._interp.get_output_details()[0]
        shape = [int(d) for d in inp["shape"]]
        if len(shape) != 4 or shape[0] != 1 or shape[3] != 3 or min(shape[1:3]) < 1:
            raise ValueError(f"{self.model_path}: expected a 1xHxWx3 input, got {shape}")
        self._dtype = np.dtype(inp["dtype"])
        if self._dtype not in (np.dtype(np.uint8), np.dtype(np.float32)):
            raise ValueError(f"{self.model_path}: input type {self._dtype} is not supported (uint8 or float32)")
        self.input_size: tuple[int, int] = (shape[1], shape[2])  # (height, width)
        self._in_index, self._out_index = inp["index"], outp["index"]
        n_out = int(np.prod(outp["shape"]))
        if n_out != len(self.labels):
            raise ValueError(f"{self.labels_path}: {len(self.labels)} labels but the model {self.model_path.name} "
                             f"has {n_out} outputs")
        log.debug("classifier %s: input %dx%d %s, %d classes", self.model_path.name, shape[1], shape[2], self._dtype,
                  n_out)

    def top1(self, rgb: np.ndarray) -> int:
        """The index (into :attr:`labels`) of the best class of an (H, W, 3) uint8 RGB frame."""
        if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 \
                or rgb.shape[0] < 1 or rgb.shape[1] < 1:
            desc = f"{type(rgb).__name__} {getattr(rgb, 'shape', '')} {getattr(rgb, 'dtype', '')}"
            raise ValueError(f"frame must be an (H, W, 3) uint8 RGB array, got {desc}")
        ih, iw = self.input_size
        x = cv2.resize(rgb, (iw, ih), interpolation=cv2.INTER_AREA) if rgb.shape[:2] != (ih, iw) else rgb
        if self._dtype == np.float32:
            x = x.astype(np.float32) / 127.5 - 1.0
        self._interp.set_tensor(self._in_index, np.ascontiguousarray(x[None], dtype=self._dtype))
        self._interp.invoke()
        return int(np.argmax(self._interp.get_tensor(self._out_index).reshape(-1)))


def top1_agreement(ref: Sequence[int], test: Sequence[int]) -> float:
    """The fraction of positions where ``test`` has the same class as ``ref`` (equal, non-empty lengths)."""
    if len(ref) != len(test):
        raise ValueError(f"top1_agreement: {len(ref)} reference classes but {len(test)} test classes")
    if not ref:
        raise ValueError("top1_agreement: no classes to compare (both lists are empty)")
    return float(np.mean([int(r) == int(t) for r, t in zip(ref, test)]))
