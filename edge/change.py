"""g_a where the frame changed: the edge's analysis of a fixed camera costs what moved (no torch).

::

    frame ─► pad to 64 ─► per 16x16 cell: mean |frame - reference| over its pixels and channels
          ─► changed = cells above ``threshold`` grey levels ─► reference[changed cells] = frame
          ─► proto.regions.change_regions(changed, halo = the bundle's analysis_halo)
               None (most of the frame) ─► reference = frame, analysis.onnx on the whole frame
               regions ─► analysis.onnx on each crop of the reference ─► y[inner cells] = crop's y
          ─► y (M, rows, cols): the last y of every cell

What is exact: the cells written back are the whole-frame g_a of the reference, bit for bit (a crop
carries ``analysis_halo`` cells of context, g_a's receptive field, and lies on the 16-pixel grid),
and the reference equals the frame on every cell that changed by more than ``threshold``. What is not:
cells next to a changed cell keep their last y although their receptive field moved (their own pixels
did not), and changes under ``threshold`` (sensor noise, compression flicker) are not analysed until
they add up. The temporal encoder then codes y exactly as before; the cloud's state follows the edge's
through the symbols it sends, so nothing here can make edge and cloud disagree.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import cv2
import numpy as np

from latentcast.edge.encoder import pad_frame
from latentcast.proto.regions import change_regions

log = logging.getLogger(__name__)

__all__ = ["ChangeAnalyzer", "cell_change"]

STRIDE = 16  # pixels per y cell

Analyze = Callable[..., tuple[np.ndarray, np.ndarray]]  # (frame, *, pad_to=64) -> (y, z)


def cell_change(a: np.ndarray, b: np.ndarray, stride: int = STRIDE) -> np.ndarray:
    """Mean absolute difference per ``stride`` x ``stride`` cell of two (H, W, 3) uint8 frames whose sides
    are multiples of ``stride``: (H / stride, W / stride) float32 grey levels."""
    h, w = a.shape[:2]
    d = cv2.absdiff(a, b)
    return cv2.resize(d, (w // stride, h // stride), interpolation=cv2.INTER_AREA).astype(np.float32).mean(axis=2)


class ChangeAnalyzer:
    """``analyze(frame)`` -> (y, z, changed cells): g_a only on the cells that changed since they were last
    analysed. ``z`` is that of the last whole-frame analysis (a P frame does not send it); ``full=True``
    analyses the whole frame (a keyframe's y and z) and resets the reference.

    ``analyze``: the bundle's analysis (``EdgeEncoder.analyze``, taking ``pad_to``); ``halo``: its
    ``analysis_halo`` (cells); ``threshold``: mean absolute change in grey levels for a cell to be
    analysed again; ``max_fraction``: above this share of the frame in crops, analyse it whole.
    """

    def __init__(self, analyze: Analyze, *, halo: int, threshold: float = 2.0, max_fraction: float = 0.5) -> None:
        if isinstance(halo, bool) or not isinstance(halo, int) or halo < 0:
            raise ValueError(f"halo {halo!r} must be an integer >= 0 (the bundle's analysis_halo)")
        if not threshold > 0:
            raise ValueError(f"threshold {threshold!r} must be > 0 grey levels")
        if not 0.0 < max_fraction <= 1.0:
            raise ValueError(f"max_fraction {max_fraction!r} out of range (0, 1]")
        self._analyze, self.halo, self.threshold, self.max_fraction = analyze, halo, float(threshold), max_fraction
        self.reference: np.ndarray | None = None  # padded (H, W, 3) uint8: the frame g_a last saw, cell by cell
        self.y: np.ndarray | None = None
        self.z: np.ndarray | None = None
        self.counts = {"whole": 0, "regions": 0, "unchanged": 0, "crop_cells": 0, "changed_cells": 0}
        self.last_whole = False  # whether the last analyze() ran the whole frame (its y and z are fresh)

    def reset(self) -> None:
        """Forget the reference: the next frame is analysed whole."""
        self.reference = self.y = self.z = None

    def _whole(self, padded: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        self.reference = padded.copy()
        self.y, self.z = self._analyze(padded)
        self.counts["whole"] += 1
        self.last_whole = True
        return self.y, self.z, np.ones(self.y.shape[1:], dtype=bool)

    def analyze(self, frame: np.ndarray, *, full: bool = False) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frame must be (H, W, 3) uint8 RGB, got shape {frame.shape} {frame.dtype}")
        padded = pad_frame(frame)
        self.last_whole = False
        if full or self.reference is None or self.reference.shape != padded.shape:
            return self._whole(padded)
        changed = cell_change(padded, self.reference) > self.threshold
        n = int(changed.sum())
        if n == 0:
            self.counts["unchanged"] += 1
            return self.y, self.z, changed
        regions = change_regions(changed, halo=self.halo, max_fraction=self.max_fraction)
        if regions is None:
            return self._whole(padded)
        pixels = np.repeat(np.repeat(changed, STRIDE, axis=0), STRIDE, axis=1)
        np.copyto(self.reference, padded, where=pixels[..., None])
        y = self.y.copy()  # the caller may hold the previous y
        for reg in regions:
            R0, R1, C0, C1 = reg.crop
            r0, r1, c0, c1 = reg.inner
            dr, dc = reg.offset
            crop = self.reference[R0 * STRIDE: R1 * STRIDE, C0 * STRIDE: C1 * STRIDE]
            crop_y, _ = self._analyze(crop, pad_to=STRIDE)  # on the cell grid already: no padding
            y[:, r0:r1, c0:c1] = crop_y[:, dr: dr + r1 - r0, dc: dc + c1 - c0]
            self.counts["crop_cells"] += reg.crop_cells
        self.y = y
        self.counts["regions"] += 1
        self.counts["changed_cells"] += n
        return y, self.z, changed
