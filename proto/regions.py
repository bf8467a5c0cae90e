"""Changed cells -> the rectangles to recompute (numpy only; the edge's g_a and the cloud's g_s use it).

A convolutional transform's output at a cell depends only on the inputs within its receptive field,
so after a change it is enough to recompute the changed cells, each rectangle cut out with a
``halo`` of cells around it so the cells inside see exactly the inputs they would see in the whole
frame::

    changed (rows, cols) bool ─► grow by ``grow`` cells ─► connected groups ─► bounding boxes
        ─► each box + ``halo`` (clipped to the grid; sizes rounded up to ``align`` cells, inside the grid)
        ─► two boxes are merged while one crop of both costs no more than their two crops
        ─► [Region(inner, crop)], or None when the crops cover ``max_fraction`` of the grid (then the
           whole frame is cheaper: one call, no halo)

``inner`` is what the caller writes back; ``crop`` is what it runs the transform on.

:func:`stage_regions` does the same in pixels for one stage of a transform cut into stages (the edge's
g_a, ``edge/change.py``): what changed in its input, grown by the stage's reach, is what changes in its
output, and the crop carries that reach again, so each stage costs what changed at its own resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Region", "dilate", "components", "change_regions", "stage_regions", "SYNTHESIS_HALO", "SYNTHESIS_GROW",
           "RENDER_RUNTIMES"]

# the cloud's defaults for re-rendering changed cells with g_s (models/temporal.py; cloud.yaml codec.render_*)
SYNTHESIS_HALO = 3  # cells of ŷ around a re-rendered rectangle that g_s sees (beyond 3 a cell moves < 1 grey level)
SYNTHESIS_GROW = 0  # cells around every changed cell that are re-rendered too (1: 18 % more render, same mAP)
# where g_s runs for temporal renders (models/synthesis_runtime.py): ONNX Runtime, torch, torch in bfloat16;
# auto: bf16 on a CPU with native bfloat16, else onnx
RENDER_RUNTIMES = ("auto", "onnx", "torch", "bf16")


@dataclass(frozen=True)
class Region:
    """Cells [r0, r1) x [c0, c1) to write back (``inner``) and the crop to compute them from (``crop``)."""

    inner: tuple[int, int, int, int]  # r0, r1, c0, c1
    crop: tuple[int, int, int, int]  # R0, R1, C0, C1, containing inner

    @property
    def offset(self) -> tuple[int, int]:
        """Where ``inner`` starts inside ``crop`` (rows, cols)."""
        return self.inner[0] - self.crop[0], self.inner[2] - self.crop[2]

    @property
    def crop_cells(self) -> int:
        R0, R1, C0, C1 = self.crop
        return (R1 - R0) * (C1 - C0)


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """``mask`` grown by ``r`` cells in every direction (a (2r+1) x (2r+1) square)."""
    m = np.asarray(mask, dtype=bool)
    if r <= 0 or not m.any():
        return m.copy()
    rows, cols = m.shape
    p = np.pad(m, r)
    out = np.zeros_like(m)
    for dr in range(2 * r + 1):  # separable: rows, then columns
        out |= p[dr: dr + rows, r: r + cols]
    p = np.pad(out, r)
    out = np.zeros_like(m)
    for dc in range(2 * r + 1):
        out |= p[r: r + rows, dc: dc + cols]
    return out


def components(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (r0, r1, c0, c1) of the 8-connected groups of ``mask``."""
    rows, cols = mask.shape
    seen = np.zeros_like(mask)
    boxes = []
    for r, c in zip(*np.nonzero(mask)):
        if seen[r, c]:
            continue
        seen[r, c] = True
        stack, r0, r1, c0, c1 = [(r, c)], r, r, c, c
        while stack:
            i, j = stack.pop()
            r0, r1, c0, c1 = min(r0, i), max(r1, i), min(c0, j), max(c1, j)
            for a in range(max(i - 1, 0), min(i + 2, rows)):
                for b in range(max(j - 1, 0), min(j + 2, cols)):
                    if mask[a, b] and not seen[a, b]:
                        seen[a, b] = True
                        stack.append((a, b))
        boxes.append((int(r0), int(r1) + 1, int(c0), int(c1) + 1))
    return boxes


def _span(lo: int, hi: int, halo: int, n: int, align: int) -> tuple[int, int]:
    """[lo - halo, hi + halo) clipped to [0, n), its length rounded up to a multiple of ``align``
    by growing it inwards at the grid's edges (``n`` must be a multiple of ``align``)."""
    a, b = max(lo - halo, 0), min(hi + halo, n)
    length = min(-(-(b - a) // align) * align, n)
    if b - a < length:
        b = min(a + length, n)
        a = b - length
    return a, b


def _crop(box: tuple[int, int, int, int], halo: int, shape: tuple[int, int], align: int) -> tuple[int, int, int, int]:
    r0, r1, c0, c1 = box
    return (*_span(r0, r1, halo, shape[0], align), *_span(c0, c1, halo, shape[1], align))


def _cells(box: tuple[int, int, int, int]) -> int:
    return (box[1] - box[0]) * (box[3] - box[2])


def change_regions(changed: np.ndarray, *, halo: int, grow: int = 0, align: int = 1,
                   max_fraction: float = 0.6) -> list[Region] | None:
    """The regions to recompute after the cells ``changed`` (rows, cols) changed: ``[]`` when none did,
    None when the crops would cover at least ``max_fraction`` of the grid (recompute everything).

    ``grow``: cells around each changed cell that are written back too (their outputs moved with it);
    ``halo``: the cells a crop needs around what it writes back (the transform's receptive field);
    ``align``: crop sizes are multiples of this many cells (a graph that pads its input to a multiple).
    """
    changed = np.asarray(changed, dtype=bool)
    if changed.ndim != 2:
        raise ValueError(f"changed must be a (rows, cols) mask, got shape {changed.shape}")
    if halo < 0 or grow < 0 or align < 1:
        raise ValueError(f"halo {halo} and grow {grow} must be >= 0, align {align} >= 1")
    shape = changed.shape
    if shape[0] % align or shape[1] % align:
        raise ValueError(f"grid {shape[0]}x{shape[1]} is not a multiple of align {align}")
    if not changed.any():
        return []
    regions = _merged(components(dilate(changed, grow)), lambda b: _crop(b, halo, shape, align))
    if sum(r.crop_cells for r in regions) >= max_fraction * shape[0] * shape[1]:
        return None
    return regions


def _merged(boxes: list[tuple[int, int, int, int]], crop_of) -> list[Region]:
    """Regions of ``boxes`` (inner) and ``crop_of(box)``; two boxes are merged while one crop of both costs
    no more than their two crops."""
    boxes = list(boxes)
    crops = [crop_of(b) for b in boxes]
    merged = True
    while merged and len(boxes) > 1:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                union = (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]))
                crop = crop_of(union)
                if _cells(crop) <= _cells(crops[i]) + _cells(crops[j]):
                    boxes[i], crops[i] = union, crop
                    del boxes[j], crops[j]
                    merged = True
                    break
            if merged:
                break
    return [Region(inner=b, crop=c) for b, c in zip(boxes, crops)]


def _grow(box: tuple[int, int, int, int], by: int, align: int, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """``box`` (pixels) grown by ``by`` on every side, out to multiples of ``align``, clipped to ``shape``."""
    y0, y1, x0, x1 = box
    return (max(0, (y0 - by) // align * align), min(shape[0], -(-(y1 + by) // align) * align),
            max(0, (x0 - by) // align * align), min(shape[1], -(-(x1 + by) // align) * align))


def stage_regions(dirty: list[tuple[int, int, int, int]], *, reach: int, align: int,
                  shape: tuple[int, int]) -> list[Region]:
    """One stage of a staged transform after its input changed inside the rectangles ``dirty``: the
    regions whose ``inner`` (the outputs that may change: ``dirty`` grown by ``reach``) is recomputed
    from ``crop`` (``inner`` grown by ``reach`` again, so ``inner`` sees the whole frame's inputs).

    All in frame pixels (y0, y1, x0, x1); ``align``: the stage's output stride (rectangles lie on its
    grid); ``shape``: the frame's (H, W), multiples of ``align``. ``inner`` of the result is the next
    stage's ``dirty``."""
    if reach < 0 or align < 1 or shape[0] % align or shape[1] % align:
        raise ValueError(f"reach {reach} must be >= 0 and the frame {shape[0]}x{shape[1]} a multiple of "
                         f"align {align} >= 1")
    inner = [_grow(b, reach, align, shape) for b in dirty]
    return _merged(inner, lambda b: _grow(b, reach, align, shape))
