"""models.training: a few real training steps on tiny data, checkpoint, resume, release, load."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

from latentcast.models import training  # noqa: E402
from latentcast.models.codec import LatentCodec  # noqa: E402
from latentcast.tools.cli import main  # noqa: E402

from .conftest import write_training_images  # noqa: E402


@pytest.fixture
def tiny_sources(tmp_path, monkeypatch):
    srcs = write_training_images(tmp_path, (160, 136))
    monkeypatch.setattr(training, "training_sources", lambda **_: srcs)
    return srcs


def test_train_resume_release(tmp_path, tiny_sources):
    over = {"N": 16, "M": 32, "groups": (16, 16), "Nz": 8, "Nh": 16, "ctx": 8, "ep": 16, "gs_width": 16, "gs_blocks": 1}
    cfg = training.TrainConfig(out=str(tmp_path / "run"), cache=str(tmp_path / "cache"), stage1_steps=3,
                               stage2_steps=0, batch=2, crop=128, checkpoint_every=2, overrides=over,
                               video_fraction=0.25, scale_min=0.8)  # no video here: every crop from the photos
    ckpt = training.train(cfg)
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 3 and state["stage"] == 1
    cfg.stage2_steps = 2  # resume into stage II
    training.train(cfg)
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 5 and state["stage"] == 2
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["codec"]["M"] == 32 and saved["train"]["scale_min"] == 0.8
    out = tmp_path / "w.safetensors"
    assert main(["release", "codec", str(ckpt), "--out", str(out), "--no-calibrate"]) == 0
    codec = LatentCodec.from_file(out)
    img = cv2.imread(str(tiny_sources[0][1]))[:, :, ::-1].copy()
    rec = codec.decompress(codec.compress(img, rate_point=1))
    assert rec.frame.shape == img.shape
    assert "out" not in codec.meta["train"] and "cache" not in codec.meta["train"]
    # ship a subset of the trained rate points: their steps, offsets and z priors move along
    sub = tmp_path / "w13.safetensors"
    assert main(["release", "codec", str(ckpt), "--out", str(sub), "--no-calibrate", "--rate-points", "1,3"]) == 0
    part = LatentCodec.from_file(sub)
    assert part.n_rates == 2 and part.cfg.rate_steps == (codec.cfg.rate_steps[1], codec.cfg.rate_steps[3])
    assert part.model.rate_delta.tolist() == codec.model.rate_delta[[1, 3]].tolist()
    a, b = codec.compress(img, rate_point=3), part.compress(img, rate_point=1)
    assert codec.decompress(a).frame.tobytes() == part.decompress(b).frame.tobytes()
    assert main(["release", "codec", str(ckpt), "--out", str(sub), "--rate-points", "3,1"]) == 2
    # calibrated release (on the training images): for the default λ unless told; a λ given is the codec's own
    cal = tmp_path / "cal.safetensors"
    assert main(["release", "codec", str(ckpt), "--out", str(cal)]) == 0
    meta = LatentCodec.from_file(cal).meta
    assert meta["table_offset_rdoq"] == 0.05 and "rdoq" not in meta and LatentCodec.from_file(cal).rdoq == 0.05
    assert main(["release", "codec", str(ckpt), "--out", str(cal), "--rdoq", "0"]) == 0
    meta = LatentCodec.from_file(cal).meta
    assert meta["table_offset_rdoq"] == meta["rdoq"] == 0 and len(meta["table_offset_shifts"]) == 4
    assert main(["release", "codec", str(ckpt), "--out", str(cal), "--rdoq", "0.1", "--no-calibrate"]) == 0
    released = LatentCodec.from_file(cal)
    assert released.rdoq == 0.1 and "table_offset_rdoq" not in released.meta
    assert main(["release", "codec", str(ckpt), "--out", str(cal), "--rdoq", "-1"]) == 2


def test_weight_average_trains_resumes_and_releases(tmp_path, tiny_sources):
    """--ema: the checkpoint holds a moving average of the weights, between the start and the weights; a resumed
    run continues it (not restarted from the weights); `release codec --ema` ships it, and refuses a run
    trained without it."""
    over = {"N": 16, "M": 32, "groups": [16, 16], "Nz": 8, "Nh": 16, "ctx": 8, "ep": 16, "gs_width": 16,
            "gs_blocks": 1}
    cfg = training.TrainConfig(out=str(tmp_path / "run"), cache=str(tmp_path / "cache"), stage1_steps=4,
                               stage2_steps=0, batch=2, crop=128, checkpoint_every=2, overrides=over, lr=1e-3, ema=0.5)
    ckpt = training.train(cfg)
    state = torch.load(ckpt, weights_only=False)
    w, avg = state["model"]["g_a.0.weight"], state["ema"]["g_a.0.weight"]
    assert not torch.equal(w, avg) and torch.equal(state["model"]["rate_k"], state["ema"]["rate_k"])
    cfg.stage1_steps = 6
    training.train(cfg)
    state2 = torch.load(ckpt, weights_only=False)
    assert state2["step"] == 6 and not torch.equal(state2["ema"]["g_a.0.weight"], state2["model"]["g_a.0.weight"])
    # the average itself: decay x average + (1 - decay) x weights each step, resumed from a saved one
    lin = torch.nn.Linear(3, 2)
    wa = training.WeightAverage(lin, 0.5)
    old = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    wa.update(lin)
    assert torch.allclose(wa.state_dict(lin)["weight"], old + 0.5)
    again = training.WeightAverage(lin, 0.5, saved=wa.state_dict(lin))
    assert torch.equal(again.state_dict(lin)["weight"], wa.state_dict(lin)["weight"])
    out = tmp_path / "ema.safetensors"
    assert main(["release", "codec", str(ckpt), "--out", str(out), "--no-calibrate", "--ema"]) == 0
    codec = LatentCodec.from_file(out)
    assert torch.equal(codec.model.g_a[0].weight, state2["ema"]["g_a.0.weight"])
    assert "moving average" in codec.meta["weights"]
    img = cv2.imread(str(tiny_sources[0][1]))[:, :, ::-1].copy()
    assert codec.decompress(codec.compress(img, rate_point=0)).frame.shape == img.shape
    with pytest.raises(ValueError, match="ema"):
        training.train(dataclasses.replace(cfg, ema=1.0))
    # the learning curve measures the checkpoint's average with --ema, its weights without
    from latentcast.tools.codec_learning_curve import _load

    assert torch.equal(_load(ckpt, "ema")[0].g_a[0].weight, state2["ema"]["g_a.0.weight"])
    assert torch.equal(_load(ckpt)[0].g_a[0].weight, state2["model"]["g_a.0.weight"])
    plain = training.TrainConfig(out=str(tmp_path / "plain"), cache=str(tmp_path / "cache"), stage1_steps=1,
                                 stage2_steps=0, batch=2, crop=128, overrides=over)
    plain_ckpt = training.train(plain)
    assert main(["release", "codec", str(plain_ckpt), "--out", str(out), "--no-calibrate", "--ema"]) == 2
    with pytest.raises(SystemExit, match="no moving average"):
        _load(plain_ckpt, "ema")
    assert main(["release", "codec", str(plain_ckpt), "--out", str(out), "--no-calibrate", "--ema-slow"]) == 2
    # --ema-slow added to the running run: a second average, started at the first, slower from there on
    slow = dataclasses.replace(cfg, stage1_steps=8, ema_slow=0.9)
    training.train(slow)
    state3 = torch.load(ckpt, weights_only=False)
    fast_step, slow_step = (state3[k]["g_a.0.weight"] - state2["ema"]["g_a.0.weight"] for k in ("ema", "ema_slow"))
    assert 0 < slow_step.abs().max() < fast_step.abs().max()  # decay 0.9 moves less than 0.5 from the same start
    assert torch.equal(_load(ckpt, "ema_slow")[0].g_a[0].weight, state3["ema_slow"]["g_a.0.weight"])
    assert main(["release", "codec", str(ckpt), "--out", str(out), "--no-calibrate", "--ema-slow"]) == 0
    codec = LatentCodec.from_file(out)
    assert torch.equal(codec.model.g_a[0].weight, state3["ema_slow"]["g_a.0.weight"])
    assert "decay 0.9)" in codec.meta["weights"]
    with pytest.raises(SystemExit):  # one average or the other
        main(["release", "codec", str(ckpt), "--out", str(out), "--ema", "--ema-slow"])
    with pytest.raises(SystemExit, match="no slower moving average"):
        _load(plain_ckpt, "ema_slow")
    with pytest.raises(ValueError, match="ema_slow"):
        training.train(dataclasses.replace(slow, ema_slow=-0.1))


def test_two_workers_train_one_model(tmp_path, tiny_sources):
    """--workers 2: two processes average their gradients every step, so they stay in step (checked at every
    checkpoint, which would raise) and train a model that differs from worker 0's alone (the same start, seed and
    crops, which alone repeat exactly); worker 0 writes the checkpoint with its moving average; bad counts are
    refused."""
    import shutil

    over = {"N": 16, "M": 32, "groups": [16, 16], "Nz": 8, "Nh": 16, "ctx": 8, "ep": 16, "gs_width": 16,
            "gs_blocks": 1}
    base = dict(cache=str(tmp_path / "cache"), stage1_steps=2, stage2_steps=0, batch=2, crop=128,
                checkpoint_every=2, overrides=over, lr=1e-3, threads=1, ema=0.5)
    start = training.train(training.TrainConfig(out=str(tmp_path / "start"), **base))
    runs = {}
    for name, workers in (("one", 1), ("again", 1), ("two", 2)):
        (tmp_path / name).mkdir()
        shutil.copy(start, tmp_path / name / "last.pt")  # each resumes from the same step-2 checkpoint
        cfg = training.TrainConfig(out=str(tmp_path / name), workers=workers, **{**base, "stage1_steps": 6})
        runs[name] = torch.load(training.train(cfg), weights_only=False)
    assert runs["two"]["step"] == 6 and runs["two"]["train"]["workers"] == 2 and "ema" in runs["two"]
    w = {k: r["model"]["g_a.0.weight"] for k, r in runs.items()}
    assert torch.equal(w["one"], w["again"])  # worker 0 alone repeats itself exactly
    assert torch.isfinite(w["two"]).all() and not torch.equal(w["one"], w["two"])  # the other worker's gradients
    for bad in ({"workers": 0}, {"threads": 0}):
        with pytest.raises(ValueError, match="must be >= 1"):
            training.train(dataclasses.replace(cfg, **bad))


def test_channel_gains_train_release_and_code(tmp_path, tiny_sources):
    """--channel-gains: the offsets learn (their own learning rate), the release rounds them into per-channel
    steps and table offsets (calibration shifts a rate point's channels together), and frames round-trip; the
    run trains on the encoder's RDOQ symbols (--rdoq), which its checkpoint records."""
    over = {"N": 16, "M": 32, "groups": (16, 16), "Nz": 8, "Nh": 16, "ctx": 8, "ep": 16, "gs_width": 16, "gs_blocks": 1}
    cfg = training.TrainConfig(out=str(tmp_path / "run"), cache=str(tmp_path / "cache"), stage1_steps=4,
                               stage2_steps=1, batch=2, crop=128, checkpoint_every=2, overrides=over,
                               channel_gains=True, gain_lr=0.7, rdoq=0.05)
    ckpt = training.train(cfg)
    state = torch.load(ckpt, weights_only=False)
    gains = state["model"]["rate_gain"]
    assert state["train"]["rdoq"] == 0.05
    assert gains.shape == (4, 32) and (gains.round() != 0).any()
    out = tmp_path / "g.safetensors"
    assert main(["release", "codec", str(ckpt), "--out", str(out)]) == 0
    codec = LatentCodec.from_file(out)
    shifts = torch.tensor(codec.meta["table_offset_shifts"])[:, None]
    k_cfg = torch.tensor(codec.cfg.rate_steps)[:, None]
    assert torch.equal(codec.model.rate_k, k_cfg + gains.round().long() + shifts)
    expect = torch.round(torch.exp((k_cfg + gains.round().double()) * codec.cfg.log_step) * 256) / 256
    assert torch.equal(codec.model.rate_delta, expect)
    img = cv2.imread(str(tiny_sources[0][1]))[:, :, ::-1].copy()
    for q in range(codec.n_rates):
        assert codec.decompress(codec.compress(img, rate_point=q)).frame.shape == img.shape


def test_bf16_transforms_match_float32_and_train(tmp_path, tiny_sources):
    """--bf16: g_a and g_s in bfloat16 autocast give the float32 pass's latent and rates within bf16's precision
    (the entropy model stays float32), every parameter stays float32, and a run trains, checkpoints (the
    convolutions in channels_last) and releases a file that codes frames."""
    from latentcast.models.elic import CONFIGS, ElicCodec

    over = {"N": 16, "M": 32, "groups": (16, 16), "Nz": 8, "Nh": 16, "ctx": 8, "ep": 16, "gs_width": 16, "gs_blocks": 1}
    torch.manual_seed(0)
    model = ElicCodec(dataclasses.replace(CONFIGS["lite"], **over)).eval()
    x, rate = torch.rand(2, 3, 64, 64), torch.tensor([0, 1])
    with torch.no_grad():
        a, b = model(x, rate=rate), model(x, rate=rate, bf16=True)
    assert b["latent"].dtype == torch.float32 and b["bits_y"].dtype == torch.float32
    assert (a["latent"] - b["latent"]).abs().max() < 0.05 * a["latent"].abs().max()
    assert torch.allclose(a["bits_y"] + a["bits_z"], b["bits_y"] + b["bits_z"], rtol=0.05)
    cfg = training.TrainConfig(out=str(tmp_path / "run"), cache=str(tmp_path / "cache"), stage1_steps=2,
                               stage2_steps=1, batch=2, crop=128, checkpoint_every=2, overrides=over, bf16=True)
    ckpt = training.train(cfg)
    sd = torch.load(ckpt, weights_only=False)["model"]
    assert {k: v.dtype for k, v in sd.items()} == {k: v.dtype for k, v in model.state_dict().items()}
    out = tmp_path / "b.safetensors"
    assert main(["release", "codec", str(ckpt), "--out", str(out), "--no-calibrate"]) == 0
    codec = LatentCodec.from_file(out)
    img = cv2.imread(str(tiny_sources[0][1]))[:, :, ::-1].copy()
    assert codec.decompress(codec.compress(img, rate_point=0)).frame.shape == img.shape


def test_init_deepens_the_analysis_transform_as_the_identity():
    """--set res_blocks=2 --init <file with 1>: the file's blocks keep their places, each new block starts as the
    identity, so the deeper g_a computes exactly what the file's did; then it trains like any other."""
    from latentcast.models.elic import CONFIGS, ElicCodec

    base = {"N": 16, "M": 32, "groups": (16, 16), "Nz": 8, "Nh": 16, "ctx": 8, "ep": 16, "gs_width": 16, "gs_blocks": 1}
    torch.manual_seed(0)
    shallow = ElicCodec(dataclasses.replace(CONFIGS["lite"], **base))
    deep = ElicCodec(dataclasses.replace(CONFIGS["lite"], res_blocks=2, **base))
    training.load_init(deep, shallow.state_dict())
    assert len(deep.g_a) == len(shallow.g_a) + 3
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(deep.g_a(x), shallow.g_a(x))
    assert torch.equal(deep.g_a[3].weight, shallow.g_a[2].weight)  # stage 1's strided conv, moved past two blocks
    assert not deep.g_a[2].body[4].weight.any() and deep.g_a[2].body[0].weight.any()
    with pytest.raises(ValueError, match="cannot fit|lacks"):  # a shallower model from a deeper file: no guess
        training.load_init(ElicCodec(dataclasses.replace(CONFIGS["lite"], **base)), {
            k: v for k, v in deep.state_dict().items() if not k.startswith("g_a.1.")})


def test_init_deepens_the_synthesis_as_the_identity():
    """--set gs_blocks=2 --set gs_tail_blocks=2 --init <file with 1 and 1>: the new g_s blocks start as the identity,
    so the frame is the file's at step 0; a block the file has only part of is not guessed."""
    from latentcast.models.elic import CONFIGS, ElicCodec

    base = {"N": 16, "M": 32, "groups": (16, 16), "Nz": 8, "Nh": 16, "ctx": 8, "ep": 16, "gs_width": 16}
    torch.manual_seed(0)
    small = ElicCodec(dataclasses.replace(CONFIGS["lite"], gs_blocks=1, gs_tail_blocks=1, **base))
    big = ElicCodec(dataclasses.replace(CONFIGS["lite"], gs_blocks=2, gs_tail_blocks=2, **base))
    training.load_init(big, small.state_dict())
    y, mask, z = torch.randn(1, 32, 4, 4), torch.ones(1, 1, 4, 4), torch.randn(1, 8, 1, 1)
    with torch.no_grad():
        assert torch.equal(big.g_s(y, mask, z), small.g_s(y, mask, z))
    assert not big.g_s.trunk[1].body[2].weight.any() and big.g_s.trunk[1].body[0].weight.any()
    with pytest.raises(ValueError, match="g_s can only be deepened"):  # fewer blocks than the file: no silent cut
        training.load_init(ElicCodec(dataclasses.replace(CONFIGS["lite"], gs_blocks=1, gs_tail_blocks=1, **base)),
                           big.state_dict())
    partial = {k: v for k, v in big.state_dict().items() if not k.startswith("g_s.trunk.1.body.2.")}
    with pytest.raises(ValueError, match="lacks"):
        training.load_init(ElicCodec(dataclasses.replace(CONFIGS["lite"], gs_blocks=2, gs_tail_blocks=2, **base)),
                           partial)


def test_init_widens_the_analysis_and_keeps_its_outputs():
    """--set N=<wider> --init <file>: g_a and h_a keep the file's weights in their leading channels and the new
    channels start unread, so y and z are the file's exactly; the new channels are live (random), and their
    zero weights get gradients, so training can use them. A tensor outside g_a / h_a that would have to grow
    is still refused."""
    from latentcast.models.elic import CONFIGS, ElicCodec

    base = {"M": 32, "groups": (16, 16), "Nz": 8, "Nh": 16, "ctx": 8, "ep": 16, "gs_width": 16, "gs_blocks": 1}
    torch.manual_seed(0)
    narrow = ElicCodec(dataclasses.replace(CONFIGS["lite"], N=16, linear_path=True, **base))
    wide = ElicCodec(dataclasses.replace(CONFIGS["lite"], N=24, linear_path=True, **base))
    assert training.load_init(wide, narrow.state_dict()) == []
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        y_n, y_w = narrow.analyze(x), wide.analyze(x)
        assert torch.allclose(y_w, y_n, atol=1e-5)
        assert torch.allclose(wide.h_a(y_w), narrow.h_a(y_n), atol=1e-5)
        assert wide.g_a[0](x)[:, 16:].abs().sum() > 0  # the new channels carry something
    assert torch.equal(wide.g_a[2].weight[:16, :16], narrow.g_a[2].weight)
    assert not wide.g_a[2].weight[:16, 16:].any()
    wide.analyze(x).square().mean().backward()
    assert wide.g_a[2].weight.grad[:16, 16:].abs().sum() > 0
    with pytest.raises(ValueError, match="cannot fit"):
        training.load_init(ElicCodec(dataclasses.replace(CONFIGS["lite"], N=16, **{**base, "gs_width": 24})),
                           narrow.state_dict())


def test_init_widens_the_latent_with_new_groups(tmp_path, tiny_sources):
    """--set M=48 --set groups=16,16,16 --init <file with M=32, groups 16,16>: the old channels, their entropy
    model and the frame are the file's; the new group is coded (its own networks) but read by nothing at first;
    the trainer then points the new channels' linear analysis at what the codec misses, and trains."""
    from safetensors.torch import save_file

    from latentcast.models.elic import CONFIGS, ElicCodec

    base = {"N": 16, "Nz": 8, "Nh": 16, "ctx": 8, "ep": 16, "gs_width": 16, "gs_blocks": 1, "linear_path": True,
            "channel_gains": True}
    torch.manual_seed(0)
    small = ElicCodec(dataclasses.replace(CONFIGS["lite"], M=32, groups=(16, 16), **base))
    with torch.no_grad():
        small.rate_gain.normal_()
    big = ElicCodec(dataclasses.replace(CONFIGS["lite"], M=48, groups=(16, 16, 16), **base))
    training.load_init(big, small.state_dict())
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        y_s, y_b = small.analyze(x), big.analyze(x)
        assert torch.allclose(y_b[:, :32], y_s, atol=1e-5) and not y_b[:, 32:].any()
        big.reset_rate_points()
        small.reset_rate_points()
        r_s, r_b = small(x, rate=torch.tensor([1])), big(x, rate=torch.tensor([1]))
        assert torch.allclose(r_b["latent"], r_s["latent"], atol=1e-5)
    assert torch.equal(big.rate_gain[:, :32], small.rate_gain) and not big.rate_gain[:, 32:].any()
    assert torch.equal(big.g_s.head.weight[:, 32:48], torch.zeros_like(big.g_s.head.weight[:, 32:48]))
    assert torch.equal(big.g_s.head.weight[:, 48:], small.g_s.head.weight[:, 32:])  # mask and M(ẑ) moved along
    assert big.ep[2][2].conv.weight.any()  # the new group's own networks
    # the trainer: the new channels carry projections of the frame, the frame is still the file's at step 0
    init = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(init))
    over = {k: v for k, v in base.items() if k not in ("linear_path", "channel_gains")}
    cfg = training.TrainConfig(out=str(tmp_path / "run"), cache=str(tmp_path / "cache"), stage1_steps=2,
                               stage2_steps=0, batch=2, crop=128, init=str(init), channel_gains=True,
                               overrides={**over, "linear_path": True, "M": 48, "groups": [16, 16, 16]})
    state = torch.load(training.train(cfg), weights_only=False)
    assert state["model"]["a_lin.proj.weight"][32:].abs().sum() > 0
    with pytest.raises(ValueError, match="cannot fit|lacks"):  # a latent that is not the file's plus groups
        training.load_init(ElicCodec(dataclasses.replace(CONFIGS["lite"], M=48, groups=(32, 16), **base)),
                           small.state_dict())


def test_init_slices_a_wider_codec_and_resets_rate_points():
    from latentcast.models.elic import CONFIGS, ElicCodec

    base = {"N": 16, "M": 32, "groups": (16, 16), "Nh": 16, "ctx": 8, "ep": 16, "gs_width": 16, "gs_blocks": 1}
    torch.manual_seed(0)
    wide = ElicCodec(dataclasses.replace(CONFIGS["lite"], Nz=16, **base))
    wide.rate_k.add_(5)  # as a released, calibrated file would have
    narrow = ElicCodec(dataclasses.replace(CONFIGS["lite"], Nz=8, **base))
    sliced = training.load_init(narrow, wide.state_dict())
    assert "h_a.4.weight" in sliced and "g_s.global_net.0.weight" in sliced
    assert torch.equal(narrow.h_a[4].weight, wide.h_a[4].weight[:8])
    assert torch.equal(narrow.g_a[0].weight, wide.g_a[0].weight)
    assert narrow.rate_k.tolist() == list(narrow.cfg.rate_steps)
    with pytest.raises(ValueError, match="cannot fit"):
        training.load_init(wide, narrow.state_dict())


@pytest.mark.parametrize("rdoq", [0.0, 0.05, 0.5])
@pytest.mark.parametrize("which", ["tiny_codec", "tiny_gain_codec"])
def test_rate_proxy_matches_the_real_code_length(which, rdoq, request):
    """The training rate (the symbols under the Gaussian of the table the coder will use) is the ideal code
    length of the real symbols under the real integer tables, at every rate point (with channel gains too:
    every channel its own step and table), with the encoder's rate-distortion optimized quantization too
    (``train codec --rdoq``: the encoder's choice, with the Gaussian's bits for the tables' code lengths)."""
    tiny_codec = request.getfixturevalue(which)
    tiny_codec.rdoq = rdoq
    rng = np.random.default_rng(1)
    img = cv2.resize(rng.integers(0, 255, (16, 16, 3)).astype(np.uint8), (128, 128), interpolation=cv2.INTER_CUBIC)
    model = tiny_codec.model
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    y, z = tiny_codec.analyze(img)
    for q in range(model.n_rates):
        sym, idx = tiny_codec.encode_symbols(y, tiny_codec.z_symbols(z, q), rate_point=q,
                                             tx_mask=np.ones(y.shape[1:], bool))
        real = float(tiny_codec.y_tables.symbol_bits(sym, idx).sum())
        with torch.no_grad():
            proxy = float(model(x, rate=torch.tensor([q]), rdoq=rdoq)["bits_y"])
            plain = float(model(x, rate=torch.tensor([q]))["bits_y"])
        assert 0.9 < proxy / real < 1.1, (q, proxy, real)
        if rdoq > 0:  # fewer bits for more error
            assert proxy < plain, (q, proxy, plain)


def test_training_rdoq_is_the_encoders_choice_straight_through():
    """``rdoq_symbols`` (training) picks what ``proto.symbols.quantize_y`` (the encoder) picks under the Gaussian
    tables the codec ships, up to the tables' quantization of the probabilities; λ = 0 is plain rounding; the
    gradient passes straight through to y."""
    from latentcast.models.elic import ElicConfig, rdoq_symbols
    from latentcast.proto.entropy import TableSet, gaussian_tables
    from latentcast.proto.symbols import RDOQ_RADIUS, quantize_y

    cfg = ElicConfig()
    scales = cfg.scale_min * np.exp(np.arange(cfg.n_scales) * cfg.log_step)
    lengths = TableSet.centered(gaussian_tables(scales)).code_lengths(RDOQ_RADIUS)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, cfg.n_scales, 50_000)
    r = rng.normal(size=idx.size) * scales[idx] * rng.uniform(0.3, 2, idx.size)
    r[:8] = [-1.5, -0.5, 0.5, 1.5, 2.5, 0.0, 3.0, -2.0]  # ties and integers
    s = torch.from_numpy(scales[idx])
    assert torch.equal(rdoq_symbols(torch.from_numpy(r), s, 0.0), torch.from_numpy(np.floor(r + 0.5)))
    for lam in (0.05, 0.5):
        ours = rdoq_symbols(torch.from_numpy(r), s, lam).numpy()
        theirs = quantize_y(r, idx, lengths, lam)
        assert (ours == theirs).mean() > 0.995, lam
        assert (ours != np.floor(r + 0.5)).mean() > 0.01, lam  # it does move symbols
    with pytest.raises(ValueError, match="rdoq -0.1 out of range"):
        training._check_config(training.TrainConfig(rdoq=-0.1))


def test_table_calibration_codes_as_the_encoder_codes():
    """`release codec` calibrates the table offsets for the encoder as it codes (RDOQ λ, whose choice of symbols
    depends on the tables). On the committed v3 snapshot (trained on RDOQ symbols) and training images: offsets
    moved two steps off come back; in the encoder's own cost (bits + distortion/λ) they beat the offsets that
    calibration for plainly rounded symbols picks, which widen the tables (the regression that cost 1.4 points of
    BD-rate in real bytes); plain calibration itself finds its optimum from anywhere within its range."""
    from latentcast.models.codec import WEIGHTS_DIR

    from .conftest import shared_or_skip

    shared_or_skip()
    images = training.calibration_images(2, 256)
    codec = LatentCodec.from_file(WEIGHTS_DIR / "elic-lite-v3-snapshot.safetensors")
    trained = codec.model.rate_k.clone()
    analyzed = [codec.analyze(img) for img in images]

    def cost(c, q):
        return training.encoder_cost(c, analyzed, [c.z_symbols(z, q) for _y, z in analyzed], rate_point=q, rdoq=0.05)

    training.calibrate_table_offsets(codec, images, rdoq=0.05)
    best = codec.model.rate_k.clone()
    codec.model.rate_k.add_(2)
    assert training.calibrate_table_offsets(codec, images, rdoq=0.05) == [-2] * codec.n_rates
    assert torch.equal(codec.model.rate_k, best)
    plain = LatentCodec.from_file(WEIGHTS_DIR / "elic-lite-v3-snapshot.safetensors")
    shifts = training.calibrate_table_offsets(plain, images, search=8)
    assert any(shifts) and not torch.equal(plain.model.rate_k, best)
    for q in range(codec.n_rates):
        if not torch.equal(plain.model.rate_k[q], best[q]):
            assert cost(codec, q) < cost(plain, q), q
    plain_best = plain.model.rate_k.clone()
    plain.model.rate_k.copy_(trained - 5)
    assert training.calibrate_table_offsets(plain, images, search=8) == (plain_best - trained + 5)[:, 0].tolist()
    with pytest.raises(ValueError, match="rdoq -1 out of range"):
        training.calibrate_table_offsets(plain, images, rdoq=-1)
    with pytest.raises(ValueError, match="needs an RDOQ"):
        training.encoder_cost(plain, analyzed, [z for _y, z in analyzed], rate_point=0, rdoq=0)


def test_learning_curve_hours_add_up_across_resumes(tmp_path):
    """history.jsonl restarts its clock at each resume: a checkpoint's hours are the segments' sum."""
    from latentcast.tools.codec_learning_curve import _hours

    h = tmp_path / "history.jsonl"
    rows = [(50, 60), (100, 120), (150, 180),  # killed after step 150; resumed from the step-100 checkpoint
            (150, 50), (200, 110), (250, 170)]
    h.write_text("".join(json.dumps({"step": s, "sec": t}) + "\n" for s, t in rows))
    assert _hours(100, h) == pytest.approx(120 / 3600)
    assert _hours(200, h) == pytest.approx((180 + 110) / 3600)
    assert _hours(250, h) == pytest.approx((180 + 170) / 3600)
    assert _hours(10, h) is None and _hours(100, tmp_path / "missing.jsonl") is None


def test_learning_curve_reports_bd_rates_against_the_kodak_anchors(tmp_path, monkeypatch, caplog):
    """``--anchors``: each checkpoint's PSNR BD-rate against every classical codec of a Kodak eval.json (issue
    14's measure); a file without classical points is refused by name."""
    from latentcast.tools import codec_learning_curve as lc
    from latentcast.tools.eval.metrics import bd_rate

    ours = {"checkpoint": "c.safetensors", "step": None, "bpp": [0.1, 0.2, 0.4], "psnr": [26.0, 28.0, 30.0],
            "psnr_unquantized": 33.0}
    monkeypatch.setattr(lc, "_kodak_images", lambda n: [])
    monkeypatch.setattr(lc, "evaluate_checkpoint", lambda path, images, average=None, rdoq=0.0: dict(ours))
    anchors = tmp_path / "eval.json"
    webp = [(0.1, 27.0), (0.2, 29.0), (0.4, 31.0), (0.8, 33.0)]
    jpeg = [(0.15, 24.0), (0.3, 27.0), (0.6, 30.0), (1.2, 33.0)]
    anchors.write_text(json.dumps({"points": [{"codec": "webp", "bpp": b, "psnr": q} for b, q in webp]
                                   + [{"codec": "jpeg", "bpp": b, "psnr": q} for b, q in jpeg]
                                   + [{"codec": "latentcast-full", "bpp": 1.0, "psnr": 40.0}]}))
    out = tmp_path / "lc"
    assert lc.main(["c.safetensors", "--anchors", str(anchors), "--out", str(out)]) == 0
    (r,) = json.loads((out / "learning_curve.json").read_text())["points"]
    mine = list(zip(ours["bpp"], ours["psnr"]))
    assert r["bd_rate_psnr"] == {"webp": round(bd_rate(webp, mine), 1), "jpeg": round(bd_rate(jpeg, mine), 1)}
    assert r["bd_rate_psnr"]["webp"] > 0 > r["bd_rate_psnr"]["jpeg"]  # between the two, as these curves are
    doc = json.loads(anchors.read_text())
    anchors.write_text(json.dumps(doc | {"data": {"scored_frames": 24}}))  # anchors over 24 images, these over 0
    with caplog.at_level("WARNING", logger="latentcast.tools.codec_learning_curve"):
        lc.main(["c.safetensors", "--anchors", str(anchors), "--out", str(out)])
    assert "over 24 images, these over 0" in caplog.text
    anchors.write_text(json.dumps({"points": [{"codec": "latentcast-full", "bpp": 1.0, "psnr": 30.0}]}))
    with pytest.raises(SystemExit, match="has no points of webp, jpeg, x264, x265"):
        lc.main(["c.safetensors", "--anchors", str(anchors), "--out", str(out)])


def test_stage2_finishes_a_copy_of_the_run_with_whole_frames_and_warm_up(tmp_path, tiny_sources, monkeypatch):
    """The finishing pass of the model card: stage II on a copy of a stage-I run trains g_s only, draws masks
    for the share ``stage2_mask_fraction`` of the crops (none at 0) and warms Adam's lr up from afresh."""
    import shutil

    over = {"N": 16, "M": 32, "groups": (16, 16), "Nz": 8, "Nh": 16, "ctx": 8, "ep": 16, "gs_width": 16, "gs_blocks": 1}
    cfg = training.TrainConfig(out=str(tmp_path / "run"), cache=str(tmp_path / "cache"), stage1_steps=2,
                               stage2_steps=0, batch=2, crop=128, overrides=over)
    before = torch.load(training.train(cfg), weights_only=False)["model"]
    (tmp_path / "finish").mkdir()
    shutil.copy(tmp_path / "run" / "last.pt", tmp_path / "finish" / "last.pt")
    drawn = []
    real_masks = training.random_masks
    monkeypatch.setattr(training, "random_masks", lambda n, *a, **k: drawn.append(n) or real_masks(n, *a, **k))
    finish = dataclasses.replace(cfg, out=str(tmp_path / "finish"), stage2_steps=2, stage2_mask_fraction=0.0,
                                 warmup_steps=4, lr=1e-3)
    state = torch.load(training.train(finish), weights_only=False)
    assert (state["step"], state["stage"]) == (4, 2) and drawn == []
    assert state["opt"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 2 / 4)  # the 2nd step of a 4-step warm-up
    after = state["model"]
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"g_s"}
    more = dataclasses.replace(finish, stage2_steps=3, stage2_mask_fraction=0.5)
    training.train(more)
    assert drawn == [2]
    with pytest.raises(ValueError, match=r"stage2_mask_fraction 1.5 must be within \[0, 1\]"):
        training.train(dataclasses.replace(more, stage2_mask_fraction=1.5))
    with pytest.raises(ValueError, match="warmup_steps -1 must be >= 0"):
        training.train(dataclasses.replace(more, warmup_steps=-1))


def _crops_cache(tmp_path):
    """A training cache of two 'photographs' (a horizontal ramp of slope 0.5 per pixel, value 0..200) and one video
    frame (flat 250), as ``prepare_cache`` writes it for pixel targets."""
    ramp = np.repeat((np.arange(400) * 0.5).astype(np.uint8)[None, :, None], 300, 0).repeat(3, 2)
    for name, img in (("p0", ramp), ("p1", ramp), ("vtest-0001", np.full((256, 320, 3), 250, np.uint8))):
        np.savez(tmp_path / f"{name}.npz", image=img, latent=np.zeros(0, np.float16))
    return tmp_path


def test_random_crops_video_share_and_downscale(tmp_path):
    from latentcast.models.latent_spaces import load_latent_space

    cache, space = _crops_cache(tmp_path), load_latent_space("pixels:4")

    def crops(**kw):
        return training.RandomCrops(cache, 128, 4, np.random.default_rng(0), space, **kw).batch(32)[0] * 255

    def video_share(x):
        return float((x.mean((1, 2, 3)) > 240).float().mean())

    assert video_share(crops(video_fraction=0.0)) == 0.0
    assert video_share(crops(video_fraction=1.0)) == 1.0
    assert 0.2 < video_share(crops()) < 0.8  # the default: half and half
    photos = crops(video_fraction=0.0)
    slope = (photos[:, :, :, 1:] - photos[:, :, :, :-1]).abs().mean((1, 2, 3))  # ramp of 0.5 per pixel, or flipped
    assert torch.allclose(slope, torch.full_like(slope, 0.5), atol=0.03)
    scaled = crops(video_fraction=0.0, scale_min=0.5)
    assert scaled.shape == photos.shape
    slope = (scaled[:, :, :, 1:] - scaled[:, :, :, :-1]).abs().mean((1, 2, 3))  # 0.5 / s for a downscale s
    assert slope.min() > 0.47 and slope.max() < 1.03 and (slope > 0.65).sum() >= 8
    for kw, msg in (({"video_fraction": 1.5}, "video_fraction 1.5"), ({"scale_min": 0.0}, "scale_min 0.0")):
        with pytest.raises(ValueError, match=msg):
            crops(**kw)
    with pytest.raises(ValueError, match="needs a pixel latent space"):
        training.RandomCrops(cache, 128, 4, np.random.default_rng(0), None, scale_min=0.5)


def test_learning_curve_measures_another_folder_or_a_video(tmp_path, monkeypatch):
    """``--data``: the scored frames of an image folder or a video (every 8th, as `latentcast eval`), capped by
    ``--images``; no Kodak anchors unless given; a missing path is a clear error."""
    from latentcast.tools import codec_learning_curve as lc

    video = tmp_path / "clip.avi"
    vw = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(20):
        vw.write(np.full((48, 64, 3), i * 10, np.uint8))
    vw.release()
    frames = lc._data_frames(str(video), 24)
    assert len(frames) == 3 and [round(f.mean() / 10) for f in frames] == [0, 8, 16]  # frames 0, 8, 16
    assert len(lc._data_frames(str(video), 2)) == 2
    seen = {}

    def fake(path, images, average=None, rdoq=0.0):
        seen.update(n=len(images), rdoq=rdoq)
        return {"checkpoint": "c.safetensors", "step": None, "bpp": [0.1, 0.2], "psnr": [26.0, 28.0],
                "psnr_unquantized": 33.0}

    monkeypatch.setattr(lc, "evaluate_checkpoint", fake)
    assert lc.main(["c.safetensors", "--data", str(video), "--out", str(tmp_path / "lc")]) == 0
    doc = json.loads((tmp_path / "lc" / "learning_curve.json").read_text())
    assert seen["n"] == 3 and doc["data"] == str(video) and "anchors" not in doc
    assert seen["rdoq"] == 0.0 == doc["rdoq"]  # plain rounding unless asked, as the committed curves
    assert lc.main(["c.safetensors", "--data", str(video), "--rdoq", "0.08", "--out", str(tmp_path / "lc")]) == 0
    assert seen["rdoq"] == 0.08 == json.loads((tmp_path / "lc" / "learning_curve.json").read_text())["rdoq"]
    with pytest.raises(SystemExit, match="--rdoq: rdoq -1.0 out of range"):
        lc.main(["c.safetensors", "--data", str(video), "--rdoq", "-1", "--out", str(tmp_path / "lc")])
    assert "bd_rate_psnr" not in doc["points"][0]
    with pytest.raises(SystemExit, match="no such file"):
        lc.main(["c.safetensors", "--data", str(tmp_path / "missing.avi"), "--out", str(tmp_path / "lc")])
    monkeypatch.undo()  # the real measurement: a missing checkpoint is named, not a traceback
    with pytest.raises(SystemExit, match="no such checkpoint: .*missing.pt"):
        lc.main([str(tmp_path / "missing.pt"), "--data", str(video), "--out", str(tmp_path / "lc")])
