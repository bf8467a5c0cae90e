"""The development-set and ROI-failure tools: the helpers their numbers rest on.

The ROI-failure analysis is an experiment script (``tools/experiments/``, not installed): loaded by path.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from latentcast.tools.crowded_devset import devset_frames


def _experiment(name: str):
    path = Path(__file__).resolve().parent.parent / "tools" / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_roi_failure = _experiment("roi_failure_analysis")
coded_pixels, size_recall = _roi_failure.coded_pixels, _roi_failure.size_recall


def test_devset_never_uses_scored_or_training_frames():
    frames = devset_frames(795)
    assert frames[:5] == [1, 2, 3, 4, 6]
    assert not any(i % 8 == 0 or i % 5 == 0 for i in frames)
    assert len(frames) == sum(1 for i in range(795) if i % 8 and i % 5)


def test_devset_mosaics_are_deterministic(tmp_path):
    from latentcast.tools.crowded_devset import build_devset
    from tests.conftest import shared_or_skip

    video = shared_or_skip() / "data" / "video" / "vtest.avi"
    m1 = build_devset(video, tmp_path / "a", grids=(2,), per_grid=2)
    m2 = build_devset(video, tmp_path / "b", grids=(2,), per_grid=2)
    assert m1 == m2 and len(m1["mosaics"]) == 2 and len(m1["mosaics"][0]["frames"]) == 4
    used = [i for m in m1["mosaics"] for i in m["frames"]]
    assert len(set(used)) == len(used) and not any(i % 8 == 0 or i % 5 == 0 for i in used)
    a = (tmp_path / "a" / "mosaic2x2-00.png").read_bytes()
    assert a == (tmp_path / "b" / "mosaic2x2-00.png").read_bytes()


def test_coded_pixels_maps_cells_to_the_frame():
    m = np.zeros((4, 5), bool)
    m[1, 2] = True
    px = coded_pixels(m, 70, 60)
    assert px.shape == (60, 70) and px.sum() == 256
    assert px[16:32, 32:48].all() and not px[:16].any()


class _B:
    def __init__(self, x0, y0, x1, y1, class_id=0, score=1.0):
        self.x0, self.y0, self.x1, self.y1, self.class_id, self.score = x0, y0, x1, y1, class_id, score


def test_size_recall_counts_matches_per_coco_size():
    gt = [_B(0, 0, 10, 10), _B(50, 50, 100, 100), _B(200, 200, 400, 400), _B(0, 100, 20, 120)]
    dets = [_B(1, 1, 10, 10, score=0.9),  # matches the small one
            _B(50, 50, 100, 100, class_id=1, score=0.9),  # wrong class: no match
            _B(205, 205, 400, 400, score=0.2),  # below the score that counts
            _B(0, 100, 20, 120, score=0.5), _B(0, 100, 20, 120, score=0.4)]  # one match, one duplicate
    r = size_recall(gt, dets)
    assert r == {"small": (2, 2), "medium": (0, 1), "large": (0, 1)}
    with pytest.raises(TypeError):
        size_recall(gt, None)


def test_linear_path_starts_as_the_block_pca_codec():
    """linear_path.py's step 0: synthesis(analysis(x)) is x projected on the PCA basis, cell by cell."""
    import torch
    import torch.nn.functional as F

    lp = _experiment("linear_path")
    g = torch.Generator().manual_seed(0)
    V, _ = torch.linalg.qr(torch.randn(768, 160, generator=g, dtype=torch.float64))
    V, mean = V.float(), torch.rand(768, generator=g)
    x = torch.rand(2, 3, 64, 48, generator=g)
    rec = F.pixel_shuffle(lp.LinearSynthesis(V, mean, 8.0)(lp.LinearAnalysis(V, mean, 8.0)(x)), 4)
    cells = F.pixel_unshuffle(x, 16).permute(0, 2, 3, 1).reshape(-1, 768)
    proj = (cells - mean) @ V @ V.T + mean
    expect = F.pixel_shuffle(proj.reshape(2, 4, 3, 768).permute(0, 3, 1, 2), 16)
    assert torch.allclose(rec, expect, atol=1e-4)
    assert not torch.allclose(rec, x, atol=1e-2)  # 160 of 768 dimensions: a projection, not the identity
