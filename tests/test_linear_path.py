"""ElicConfig.linear_path: the block-PCA start, the synthesis runtimes, train -> release -> code, and the edge
bundle's analysis_linear (whole frames and changed cells; tiny seeded codecs and images, no shared data)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

import torch.nn.functional as F  # noqa: E402

from latentcast.models import training  # noqa: E402
from latentcast.models.codec import LatentCodec  # noqa: E402
from latentcast.models.elic import CONFIGS, ElicCodec, ElicConfig  # noqa: E402
from latentcast.tools.cli import main  # noqa: E402

from .conftest import write_training_images  # noqa: E402

TINY = {"N": 16, "M": 32, "groups": (16, 16), "Nz": 8, "Nh": 16, "ctx": 8, "ep": 16, "gs_width": 16, "gs_blocks": 1}


def _tiny(**kw) -> ElicCodec:
    torch.manual_seed(0)
    return ElicCodec(dataclasses.replace(CONFIGS["lite"], **TINY, linear_path=True, **kw))


class _Crops:
    """What init_linear_path reads from RandomCrops: batches of smooth random crops in [0, 1]."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def batch(self, n: int):
        small = self.rng.random((n, 3, 8, 8)).astype(np.float32)
        x = F.interpolate(torch.from_numpy(small), size=(64, 64), mode="bilinear", align_corners=False)
        return x, None


def test_linear_path_needs_a_pixel_latent():
    with pytest.raises(ValueError, match="pixel latent"):
        ElicConfig(linear_path=True, latent_channels=32, latent_factor=8)
    assert ElicConfig.from_dict({k: v for k, v in CONFIGS["lite"].to_dict().items() if k != "linear_path"}) \
        == CONFIGS["lite"]  # files written before the field load without it


def test_fresh_linear_path_codec_starts_as_block_pca():
    model = _tiny()
    training.init_linear_path(model, _Crops(), batches=4)
    x, _ = _Crops(seed=1).batch(2)
    with torch.no_grad():
        y = model.analyze(x)
        rec = model.g_s(y, torch.ones_like(y[:, :1]), torch.zeros(2, 8, 1, 1))
    V = model.g_s.linear.proj.weight[:, :, 0, 0] * 8.0  # (768, M): the orthonormal components
    mean = model.g_s.linear.proj.bias
    cells = F.pixel_unshuffle(x, 16).permute(0, 2, 3, 1).reshape(-1, 768)
    proj = ((cells - mean) @ V @ V.T + mean).reshape(2, 4, 4, 768).permute(0, 3, 1, 2)
    assert torch.allclose(V.T @ V, torch.eye(32), atol=1e-4)
    assert torch.allclose(F.pixel_shuffle(rec, 4), F.pixel_shuffle(proj, 16), atol=1e-4)
    plain = ElicCodec(dataclasses.replace(CONFIGS["lite"], **TINY))
    with pytest.raises(ValueError, match="no linear path"):
        training.init_linear_path(plain, _Crops())
    with pytest.raises(ValueError, match="init file has no linear path"):
        training.load_init(_tiny(), plain.state_dict())


@pytest.mark.parametrize("runtime", ["torch", "onnx", "bf16"])
def test_render_runtimes_add_the_linear_path_on_crops(runtime):
    from latentcast.models.synthesis_runtime import Bf16Synthesis, OnnxSynthesis

    model = _tiny().eval()
    g_s = model.g_s
    torch.manual_seed(1)
    y = torch.randn(1, 32, 6, 7) * 3
    mask = torch.ones_like(y[:, :1])
    gz = g_s.global_features(torch.randn(1, 8, 2, 2))[:, :, :6, :7]
    keep = (2, 4, 1, 5)
    with torch.no_grad():
        whole = g_s.from_global(y, mask, gz)
        cut = whole[:, :, 2 * 4:4 * 4, 1 * 4:5 * 4]
        run = {"torch": g_s.from_global, "onnx": OnnxSynthesis(g_s), "bf16": Bf16Synthesis(g_s)}[runtime]
        got = run(y, mask, gz, keep)
        full = run(y, mask, gz)
    atol = 0.05 if runtime == "bf16" else 1e-4
    assert got.dtype == torch.float32 and got.shape == cut.shape
    assert torch.allclose(got, cut, atol=atol) and torch.allclose(full, whole, atol=atol)
    lin = g_s.linear(y)[:, :, 2 * 4:4 * 4, 1 * 4:5 * 4]
    assert (lin.abs() > 10 * atol).any()  # the linear path is a real part of what the runtimes return


def test_train_release_code_and_export(tmp_path, monkeypatch):
    srcs = write_training_images(tmp_path, (160, 136))
    monkeypatch.setattr(training, "training_sources", lambda **_: srcs)
    run = tmp_path / "run"
    cfg = training.TrainConfig(out=str(run), cache=str(tmp_path / "cache"), stage1_steps=3, stage2_steps=0, batch=2,
                               crop=128, checkpoint_every=2, overrides={**TINY, "linear_path": True})
    ckpt = training.train(cfg)
    state = torch.load(ckpt, weights_only=False)
    assert state["codec"]["linear_path"] and "a_lin.proj.weight" in state["model"]
    # a restart resumes the trained linear path: it is not started from the components again
    monkeypatch.setattr(training, "init_linear_path", lambda *a, **k: pytest.fail("re-initialised on resume"))
    cfg.stage1_steps = 4
    training.train(cfg)
    resumed = torch.load(ckpt, weights_only=False)
    assert resumed["step"] == 4 and not torch.equal(resumed["model"]["a_lin.proj.weight"],
                                                     state["model"]["a_lin.proj.weight"])
    state = resumed
    out = tmp_path / "lp.safetensors"
    assert main(["release", "codec", str(ckpt), "--out", str(out), "--no-calibrate"]) == 0
    codec = LatentCodec.from_file(out)
    assert codec.cfg.linear_path
    img = cv2.imread(str(srcs[0][1]))[:, :, ::-1].copy()
    for q in range(codec.n_rates):
        data = codec.compress(img, rate_point=q)
        assert codec.decompress(data).frame.tobytes() == codec.decompress(data).frame.tobytes()
        assert codec.decompress(data).frame.shape == img.shape
    from latentcast.edge.encoder import EdgeEncoder

    from .conftest import _export_bundle

    enc = EdgeEncoder(bundle=_export_bundle(codec, tmp_path / "bundle"), analysis="float32")
    assert enc.manifest["format"] == "latentcast-edge-bundle-3" and enc.analysis_linear is not None
    data = enc.compress(img, rate_point=1)
    assert codec.decompress(data).frame.shape == img.shape


@pytest.fixture(scope="module")
def linear_bundle(tmp_path_factory):
    """A tiny seeded codec with a linear path (PCA of smooth random crops) and its edge bundle."""
    from .conftest import _export_bundle

    model = _tiny()
    training.init_linear_path(model, _Crops(), batches=4)
    with torch.no_grad():  # the nonlinear parts too, so that both paths matter
        model.g_a[-1].weight.normal_(0, 0.05)
        model.g_s.out.weight.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("linear")
    path = folder / "tiny-linear.safetensors"
    LatentCodec.save(model, path, latent_space="pixels:4")
    codec = LatentCodec.from_file(path)
    return codec, _export_bundle(codec, folder / "bundle")


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_edge_analysis_adds_the_linear_path_and_stays_exact_on_changed_cells(linear_bundle, precision):
    from latentcast.edge.change import ChangeAnalyzer
    from latentcast.edge.encoder import EdgeEncoder

    from .test_change import _scene

    codec, bundle = linear_bundle
    enc = EdgeEncoder(bundle=bundle, analysis=precision)
    assert enc.analysis == precision and enc.analysis_linear is not None
    y_edge, z_edge = enc.analyze(_scene(0))
    y_torch, z_torch = codec.analyze(_scene(0))
    atol = 1e-3 if precision == "float32" else 0.5
    np.testing.assert_allclose(y_edge, y_torch, atol=atol)
    lin_only = codec.model.a_lin(torch.from_numpy(_scene(0)).permute(2, 0, 1)[None].float() / 255)[0].detach()
    assert float(lin_only.abs().max()) > 20 * atol  # the linear path is a real part of y
    ca = ChangeAnalyzer(enc.analyze, halo=enc.analysis_halo, stages=enc.analysis_stages, hyper=enc.hyper_analyze,
                        linear=enc.analysis_linear, threshold=2.0, max_fraction=1.0)
    y0, _, _ = ca.analyze(_scene(0))
    np.testing.assert_array_equal(y0, y_edge)
    for t in range(1, 4):
        y, _, changed = ca.analyze(_scene(t))
        assert not ca.last_whole and 0 < changed.sum() < changed.size // 4
        np.testing.assert_array_equal(y, enc.analyze(ca.reference)[0])  # every cell, bit for bit
    with pytest.raises(ValueError, match="give the stages"):
        ChangeAnalyzer(enc.analyze, halo=3, linear=enc.analysis_linear)


def test_a_bundle_naming_an_unlisted_linear_graph_is_refused(linear_bundle, tmp_path):
    import json
    import shutil

    from latentcast.edge.encoder import EdgeEncoder

    _, bundle = linear_bundle
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    man = json.loads((bad / "manifest.json").read_text())
    man["analysis_linear"] = "../elsewhere.onnx"
    (bad / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="analysis_linear '../elsewhere.onnx' is not one of the bundle's files"):
        EdgeEncoder(bundle=bad)
    man = json.loads((bundle / "manifest.json").read_text())  # a stage file it does not list
    man["analysis_stages"][1]["file"] = "/tmp/stage.onnx"
    (bad / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match=r"analysis_stages\[1\].file '/tmp/stage.onnx' is not one of the bundle's"):
        EdgeEncoder(bundle=bad)


def test_temporal_stream_with_a_linear_path_codes_and_decodes_in_step(linear_bundle):
    """Edge P frames analyse the changed cells with the linear path; the cloud renders with it; states agree."""
    from latentcast.edge.encoder import EdgeEncoder
    from latentcast.proto.bitstream import Roi

    from .test_change import _scene
    from .test_temporal import _pair

    codec, bundle = linear_bundle
    enc, dec = _pair(EdgeEncoder(bundle=bundle), codec)
    assert enc.change is not None and enc.change._linear is not None
    for t in range(5):
        f = _scene(t)  # 320 x 256, a square moving 9 px a frame
        rec = dec.decompress(enc.encode(f, [Roi(x0=20 + 9 * t, y0=100, x1=60 + 9 * t, y1=140, label_id=0, score=0.9)]))
        assert rec.frame.shape == f.shape
        np.testing.assert_array_equal(dec.state.y, enc.state.y)
    assert enc.counts["key"] == 1 and enc.counts["p"] == 4 and enc.change.counts["regions"] >= 1


def test_set_parses_switches(capsys):
    from latentcast.tools.train import _codec_overrides as _overrides

    assert _overrides(["linear_path=true", "res_blocks=2"]) == {"linear_path": True, "res_blocks": 2}
    assert _overrides(["linear_path=0"]) == {"linear_path": False}
    assert _overrides(["linear_path=yes"]) == {"linear_path": True}  # the config files' spellings
    with pytest.raises(SystemExit, match="--set linear_path: 'maybe' is not a boolean"):
        _overrides(["linear_path=maybe"])
    with pytest.raises(SystemExit, match="--set res_blocks: 'two' is not an integer"):
        _overrides(["res_blocks=two"])
