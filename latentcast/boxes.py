"""Box geometry shared by the edge, the cloud and the tools: IoU and greedy one-to-one matching.

Boxes are ``x0, y0, x1, y1`` in pixels (exclusive right/bottom edges as floats); an empty or
inverted box has area 0 and IoU 0 with everything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["iou_matrix", "greedy_match"]


def iou_matrix(a: np.ndarray | Sequence, b: np.ndarray | Sequence) -> np.ndarray:
    """IoU of every box in ``a`` (N,4) with every box in ``b`` (M,4): an (N,M) float64 array."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)[:, None]
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)[None]
    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = w * h
    area_a = np.clip(a[..., 2] - a[..., 0], 0, None) * np.clip(a[..., 3] - a[..., 1], 0, None)
    area_b = np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
    return inter / np.maximum(area_a + area_b - inter, 1e-12)


def greedy_match(a: np.ndarray | Sequence, b: np.ndarray | Sequence, *, iou: float,
                 scores: Sequence[float] | None = None,
                 compatible: Callable[[int, int], bool] | None = None) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching of boxes ``a`` to boxes ``b``: each ``a`` box in descending ``scores``
    (given order without them) takes the unused ``b`` box of highest IoU among the ``compatible(i, j)``
    ones, if that IoU is at least ``iou``. Returns ``(i, j, iou)`` per match."""
    if not 0.0 <= iou <= 1.0:
        raise ValueError(f"iou threshold {iou!r} out of range 0..1")
    m = iou_matrix(a, b)
    order = range(m.shape[0]) if scores is None else np.argsort(-np.asarray(scores, dtype=np.float64),
                                                                  kind="stable")
    used = np.zeros(m.shape[1], dtype=bool)
    out: list[tuple[int, int, float]] = []
    for i in order:
        best, best_j = 0.0, -1
        for j in range(m.shape[1]):
            if not used[j] and m[i, j] > best and (compatible is None or compatible(int(i), j)):
                best, best_j = float(m[i, j]), j
        if best_j >= 0 and best >= iou:
            used[best_j] = True
            out.append((int(i), best_j, best))
    return out
