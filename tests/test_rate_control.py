"""The edge's rate-control ladders (no torch)."""

from __future__ import annotations

import pytest

from latentcast.edge.rate_control import RateController, background_ladder


def test_background_ladder_coarsens_the_background_first():
    assert background_ladder(2, 1) == ((2, 1), (2, 0), (2, None), (1, None), (0, None))
    assert background_ladder(1, None) == ((1, None), (0, None))
    assert background_ladder(0, 0) == ((0, 0), (0, None))
    for bad in ((1, 2), (-1, None), (2, -1)):
        with pytest.raises(ValueError, match=r"needs 0 <= background <= rate point"):
            background_ladder(*bad)


def test_rate_controller_walks_the_ladder_both_ways():
    ladder = background_ladder(2, 1)
    rc = RateController(target_kbps=8 * 10 * 1000 / 1000, fps=10.0, level=0, levels=ladder)  # 1000 B/frame
    seen = [rc.update(5000) for _ in range(30)]  # 5x the budget: down to the coarsest level, never past it
    assert seen[-1] == (0, None) and rc.level == len(ladder) - 1
    assert [lv for i, lv in enumerate(seen) if i == 0 or lv != seen[i - 1]] == list(ladder)
    for _ in range(200):  # far below the budget: back up to the configured level, never above it
        rc.update(10)
    assert rc.level == 0 and rc.levels[rc.level] == (2, 1)
