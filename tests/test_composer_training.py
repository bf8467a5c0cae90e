"""models.composer_training: `latentcast train composer` on the tiny SD and codec, resume, and the cloud
loading what it wrote (tiny random Stable Diffusion components, two small images: no hub, no shared data)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from latentcast.models import training  # noqa: E402
from latentcast.models.composer import (  # noqa: E402
    ADAPTER_FILE,
    ComposeRequest,
    ControlNetComposer,
    make_composer,
    tiny_components,
)
from latentcast.models.composer_training import (  # noqa: E402
    ComposerTrainConfig,
    codec_latent,
    drop_masks,
    train_composer,
)
from latentcast.proto.bitstream import Roi  # noqa: E402
from latentcast.tools.cli import main  # noqa: E402
from tests.test_cloud_composer import _controlnet_config, _stream  # noqa: E402
from tests.test_cloud_server import kinds, make_server, packets  # noqa: E402, F401 - fixtures


@pytest.fixture(autouse=True)
def _one_thread():
    """2 shared cores: one torch thread (another module may have left it at 2)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _image(rng: np.random.Generator, w: int = 160, h: int = 136) -> np.ndarray:
    return cv2.resize(rng.integers(0, 255, (12, 12, 3)).astype(np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_codec_path):
    """Train 2 stage-I steps through the CLI, then resume into 2 stage-II steps; returns the run folder
    and what each invocation printed/returned."""
    base = tmp_path_factory.mktemp("composer-train")
    rng = np.random.default_rng(0)
    srcs = []
    for i in range(2):
        p = base / f"img{i}.png"
        cv2.imwrite(str(p), _image(rng))
        srcs.append((f"img{i}", p, None))
    out = base / "run"
    args = [
        "train",
        "composer",
        "--sd",
        "tiny",
        "--codec",
        str(tiny_codec_path),
        "--batch",
        "1",
        "--crop",
        "64",
        "--out",
        str(out),
        "--cache",
        str(base / "cache"),
        "--threads",
        "1",
        "--checkpoint-every",
        "1",
        "--log-every",
        "1",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "training_sources", lambda **_: srcs)
        first = main(args + ["--steps-1", "2", "--steps-2", "0"])
        state1 = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
        again = main(args + ["--steps-1", "2", "--steps-2", "2"])  # no --resume: refused, nothing touched
        resumed = main(args + ["--steps-1", "2", "--steps-2", "2", "--resume"])
    return {"out": out, "codes": (first, again, resumed), "state1": state1}


def test_cli_trains_resumes_and_writes_the_composer(run):
    out = run["out"]
    assert run["codes"] == (0, 2, 0)
    s1 = run["state1"]
    assert s1["step"] == 2 and s1["stage"] == 1 and s1["config"]["sd"] == "tiny"
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 4 and state["stage"] == 2
    assert {"model", "opt", "scaler", "rng", "config"} <= set(state)
    hist = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    # the resumed run continued at step 3: no restart, no repeated step
    assert [h["step"] for h in hist] == [1, 2, 3, 4] and [h["stage"] for h in hist] == [1, 1, 2, 2]
    assert all(math.isfinite(h["loss_diff"]) and h["loss_diff"] > 0 and math.isfinite(h["nmse_latent"]) for h in hist)
    for f in ("config.json", "diffusion_pytorch_model.safetensors", ADAPTER_FILE):
        assert (out / "controlnet" / f).is_file()
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / "sd" / sub).is_dir()
    card = (out / "model_card.md").read_text()
    assert "latentcast train composer --sd tiny" in card and "stage II: diffusion MSE" in card


def test_resume_is_bit_exact(run, tiny_codec_path, tmp_path, monkeypatch):
    """2 + 2 steps with a resume in between give the weights of 4 uninterrupted steps (optimizer, RNGs restored)."""
    from safetensors.torch import load_file

    base = run["out"].parent
    monkeypatch.setattr(
        training, "training_sources", lambda **_: [(f"img{i}", base / f"img{i}.png", None) for i in range(2)]
    )
    cfg = ComposerTrainConfig(
        sd="tiny",
        codec=str(tiny_codec_path),
        out=str(tmp_path / "straight"),
        cache=str(tmp_path / "cache"),
        stage1_steps=2,
        stage2_steps=2,
        batch=1,
        crop=64,
        threads=1,
        checkpoint_every=1,
        log_every=1,
    )
    train_composer(cfg)
    name = "diffusion_pytorch_model.safetensors"
    a, b = load_file(str(tmp_path / "straight" / "controlnet" / name)), load_file(str(run["out"] / "controlnet" / name))
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("controlnet_cond_embedding"))


def test_only_the_control_module_changed(run, tiny_codec):
    from safetensors.torch import load_file

    from latentcast.models.composer import LatentAdapter

    out = run["out"]
    init = tiny_components(0, codec_channels=tiny_codec.latent_space().channels)
    cn = load_file(str(out / "controlnet" / "diffusion_pytorch_model.safetensors"))
    before = {k: v for k, v in init["controlnet"].state_dict().items() if not k.startswith("controlnet_cond_embedding")}
    changed = [k for k, v in before.items() if not torch.equal(v, cn[k])]
    assert len(changed) > 0.9 * len(before), f"only {len(changed)}/{len(before)} ControlNet tensors changed"
    adapter = LatentAdapter.load(out / "controlnet" / ADAPTER_FILE)
    assert all(not torch.equal(v, adapter.state_dict()[k]) for k, v in init["adapter"].state_dict().items())
    unet = load_file(str(out / "sd" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(v, unet[k]) for k, v in init["unet"].state_dict().items())
    # the checkpoint's ControlNet (with the adapter as its conditioning embedding) is the one written
    ck = torch.load(out / "last.pt", map_location="cpu", weights_only=False)["model"]["controlnet"]
    assert torch.equal(ck["controlnet_cond_embedding.conv_out.weight"], adapter.conv_out.weight)
    assert torch.equal(ck["controlnet_mid_block.weight"], cn["controlnet_mid_block.weight"])


def test_the_written_folder_composes(run, tiny_codec):
    out = run["out"]
    comp = make_composer("controlnet", sd=str(out / "sd"), controlnet=str(out / "controlnet"), codec=tiny_codec)
    assert isinstance(comp, ControlNetComposer) and comp.adapter.in_channels == 49
    img = _image(np.random.default_rng(1), 96, 64)
    rec = tiny_codec.decompress(tiny_codec.compress(img, [Roi(x0=0, y0=0, x1=48, y1=32)], rate_point=1, roi_only=True))
    frame = comp.compose([ComposeRequest.from_reconstruction(rec, labels=["person"], stream_id="c", steps=2)])[0]
    assert frame.shape == (64, 96, 3) and frame.dtype == np.uint8


def test_resume_refuses_another_model(run, tiny_codec_path):
    cfg = ComposerTrainConfig(sd="tiny", codec=str(tiny_codec_path), out=str(run["out"]), resume=True,
                              stage1_steps=2, stage2_steps=2, crop=64, seed=1)
    with pytest.raises(ValueError, match="seed"):
        train_composer(cfg)
    with pytest.raises(ValueError, match="multiple of 64"):
        train_composer(dataclasses.replace(cfg, crop=96))


@pytest.mark.parametrize("which", ["tiny_codec", "tiny_gain_codec"])
def test_codec_latent_is_what_the_cloud_decodes(which, request):
    tiny_codec = request.getfixturevalue(which)
    img = _image(np.random.default_rng(2), 128, 64)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    for rois in ([], [Roi(x0=16, y0=16, x1=70, y1=60)]):
        for q in (0, tiny_codec.n_rates - 1):
            rec = tiny_codec.decompress(tiny_codec.compress(img, rois, rate_point=q, roi_only=bool(rois)),
                                        decode_frame=False)
            mask = torch.from_numpy(rec.mask.astype(np.float32))[None, None]
            with torch.no_grad():
                lat = codec_latent(tiny_codec.model, x, torch.tensor([q]), mask)
            assert np.abs(lat[0].numpy() - rec.latent).max() < 1e-5


def test_drop_masks_cover_the_asked_fraction():
    rng = np.random.default_rng(0)
    m = drop_masks(200, 8, 8, rng, 0.0, 0.5)
    assert m.shape == (200, 1, 8, 8) and set(np.unique(m.numpy())) <= {0.0, 1.0}
    dropped = 1 - m.mean(dim=(1, 2, 3)).numpy()
    assert dropped.min() >= 0 and dropped.max() <= 0.5 and 0.15 < dropped.mean() < 0.35
    assert (1 - drop_masks(5, 4, 4, rng, 0.25, 0.25).mean(dim=(1, 2, 3))).tolist() == [0.25] * 5
    assert drop_masks(3, 4, 4, rng, 0.0, 0.0).min() == 1


async def test_cloud_loads_the_trained_composer(run, tiny_codec, make_server, packets):  # noqa: F811 - fixtures
    from latentcast.models.composer import LatentAdapter

    out = run["out"]
    srv = await make_server(_controlnet_config(sd=str(out / "sd"), controlnet=str(out / "controlnet")))
    assert isinstance(srv.composer, ControlNetComposer)
    trained = LatentAdapter.load(out / "controlnet" / ADAPTER_FILE)
    assert torch.equal(srv.composer.adapter.conv_out.weight, trained.conv_out.weight)
    msgs = await _stream(srv, tiny_codec, packets, n=2)
    assert sorted(r.seq for r in kinds(msgs, "result")) == [0, 1] and not kinds(msgs, "error")


def test_train_gs_writes_a_new_codec_with_only_g_s_changed(tmp_path, tiny_codec_path, tiny_codec, monkeypatch):
    from latentcast.models.codec import LatentCodec

    p = tmp_path / "img.png"
    cv2.imwrite(str(p), _image(np.random.default_rng(3)))
    monkeypatch.setattr(training, "training_sources", lambda **_: [("img", p, None)])
    cfg = ComposerTrainConfig(sd="tiny", codec=str(tiny_codec_path), out=str(tmp_path / "run"),
                              cache=str(tmp_path / "cache"), stage1_steps=1, stage2_steps=2, crop=64, train_gs=True,
                              gs_lr=1e-3, precision="bf16", threads=1, log_every=1)
    assert train_composer(cfg) == tmp_path / "run" / "controlnet"
    meta = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert meta["amp"] == "fp32" and meta["device"] == "cpu"  # the CPU trains in fp32 whatever is asked
    new = LatentCodec.from_file(tmp_path / "run" / "codec.safetensors")
    assert new.weights_hash != tiny_codec.weights_hash
    old_sd, new_sd = tiny_codec.model.state_dict(), new.model.state_dict()
    differ = {k for k in old_sd if not torch.equal(old_sd[k], new_sd[k])}
    assert differ and all(k.startswith("g_s.") for k in differ)
    hist = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [h["stage"] for h in hist] == [1, 2, 2]


def test_non_finite_losses_skip_the_update_then_stop(tmp_path, tiny_codec_path, monkeypatch):
    from latentcast.models import composer_training

    p = tmp_path / "img.png"
    cv2.imwrite(str(p), _image(np.random.default_rng(4)))
    monkeypatch.setattr(training, "training_sources", lambda **_: [("img", p, None)])
    monkeypatch.setattr(composer_training, "MAX_BAD_STEPS", 2)
    monkeypatch.setattr(ControlNetComposer, "diffusion_loss", lambda self, *a, **k: torch.tensor(float("nan")))
    cfg = ComposerTrainConfig(sd="tiny", codec=str(tiny_codec_path), out=str(tmp_path / "run"),
                              cache=str(tmp_path / "cache"), stage1_steps=3, stage2_steps=0, crop=64, threads=1)
    with pytest.raises(FloatingPointError, match="2 non-finite losses in a row"):
        train_composer(cfg)
