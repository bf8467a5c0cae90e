"""Open-vocabulary detection on the edge: an exported Grounding DINO bundle through ONNX Runtime
(numpy + onnxruntime + OpenCV; no torch, no transformers).

The bundle (written by ``latentcast.models.grounding_dino.export_grounding``)::

    image.onnx     the image side; text tensors are inputs (see the models module for the layout)
    text.npz       the label list's text side, one row per chunk (computed once, where PyTorch is)
    manifest.json  format, image size, normalisation, labels, each chunk's label token spans, thresholds

Per frame::

    RGB ─► resize by r = min(H/h, W/w), paste top-left on an H x W canvas (zero after normalisation),
           pixel_mask = 1 on the image ─► per text chunk: image.onnx ─► sigmoid(logits) (Q, T)
    ─► per label: score = max over its token span; per query: best label
    ─► keep if the query's max over all caption tokens > box_threshold and its label score > text_threshold
    ─► cx,cy,w,h (relative to the image region) ─► frame pixels, clipped ─► all chunks ─► class-aware NMS

``class_id`` indexes :attr:`OpenVocabDetector.labels` (the task labels, in order), so the detector plugs
into :class:`latentcast.edge.grounding.Grounder` like the YOLOX one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np

from latentcast.detector import Detection, nms
from latentcast.onnx_runtime import ort_session
from latentcast.proto.symbols import check_frame
from latentcast.shared import file_sha256

log = logging.getLogger(__name__)

__all__ = ["OpenVocabDetector", "BUNDLE_FORMAT", "PROVIDERS", "preprocess", "postprocess_chunk"]

BUNDLE_FORMAT = "latentcast-grounding-1"
PROVIDERS = ("cpu", "cuda", "tensorrt")
_TEXT_KEYS = ("text_features", "text_token_mask", "text_self_attention_mask", "position_ids")


def preprocess(rgb: np.ndarray, size: tuple[int, int], mean, std) -> tuple[np.ndarray, np.ndarray]:
    """(pixel_values (1,3,H,W) float32, pixel_mask (1,H,W) int64) for an RGB uint8 frame: aspect kept,
    image at the top-left, zero padding after normalisation (as transformers' processor pads)."""
    ih, iw = size
    h, w = rgb.shape[:2]
    r = min(ih / h, iw / w)
    nw, nh = min(iw, max(1, round(w * r))), min(ih, max(1, round(h * r)))
    interp = cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR  # area averaging when shrinking (antialiased)
    img = cv2.resize(rgb, (nw, nh), interpolation=interp) if (nw, nh) != (w, h) else rgb
    x = (img.astype(np.float32) * np.float32(1 / 255) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    pixel_values = np.zeros((1, 3, ih, iw), np.float32)
    pixel_values[0, :, :nh, :nw] = x.transpose(2, 0, 1)
    pixel_mask = np.zeros((1, ih, iw), np.int64)
    pixel_mask[0, :nh, :nw] = 1
    return pixel_values, pixel_mask


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))  # -inf (padding) -> 0


def postprocess_chunk(logits: np.ndarray, boxes: np.ndarray, spans, label_ids, *, box_threshold: float,
                      text_threshold: float, frame_size: tuple[int, int]):
    """One chunk's (Q,T) logits and (Q,4) cx,cy,w,h boxes ─► (boxes x0,y0,x1,y1 in frame pixels (N,4),
    scores (N,), task label ids (N,)), one per query at most, before NMS."""
    h, w = frame_size
    probs = _sigmoid(logits)  # (Q, T)
    query_max = probs.max(axis=1)
    label_scores = np.stack([probs[:, s:e].max(axis=1) for s, e in spans], axis=1)  # (Q, L)
    best = label_scores.argmax(axis=1)
    score = label_scores[np.arange(len(best)), best]
    keep = (query_max > box_threshold) & (score > text_threshold)
    cx, cy, bw, bh = (boxes[keep].astype(np.float64) * np.array([w, h, w, h])).T
    xyxy = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1).reshape(-1, 4)
    xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, w)
    xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, h)
    ids = np.asarray(label_ids, dtype=np.int64)[best[keep]]
    ok = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    return xyxy[ok], score[keep][ok], ids[ok]




def _check_unit(name: str, v, *, open_low: bool = False) -> float:
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or not ((0.0 < v <= 1.0) if open_low else (0.0 <= v <= 1.0))
    ):
        raise ValueError(f"{name} {v!r} out of range ({'0 < value <= 1' if open_low else '0 <= value <= 1'})")
    return float(v)


class OpenVocabDetector:
    """Grounding DINO from an exported bundle: ``detect(rgb)`` → :class:`Detection` list, ``class_id``
    indexing :attr:`labels`. ``provider``: "cpu" (everywhere), "cuda" or "tensorrt" (ONNX Runtime's
    execution providers, when this onnxruntime build has them; the TensorRT engine is cached in
    ``trt_cache`` or ``<bundle>/trt_cache``)."""

    def __init__(self, *, bundle: str | Path, box_threshold: float | None = None,
                 text_threshold: float | None = None, nms_threshold: float = 0.5, threads: int = 0,
                 provider: str = "cpu", trt_fp16: bool = True, trt_cache: str | Path | None = None,
                 verify: bool = True):
        import onnxruntime as ort

        self.bundle = Path(bundle).expanduser()
        man_path = self.bundle / "manifest.json"
        if not man_path.is_file():
            raise FileNotFoundError(f"grounding bundle {self.bundle}: manifest.json not found (export one with "
                                    "latentcast.models.grounding_dino.export_grounding)")
        try:
            man = json.loads(man_path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{man_path}: not readable JSON ({exc})") from None
        if not isinstance(man, dict) or man.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"{man_path}: format {man.get('format') if isinstance(man, dict) else None!r} "
                             f"is not {BUNDLE_FORMAT!r}")
        for f in ("image.onnx", "text.npz"):
            p = self.bundle / f
            if not p.is_file():
                raise FileNotFoundError(f"grounding bundle {self.bundle}: {f} missing")
            want = man.get("files", {}).get(f)
            if verify and want and file_sha256(p) != want:
                raise ValueError(f"{p}: sha256 differs from the manifest (a partial copy, or files of two exports)")
        self.manifest = man
        self.labels: list[str] = [str(s) for s in man["labels"]]
        self.box_threshold = _check_unit("box_threshold",
                                         man.get("box_threshold", 0.35) if box_threshold is None else box_threshold)
        self.text_threshold = _check_unit("text_threshold",
                                          man.get("text_threshold", 0.25) if text_threshold is None else text_threshold)
        self.nms_threshold = _check_unit("nms_threshold", nms_threshold, open_low=True)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ValueError(f"threads {threads!r} must be an integer >= 0 (0 = ONNX Runtime's default)")
        if provider not in PROVIDERS:
            raise ValueError(f"provider {provider!r} is not one of {', '.join(PROVIDERS)}")
        self.input_size: tuple[int, int] = (int(man["image_size"][0]), int(man["image_size"][1]))
        self.mean = np.asarray(man["mean"], np.float32)
        self.std = np.asarray(man["std"], np.float32)

        with np.load(self.bundle / "text.npz") as z:
            text = {k: z[k] for k in _TEXT_KEYS}
        n_chunks = len(man["chunks"])
        self._chunks = []
        covered = []
        T = int(man["max_text_len"])
        for i, c in enumerate(man["chunks"]):
            spans = [(int(s), int(e)) for s, e in c["spans"]]
            ids = [int(k) for k in c["labels"]]
            if len(spans) != len(ids) or not spans or any(not 0 < s < e <= T for s, e in spans) \
                    or any(not 0 <= k < len(self.labels) for k in ids):
                raise ValueError(f"{man_path}: chunk {i} has bad spans {spans} or label ids {ids}")
            covered += ids
            feeds = {"text_features": text["text_features"][i:i + 1].astype(np.float32),
                     "text_token_mask": text["text_token_mask"][i:i + 1].astype(bool),
                     "text_self_attention_mask": text["text_self_attention_mask"][i:i + 1].astype(bool),
                     "position_ids": text["position_ids"][i:i + 1].astype(np.int64)}
            self._chunks.append((feeds, spans, ids))
        if sorted(covered) != list(range(len(self.labels))) or any(len(v) != n_chunks for v in text.values()):
            raise ValueError(f"{man_path}: chunks do not cover the {len(self.labels)} labels once each, or text.npz "
                             f"has not {n_chunks} rows")

        self.provider = provider
        self._sess = ort_session(self.bundle / "image.onnx", threads=threads,
                                 providers=self._providers(ort, provider, trt_fp16, trt_cache))
        names = [i.name for i in self._sess.get_inputs()]
        if names != ["pixel_values", "pixel_mask", *_TEXT_KEYS]:
            raise ValueError(f"{self.bundle / 'image.onnx'}: inputs {names} are not a grounding image graph's")
        log.debug("grounding bundle %s: %s, %dx%d, %d labels, %d chunk(s), %s", self.bundle, man.get("model"),
                  *self.input_size, len(self.labels), n_chunks, self._sess.get_providers()[0])

    def _providers(self, ort, provider: str, trt_fp16: bool, trt_cache):
        avail = ort.get_available_providers()
        if provider == "cpu":
            return ["CPUExecutionProvider"]
        if provider == "cuda":
            if "CUDAExecutionProvider" not in avail:
                raise RuntimeError(f"provider 'cuda': this onnxruntime has no CUDAExecutionProvider (available: "
                                   f"{', '.join(avail)}); install onnxruntime-gpu on a CUDA machine, or use 'cpu'")
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if "TensorrtExecutionProvider" not in avail:
            raise RuntimeError(f"provider 'tensorrt': TensorRT is not available in this onnxruntime (available: "
                               f"{', '.join(avail)}); it needs onnxruntime-gpu built with TensorRT, TensorRT and a "
                               "CUDA GPU. The 'cpu' provider works everywhere")
        cache = Path(trt_cache) if trt_cache is not None else self.bundle / "trt_cache"
        cache.mkdir(parents=True, exist_ok=True)
        opts = {"trt_fp16_enable": bool(trt_fp16), "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache)}
        return [("TensorrtExecutionProvider", opts), "CUDAExecutionProvider", "CPUExecutionProvider"]

    def raw(self, rgb: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per chunk, the graph's (logits (Q,T), pred_boxes (Q,4)) for a frame."""
        pv, pm = preprocess(rgb, self.input_size, self.mean, self.std)
        out = []
        for feeds, _, _ in self._chunks:
            logits, boxes = self._sess.run(None, {"pixel_values": pv, "pixel_mask": pm, **feeds})
            out.append((logits[0], boxes[0]))
        return out

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Objects in an (H, W, 3) uint8 RGB frame, best score first; boxes in frame pixels, clipped."""
        check_frame(rgb)
        h, w = rgb.shape[:2]
        boxes, scores, ids = [], [], []
        for (logits, pred), (_, spans, label_ids) in zip(self.raw(rgb), self._chunks):
            b, s, c = postprocess_chunk(logits, pred, spans, label_ids, box_threshold=self.box_threshold,
                                        text_threshold=self.text_threshold, frame_size=(h, w))
            boxes.append(b)
            scores.append(s)
            ids.append(c)
        boxes, scores, ids = np.concatenate(boxes), np.concatenate(scores), np.concatenate(ids)
        if len(boxes) == 0:
            return []
        keep = nms(boxes, scores, self.nms_threshold, class_ids=ids)
        return [Detection(x0=float(boxes[i, 0]), y0=float(boxes[i, 1]), x1=float(boxes[i, 2]), y1=float(boxes[i, 3]),
                          class_id=int(ids[i]), label=self.labels[int(ids[i])], score=float(scores[i])) for i in keep]
