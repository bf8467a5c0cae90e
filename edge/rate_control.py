"""Rate control on the edge: a leaky bucket that steps along a ladder of coding levels (no torch).

::

    bytes of each packet ─► bucket (drains target_kbps) ─► above +window: one level coarser
                                                          below -window: one level finer

Two ladders, finest first:

- temporal coding (:data:`TEMPORAL_LEVELS`): rate point and threshold of the ROI cells of P frames,
  keyframe rate point, refresh period factor;
- independent frames (:func:`background_ladder`): ``(rate point, background)`` pairs from the
  configured level down. The background is coarsened first, then dropped (ROI-only), and only then
  the ROIs: the cells the analytics need keep their quality longest (ROI-QP rate control).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["RateController", "TEMPORAL_LEVELS", "background_ladder"]

# temporal ladder, finest first: (rate point of ROI cells, nonzero symbols for a ROI cell to be re-coded,
# at most this keyframe rate point, refresh period x this factor)
TEMPORAL_LEVELS: tuple[tuple[int, int, int, int], ...] = (
    (2, 1, 2, 1), (1, 1, 2, 1), (1, 4, 2, 1), (0, 1, 2, 1), (0, 4, 1, 2), (0, 12, 1, 2), (0, 32, 0, 4))


def background_ladder(rate_point: int, background: int | None) -> tuple[tuple[int, int | None], ...]:
    """Levels ``(rate point, background rate point or None)`` for independent frames, finest first: the
    configured one, the background one rate point coarser at a time, no background, then the ROIs one
    rate point coarser at a time (``background_ladder(2, 1)`` = (2,1), (2,0), (2,None), (1,None), (0,None))."""
    if rate_point < 0 or (background is not None and not 0 <= background <= rate_point):
        raise ValueError(f"level ({rate_point}, {background}) needs 0 <= background <= rate point")
    out: list[tuple[int, int | None]] = []
    if background is not None:
        out += [(rate_point, b) for b in range(background, -1, -1)]
    out += [(q, None) for q in range(rate_point, -1, -1)]
    return tuple(out)


@dataclass
class RateController:
    """A leaky bucket on the stream's bytes: too many bytes -> a coarser level of ``levels`` (finest first:
    :data:`TEMPORAL_LEVELS` for temporal coding, :func:`background_ladder` for independent frames).

    The bucket drains ``target_kbps`` and fills with every packet; above +window it steps one level
    coarser, below -window one finer (the window is ``window_s`` seconds of the target rate)."""

    target_kbps: float
    fps: float
    level: int = 3
    window_s: float = 2.0
    levels: tuple[tuple, ...] = TEMPORAL_LEVELS
    fill: float = field(default=0.0, init=False)  # bytes above the target so far

    def __post_init__(self) -> None:
        if not self.target_kbps > 0 or not self.fps > 0:
            raise ValueError(f"rate control needs target_kbps > 0 and fps > 0 (got {self.target_kbps}, {self.fps})")
        self.level = min(max(self.level, 0), len(self.levels) - 1)

    @property
    def budget(self) -> float:
        """Bytes per frame at the target rate."""
        return self.target_kbps * 1000 / 8 / self.fps

    def update(self, n_bytes: int) -> tuple:
        window = self.window_s * self.fps * self.budget
        self.fill = min(max(self.fill + n_bytes - self.budget, -window), 4 * window)
        if self.fill >= window and self.level < len(self.levels) - 1:
            self.level += 1
            self.fill = 0.0
        elif self.fill <= -window and self.level > 0:
            self.level -= 1
            self.fill = 0.0
        return self.levels[self.level]
