"""proto.regions: changed cells -> the rectangles the edge's g_a and the cloud's g_s recompute."""

from __future__ import annotations

import numpy as np
import pytest

from latentcast.proto.regions import Region, change_regions, dilate


def _mask(shape, *cells):
    m = np.zeros(shape, dtype=bool)
    for r, c in cells:
        m[r, c] = True
    return m


def test_dilate_is_the_square_neighbourhood():
    rng = np.random.default_rng(0)
    m = rng.random((9, 13)) < 0.1
    for r in (0, 1, 2):
        want = np.zeros_like(m)
        for i, j in zip(*np.nonzero(m)):
            want[max(i - r, 0): i + r + 1, max(j - r, 0): j + r + 1] = True
        np.testing.assert_array_equal(dilate(m, r), want)


def test_no_change_no_region():
    assert change_regions(np.zeros((8, 8), dtype=bool), halo=3) == []


def test_one_cell_inside_and_at_the_border():
    (reg,) = change_regions(_mask((20, 30), (10, 12)), halo=3, max_fraction=1.0)
    assert reg == Region(inner=(10, 11, 12, 13), crop=(7, 14, 9, 16))
    assert reg.offset == (3, 3) and reg.crop_cells == 49
    (reg,) = change_regions(_mask((20, 30), (0, 29)), halo=3, grow=1, max_fraction=1.0)
    assert reg.inner == (0, 2, 28, 30) and reg.crop == (0, 5, 25, 30)  # clipped to the grid
    assert reg.offset == (0, 3)


def test_align_rounds_crops_up_inside_the_grid():
    (reg,) = change_regions(_mask((20, 32), (19, 0)), halo=3, align=4, max_fraction=1.0)
    R0, R1, C0, C1 = reg.crop
    assert (R1 - R0) % 4 == 0 and (C1 - C0) % 4 == 0
    assert R1 == 20 and C0 == 0 and R0 <= 16 and C1 >= 4  # grown inwards at the grid's edges
    with pytest.raises(ValueError, match="grid 20x30 is not a multiple of align 4"):
        change_regions(_mask((20, 30), (0, 0)), halo=1, align=4)


def test_far_changes_stay_apart_and_near_ones_merge():
    far = change_regions(_mask((30, 40), (2, 2), (25, 35)), halo=2, max_fraction=1.0)
    assert sorted(r.inner for r in far) == [(2, 3, 2, 3), (25, 26, 35, 36)]
    near = change_regions(_mask((30, 40), (10, 10), (10, 13)), halo=3, max_fraction=1.0)
    assert [r.inner for r in near] == [(10, 11, 10, 14)]  # one crop of both costs less than two
    # every changed cell is inside some region's inner box, and inner lies inside its crop
    rng = np.random.default_rng(1)
    m = rng.random((30, 40)) < 0.02
    regs = change_regions(m, halo=3, grow=1, max_fraction=1.0)
    cover = np.zeros_like(m)
    for r in regs:
        r0, r1, c0, c1 = r.inner
        R0, R1, C0, C1 = r.crop
        assert R0 <= r0 < r1 <= R1 and C0 <= c0 < c1 <= C1
        cover[r0:r1, c0:c1] = True
    assert cover[dilate(m, 1)].all()


def test_too_much_change_means_the_whole_grid():
    m = np.zeros((10, 10), dtype=bool)
    m[2:8, 2:8] = True
    assert change_regions(m, halo=2, max_fraction=0.6) is None
    assert change_regions(m, halo=0, max_fraction=0.6) is not None


@pytest.mark.parametrize("kw, msg", [({"halo": -1}, "halo -1"), ({"halo": 1, "grow": -2}, "grow -2"),
                                     ({"halo": 1, "align": 0}, "align 0")])
def test_bad_arguments_are_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        change_regions(_mask((8, 8), (1, 1)), **kw)
    with pytest.raises(ValueError, match=r"\(rows, cols\) mask, got shape \(8,\)"):
        change_regions(np.zeros(8, dtype=bool), halo=1)


def test_stage_regions_grow_by_the_reach_on_the_stage_grid_and_merge_when_cheaper():
    from latentcast.proto.regions import stage_regions

    shape = (256, 320)
    (reg,) = stage_regions([(32, 48, 64, 96)], reach=4, align=2, shape=shape)
    assert reg.inner == (28, 52, 60, 100) and reg.crop == (24, 56, 56, 104)
    (reg,) = stage_regions([(32, 48, 64, 96)], reach=16, align=16, shape=shape)
    assert reg.inner == (16, 64, 48, 112) and reg.crop == (0, 80, 32, 128)
    (reg,) = stage_regions([(0, 16, 304, 320)], reach=8, align=4, shape=shape)  # clipped at the frame's edges
    assert reg.inner == (0, 24, 296, 320) and reg.crop == (0, 32, 288, 320)
    far = stage_regions([(0, 16, 0, 16), (192, 208, 256, 272)], reach=4, align=2, shape=shape)
    assert len(far) == 2
    (near,) = stage_regions([(0, 16, 0, 16), (0, 16, 24, 40)], reach=4, align=2, shape=shape)
    assert near.inner == (0, 20, 0, 44)
    assert stage_regions([], reach=4, align=2, shape=shape) == []
    with pytest.raises(ValueError, match="multiple of align 16"):
        stage_regions([(0, 16, 0, 16)], reach=4, align=16, shape=(250, 320))
