"""edge.change: g_a only where the frame changed, bit-exact on the cells it writes back."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from latentcast.edge.change import ChangeAnalyzer, cell_change  # noqa: E402
from latentcast.proto.regions import change_regions  # noqa: E402

W, H = 320, 256  # a 20 x 16 cell grid


@pytest.fixture(scope="module", params=["int8", "float32"])
def encoder(tiny_bundle, request):
    """The bundle's g_a in each precision: exactness holds for the quantized stages as for the float ones."""
    from latentcast.edge.encoder import EdgeEncoder

    enc = EdgeEncoder(bundle=tiny_bundle, analysis=request.param)
    assert enc.analysis == request.param
    return enc


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


@pytest.mark.parametrize("kw", [{}, {"res_blocks": 2, "attention": True}])
def test_analysis_stages_chain_to_g_a_and_their_reach_adds_up_to_the_halo(kw):
    import torch

    from latentcast.models.elic import CONFIGS, ElicCodec, analysis_halo, analysis_stages

    cfg = CONFIGS["lite"].__class__(**{**CONFIGS["lite"].to_dict(), "N": 16, "M": 32, "groups": (8, 8, 16),
                                        "Nz": 8, "Nh": 8, "ctx": 8, "ep": 8, "gs_width": 16, **kw})
    torch.manual_seed(0)
    model = ElicCodec(cfg).eval()
    stages = analysis_stages(model.g_a)
    assert [s for _, s, _ in stages] == [2, 4, 8, 16]
    assert -(-sum(r for _, _, r in stages) // 16) == analysis_halo(cfg)
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        f = x
        for stage, _, _ in stages:
            f = stage(f)
        torch.testing.assert_close(f, model.g_a(x), rtol=0, atol=0)


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


@pytest.fixture()
def staged(encoder):
    assert encoder.analysis_stages is not None and [s.stride for s in encoder.analysis_stages] == [2, 4, 8, 16]
    return lambda **kw: ChangeAnalyzer(encoder.analyze, halo=encoder.analysis_halo, stages=encoder.analysis_stages,
                                       hyper=encoder.hyper_analyze, **kw)


def test_staged_analysis_is_the_whole_frame_analysis_of_the_reference_on_every_cell(encoder, staged):
    ca = staged(threshold=2.0, max_fraction=1.0)
    y0, z0, _ = ca.analyze(_scene(0))
    y_whole, z_whole = encoder.analyze(_scene(0))
    np.testing.assert_array_equal(y0, y_whole)  # the stages chained are analysis.onnx's g_a, bit for bit
    np.testing.assert_array_equal(z0, z_whole)
    halo_cells = 0
    for t in range(1, 6):
        y, z, changed = ca.analyze(_scene(t))
        assert not ca.last_whole and 0 < changed.sum() < changed.size // 4 and z is z0
        np.testing.assert_array_equal(y, encoder.analyze(ca.reference)[0])  # every cell, not only the changed
        halo_cells += sum(r.crop_cells for r in change_regions(changed, halo=encoder.analysis_halo, max_fraction=1))
    assert ca.counts["regions"] == 5 and ca.counts["whole"] == 1
    # the first stage (the costliest per cell) crops a few pixels around the changed cells, not g_a's halo
    stage1 = ChangeAnalyzer(encoder.analyze, halo=encoder.analysis_halo, stages=encoder.analysis_stages[:1],
                            hyper=lambda y: y)
    stage1.analyze(_scene(0))
    stage1.analyze(_scene(1))
    assert 0 < stage1.counts["crop_cells"] < halo_cells / 5 / 2


def test_staged_analysis_of_odd_sizes_and_a_changed_size(encoder, staged):
    ca = staged(threshold=2.0, max_fraction=1.0)
    f0, f1 = _scene(0)[:250, :300], _scene(2)[:250, :300]  # padded to 320 x 256
    ca.analyze(np.ascontiguousarray(f0))
    y, _, changed = ca.analyze(np.ascontiguousarray(f1))
    assert changed.any() and not ca.last_whole
    np.testing.assert_array_equal(y, encoder.analyze(ca.reference)[0])
    y, z, _ = ca.analyze(np.ascontiguousarray(_scene(3)[:128, :160]))  # another size: whole, new caches
    assert ca.last_whole and y.shape[1:] == (8, 12)
    y, _, changed = ca.analyze(np.ascontiguousarray(_scene(4)[:128, :160]))
    np.testing.assert_array_equal(y, encoder.analyze(ca.reference)[0])


def test_stages_need_their_hyper_analysis(encoder):
    with pytest.raises(ValueError, match="stages and hyper come together"):
        ChangeAnalyzer(encoder.analyze, halo=3, stages=encoder.analysis_stages)


def test_a_bundle_without_stages_analyses_crops_with_the_halo(tiny_bundle, tmp_path):
    import shutil

    from latentcast.edge.config import TemporalConfig
    from latentcast.edge.encoder import EdgeEncoder
    from latentcast.edge.temporal import TemporalEncoder
    from latentcast.proto.temporal import TemporalTables

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["analysis_stages"], manifest["hyper_analysis"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    enc = EdgeEncoder(bundle=old)
    assert enc.analysis_stages is None
    with pytest.raises(ValueError, match="predates staged analysis"):
        enc.hyper_analyze(np.zeros((enc.M, 4, 4), dtype=np.float32))
    te = TemporalEncoder(compressor=enc, tables=TemporalTables.flat(M=enc.M, n_rates=enc.n_rates),
                         config=TemporalConfig(mode="temporal", change_threshold=2.0))
    assert te.change is not None and te.change.stages is None
    for t in range(3):
        te.encode(_scene(t))
    assert te.change.counts["regions"] == 2


def test_a_failed_stage_makes_the_next_frame_whole(encoder):
    boom = {"on": False}

    def run(x, inner=encoder.analysis_stages[1].run):
        if boom["on"]:
            raise RuntimeError("stage failed")
        return inner(x)

    from dataclasses import replace

    stages = list(encoder.analysis_stages)
    stages[1] = replace(stages[1], run=run)
    ca = ChangeAnalyzer(encoder.analyze, halo=encoder.analysis_halo, stages=stages, hyper=encoder.hyper_analyze,
                        max_fraction=1.0)
    ca.analyze(_scene(0))
    boom["on"] = True
    with pytest.raises(RuntimeError, match="stage failed"):
        ca.analyze(_scene(1))
    boom["on"] = False
    y, _, _ = ca.analyze(_scene(2))
    assert ca.last_whole
    np.testing.assert_array_equal(y, encoder.analyze(_scene(2))[0])
