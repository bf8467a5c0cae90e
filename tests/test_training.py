"""models.training: a few real training steps on tiny data, checkpoint, resume, release, load."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

from latentcast.models import training  # noqa: E402
from latentcast.models.codec import LatentCodec  # noqa: E402
from latentcast.tools.cli import main  # noqa: E402


@pytest.fixture
def tiny_sources(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    srcs = []
    for i in range(2):
        p = tmp_path / f"img{i}.png"
        img = cv2.resize(rng.integers(0, 255, (12, 12, 3)).astype(np.uint8), (160, 136), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(p), img)
        srcs.append((f"img{i}", p, None))
    monkeypatch.setattr(training, "training_sources", lambda **_: srcs)
    return srcs


def test_train_resume_release(tmp_path, tiny_sources):
    over = {"N": 16, "M": 32, "groups": (16, 16), "Nz": 8, "Nh": 16, "ctx": 8, "ep": 16, "gs_width": 16, "gs_blocks": 1}
    cfg = training.TrainConfig(out=str(tmp_path / "run"), cache=str(tmp_path / "cache"), stage1_steps=3,
                               stage2_steps=0, batch=2, crop=128, checkpoint_every=2, overrides=over)
    ckpt = training.train(cfg)
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 3 and state["stage"] == 1
    cfg.stage2_steps = 2  # resume into stage II
    training.train(cfg)
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 5 and state["stage"] == 2
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["codec"]["M"] == 32
    out = tmp_path / "w.safetensors"
    assert main(["release", "codec", str(ckpt), "--out", str(out), "--no-calibrate"]) == 0
    codec = LatentCodec.from_file(out)
    img = cv2.imread(str(tiny_sources[0][1]))[:, :, ::-1].copy()
    rec = codec.decompress(codec.compress(img, rate_point=1))
    assert rec.frame.shape == img.shape
    assert "out" not in codec.meta["train"] and "cache" not in codec.meta["train"]
