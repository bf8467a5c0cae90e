"""edge.change: g_a only where the frame changed, bit-exact on the cells it writes back."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from latentcast.edge.change import ChangeAnalyzer, cell_change  # noqa: E402

W, H = 320, 256  # a 20 x 16 cell grid


@pytest.fixture(scope="module")
def encoder(tiny_bundle):
    from latentcast.edge.encoder import EdgeEncoder

    return EdgeEncoder(bundle=tiny_bundle)


def _scene(t: int) -> np.ndarray:
    r = np.random.default_rng(0)
    f = np.kron(r.integers(30, 220, size=(H // 16, W // 16, 3)), np.ones((16, 16, 1))).astype(np.uint8)
    f = np.clip(f.astype(int) + r.integers(-20, 20, size=f.shape), 0, 255).astype(np.uint8)
    x = 20 + 9 * t  # a square moving 9 px per frame: off the cell grid
    f[100:140, x:x + 40] = (240, 30, 200)
    return f


def test_shipped_bundle_states_the_halo_of_its_codec():
    from latentcast.models.codec import LatentCodec
    from latentcast.models.elic import analysis_halo
    from latentcast.weights import weights_path

    manifest = json.loads((weights_path("elic-lite", "edge-bundle") / "manifest.json").read_text())
    assert manifest["analysis_halo"] == analysis_halo(LatentCodec.load().cfg) == 3


def test_cells_written_back_equal_the_whole_frame_analysis_of_the_reference(encoder):
    ca = ChangeAnalyzer(encoder.analyze, halo=encoder.analysis_halo, threshold=2.0, max_fraction=1.0)
    y0, z0, changed = ca.analyze(_scene(0))
    assert ca.last_whole and changed.all()
    np.testing.assert_array_equal(y0, encoder.analyze(_scene(0))[0])
    for t in range(1, 5):
        frame = _scene(t)
        y, z, changed = ca.analyze(frame)
        assert not ca.last_whole and 0 < changed.sum() < changed.size // 4
        assert z is z0  # a P frame's z is the last whole analysis's
        whole = encoder.analyze(ca.reference)[0]
        np.testing.assert_array_equal(y[:, changed], whole[:, changed])  # exact, not close
        pixels = np.kron(changed, np.ones((16, 16), dtype=bool))
        np.testing.assert_array_equal(ca.reference[pixels], frame[pixels])
        assert (cell_change(frame, ca.reference)[~changed] <= 2.0).all()
    assert ca.counts["whole"] == 1 and ca.counts["regions"] == 4


def test_still_frames_and_noise_under_the_threshold_run_nothing(encoder):
    calls = []

    def analyze(frame, **kw):
        calls.append(frame.shape)
        return encoder.analyze(frame, **kw)

    ca = ChangeAnalyzer(analyze, halo=3, threshold=4.0)
    f = _scene(0)
    y0, _, _ = ca.analyze(f)
    noisy = np.clip(f.astype(int) + np.random.default_rng(1).integers(-3, 4, size=f.shape), 0, 255).astype(np.uint8)
    y1, _, changed = ca.analyze(noisy)
    assert not changed.any() and y1 is y0 and calls == [(H, W, 3)]
    assert ca.counts["unchanged"] == 1


def test_keyframes_size_changes_and_big_changes_analyse_the_whole_frame(encoder):
    ca = ChangeAnalyzer(encoder.analyze, halo=3, threshold=2.0, max_fraction=0.5)
    ca.analyze(_scene(0))
    ca.analyze(_scene(1), full=True)
    assert ca.last_whole
    ca.analyze(255 - _scene(1))  # everything changed
    assert ca.last_whole
    small = np.ascontiguousarray(_scene(1)[:128, :160])
    y, z, _ = ca.analyze(small)
    assert ca.last_whole and y.shape[1:] == (8, 12)  # padded to 64: 192 x 128 -> 12 x 8 cells
    assert ca.counts["whole"] == 4


def test_odd_frame_sizes_pad_like_the_whole_frame_analysis(encoder):
    ca = ChangeAnalyzer(encoder.analyze, halo=3, threshold=2.0, max_fraction=1.0)
    f0, f1 = _scene(0)[:250, :300], _scene(2)[:250, :300]  # padded to 320 x 256
    ca.analyze(np.ascontiguousarray(f0))
    y, _, changed = ca.analyze(np.ascontiguousarray(f1))
    assert changed.any() and not ca.last_whole
    whole = encoder.analyze(ca.reference)[0]
    np.testing.assert_array_equal(y[:, changed], whole[:, changed])


@pytest.mark.parametrize("kw, msg", [({"halo": -1}, "halo -1"), ({"halo": 1.5}, "halo 1.5"),
                                     ({"halo": 3, "threshold": 0}, "threshold 0"),
                                     ({"halo": 3, "max_fraction": 0}, "max_fraction 0")])
def test_bad_settings_and_frames_are_errors(encoder, kw, msg):
    with pytest.raises(ValueError, match=msg):
        ChangeAnalyzer(encoder.analyze, **kw)
    ca = ChangeAnalyzer(encoder.analyze, halo=3)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8 RGB, got shape \(64, 64\) uint8"):
        ca.analyze(np.zeros((64, 64), dtype=np.uint8))
