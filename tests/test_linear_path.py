"""ElicConfig.linear_path: the block-PCA start, the synthesis runtimes, train -> release -> code, and the edge
export's refusal (tiny seeded codecs and images, no shared data)."""

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
    with pytest.raises(ValueError, match="no linear path"):
        training.init_linear_path(ElicCodec(dataclasses.replace(CONFIGS["lite"], **TINY)), _Crops())


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


def test_train_release_code_and_refused_edge_export(tmp_path, monkeypatch):
    srcs = write_training_images(tmp_path, (160, 136))
    monkeypatch.setattr(training, "training_sources", lambda **_: srcs)
    run = tmp_path / "run"
    cfg = training.TrainConfig(out=str(run), cache=str(tmp_path / "cache"), stage1_steps=3, stage2_steps=0, batch=2,
                               crop=128, checkpoint_every=2, overrides={**TINY, "linear_path": True})
    ckpt = training.train(cfg)
    state = torch.load(ckpt, weights_only=False)
    assert state["codec"]["linear_path"] and "a_lin.proj.weight" in state["model"]
    out = tmp_path / "lp.safetensors"
    assert main(["release", "codec", str(ckpt), "--out", str(out), "--no-calibrate"]) == 0
    codec = LatentCodec.from_file(out)
    assert codec.cfg.linear_path
    img = cv2.imread(str(srcs[0][1]))[:, :, ::-1].copy()
    for q in range(codec.n_rates):
        data = codec.compress(img, rate_point=q)
        assert codec.decompress(data).frame.tobytes() == codec.decompress(data).frame.tobytes()
        assert codec.decompress(data).frame.shape == img.shape
    from latentcast.models.export import export_edge_bundle

    with pytest.raises(ValueError, match="linear path"):
        export_edge_bundle(codec, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_set_parses_switches(capsys):
    from latentcast.tools.train import _codec_overrides as _overrides

    assert _overrides(["linear_path=true", "res_blocks=2"]) == {"linear_path": True, "res_blocks": 2}
    assert _overrides(["linear_path=0"]) == {"linear_path": False}
    with pytest.raises(SystemExit, match="not a bool"):
        _overrides(["linear_path=yes"])
