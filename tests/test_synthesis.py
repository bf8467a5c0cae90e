"""models.synthesis and models.synthesis_training: a cheaper g_s for a codec's packets.

Real training steps on two tiny images with the tiny seeded codec, resume, release, load, and the cloud
rendering with the released file; the file is refused for another codec."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

from latentcast.models import synthesis_training as st  # noqa: E402
from latentcast.models.codec import LatentCodec  # noqa: E402
from latentcast.models.elic import CONFIGS, ElicConfig, SynthesisToLatent  # noqa: E402
from latentcast.models.synthesis import load_synthesis, save_synthesis, synthesis_macs_per_cell  # noqa: E402
from latentcast.tools.cli import main  # noqa: E402


def test_config_synthesis_fields():
    lite = CONFIGS["lite"]
    assert lite.synthesis_up_widths == (128, 64)  # the shipped g_s: gs_width, then halved
    old = {k: v for k, v in lite.to_dict().items() if k not in ("gs_up_widths", "gs_tail_blocks")}
    assert ElicConfig.from_dict(json.loads(json.dumps(old))) == lite  # files written before the fields load
    narrow = dataclasses.replace(lite, gs_up_widths=(64, 32))
    assert ElicConfig.from_dict(json.loads(json.dumps(narrow.to_dict()))) == narrow
    with pytest.raises(ValueError, match=r"gs_up_widths \(64,\) has 1 widths; latent_factor 4 needs 2"):
        dataclasses.replace(lite, gs_up_widths=(64,))
    full, fast = SynthesisToLatent(lite), SynthesisToLatent(narrow)
    assert synthesis_macs_per_cell(full) > 2.4 * synthesis_macs_per_cell(fast)
    assert 6.5e6 < synthesis_macs_per_cell(full) < 7.5e6  # 6.9 M a cell, as measured for issue 17


def test_student_config_errors():
    with pytest.raises(ValueError, match="up_widths 'a,b'"):
        st.student_config(CONFIGS["lite"], st.SynthesisTrainConfig(up_widths="a,b"))
    with pytest.raises(ValueError, match="at least 8"):
        st.student_config(CONFIGS["lite"], st.SynthesisTrainConfig(up_widths="64,2"))


def test_train_resume_release_render(tmp_path, tiny_data, tiny_codec_path):
    cfg = st.SynthesisTrainConfig(codec=str(tiny_codec_path), out=str(tmp_path / "run"), up_widths="16,8",
                                  steps=3, batch=2, crop=64, checkpoint_every=2, eval_every=50)
    last = st.train_synthesis(cfg)
    state = torch.load(last, weights_only=False)
    assert state["step"] == 3 and tuple(state["student"]["gs_up_widths"]) == (16, 8)
    hist = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    n = LatentCodec.from_file(tiny_codec_path).n_rates
    assert hist[0]["step"] == 0 and len(hist[0]["kodak_psnr"]) == len(hist[0]["teacher_kodak_psnr"]) == n
    assert hist[-1]["step"] == 3 and len(hist[-1]["kodak_psnr"]) == n  # the last step is always evaluated
    cfg.steps, cfg.teacher_weight = 5, 0.5
    st.train_synthesis(cfg)  # resumes, now also distilling the codec's own g_s
    assert torch.load(last, weights_only=False)["step"] == 5
    with pytest.raises(ValueError, match="another codec or student shape"):
        st.train_synthesis(dataclasses.replace(cfg, up_widths="8,8"))

    out = tmp_path / "tiny-fast-synthesis.safetensors"
    assert main(["release", "synthesis", str(last), "--out", str(out)]) == 0
    codec = LatentCodec.from_file(tiny_codec_path)
    img = cv2.imread(str(tiny_data[0][1]))[:, :, ::-1].copy()
    data = codec.compress(img, rate_point=1)
    own = codec.decompress(data).frame
    codec.use_synthesis(str(out))
    assert codec.synthesis_name == "tiny-fast"
    assert codec.model.g_s.up[0].out_channels == 4 * 16
    fast = codec.decompress(data)
    y_hat, z_t, tx = codec.decode_y(fast.packet)
    sf = load_synthesis(str(out), codec.cfg, codec.weights_hash)
    with torch.no_grad():
        want = sf.g_s(y_hat.float(), torch.ones(1, 1, *tx.shape), z_t.float())
    h, w = img.shape[:2]
    assert np.array_equal(fast.latent, want[0, :, : -(-h // 4), : -(-w // 4)].numpy())
    assert fast.frame.shape == own.shape and not np.array_equal(fast.frame, own)
    codec.use_synthesis("own")
    assert codec.synthesis_name == "" and np.array_equal(codec.decompress(data).frame, own)

    # a deeper student grown from the released file (--init) starts as exactly that file
    grown = dataclasses.replace(cfg, out=str(tmp_path / "grown"), init=str(out), blocks=cfg.blocks + 1,
                                tail_blocks=cfg.tail_blocks + 1, steps=0)
    st.train_synthesis(grown)
    first = json.loads((tmp_path / "grown" / "history.jsonl").read_text().splitlines()[0])
    released = json.loads((tmp_path / "run" / "history.jsonl").read_text().splitlines()[-1])  # step 5, evaluated
    assert released["step"] == 5 and first["kodak_psnr"] == released["kodak_psnr"] != first["teacher_kodak_psnr"]


def test_synthesis_refused_for_another_codec(tmp_path, tiny_codec):
    cfg = dataclasses.replace(tiny_codec.cfg, gs_up_widths=(16, 8))
    path = save_synthesis(SynthesisToLatent(cfg), cfg, b"\x01" * 16, tmp_path / "x-synthesis.safetensors")
    with pytest.raises(ValueError, match="trained for codec weights 0101010101010101, this codec is"):
        load_synthesis(str(path), tiny_codec.cfg, tiny_codec.weights_hash)
    other = dataclasses.replace(cfg, M=32, groups=(16, 16))
    path = save_synthesis(SynthesisToLatent(other), other, tiny_codec.weights_hash,
                          tmp_path / "y-synthesis.safetensors")
    with pytest.raises(ValueError, match="differs from the codec in M, groups"):
        load_synthesis(str(path), tiny_codec.cfg, tiny_codec.weights_hash)
    with pytest.raises(FileNotFoundError, match="no synthesis named 'nope'"):
        load_synthesis("nope", tiny_codec.cfg, tiny_codec.weights_hash)
    with pytest.raises(ValueError, match="not a latentcast synthesis file"):
        load_synthesis(str(tiny_codec.path), tiny_codec.cfg, tiny_codec.weights_hash)


def test_auto_and_own(tmp_path, tiny_codec_path, monkeypatch):
    from latentcast.cloud.config import CodecConfig
    from latentcast.models import synthesis

    codec = LatentCodec.from_file(tiny_codec_path)
    assert synthesis.find_synthesis(codec.weights_hash) is None  # nothing shipped for the tiny codec
    codec.use_synthesis(CodecConfig().synthesis)  # the cloud's default, auto: the codec's own
    assert codec.synthesis_name == ""
    cfg = dataclasses.replace(codec.cfg, gs_up_widths=(16, 8))
    save_synthesis(SynthesisToLatent(cfg), cfg, b"\x02" * 16, tmp_path / "a-other-synthesis.safetensors")
    mine = save_synthesis(SynthesisToLatent(cfg), cfg, codec.weights_hash, tmp_path / "b-mine-synthesis.safetensors")
    assert synthesis.find_synthesis(codec.weights_hash, tmp_path) == mine  # the other codec's file is skipped
    monkeypatch.setattr(synthesis, "weights_dir", lambda: tmp_path)
    codec.use_synthesis("auto")
    assert codec.synthesis_name == "b-mine" and codec.model.g_s.up[0].out_channels == 64
    codec.use_synthesis("own")
    assert codec.synthesis_name == "" and codec.model.g_s.up[0].out_channels == 4 * codec.cfg.gs_width
    for bad in ("", "  "):
        with pytest.raises(ValueError, match="codec.synthesis"):
            CodecConfig(synthesis=bad)


def test_temporal_streams_render_with_their_own_synthesis(tmp_path, tiny_codec_path):
    from latentcast.cloud.config import CodecConfig
    from latentcast.models.temporal import TemporalDecoder
    from latentcast.proto.temporal import TemporalTables

    codec = LatentCodec.from_file(tiny_codec_path)
    own = codec.model.g_s
    assert codec.temporal_g_s is own and codec.temporal_synthesis_name is None  # unset: as frames render
    codec.use_synthesis(CodecConfig().temporal_synthesis, temporal=True)  # auto: nothing shipped for it
    assert codec.temporal_g_s is own and codec.temporal_synthesis_name == ""
    cfg = dataclasses.replace(codec.cfg, gs_up_widths=(16, 8))
    path = save_synthesis(SynthesisToLatent(cfg), cfg, codec.weights_hash, tmp_path / "t-synthesis.safetensors")
    codec.use_synthesis(str(path), temporal=True)
    assert codec.model.g_s is own and codec.synthesis_name == ""  # independent frames keep theirs
    assert codec.temporal_synthesis_name == "t" and codec.temporal_g_s.up[0].out_channels == 64
    tables = TemporalTables.flat(M=codec.M, n_rates=codec.n_rates)
    for runtime in ("torch", "onnx"):
        assert TemporalDecoder(codec=codec, tables=tables, runtime=runtime).g_s is codec.temporal_g_s
    with pytest.raises(ValueError, match="codec.temporal_synthesis ' ' must be auto, own"):
        CodecConfig(temporal_synthesis=" ")


def test_the_ray_synthesis_renders_temporal_states_with_the_temporal_synthesis(tmp_path, tiny_codec_path):
    """The front computes M(ẑ) with codec.temporal_synthesis; the Synthesis deployment must render with it."""
    pytest.importorskip("ray")
    from dataclasses import asdict

    from latentcast.cloud.config import CodecConfig
    from latentcast.cloud.serve_stages import Synthesis

    codec = LatentCodec.from_file(tiny_codec_path)
    cfg = dataclasses.replace(codec.cfg, gs_up_widths=(16, 8))
    path = save_synthesis(SynthesisToLatent(cfg), cfg, codec.weights_hash, tmp_path / "t-synthesis.safetensors")
    cls = getattr(Synthesis, "func_or_class", Synthesis)
    stage = cls(asdict(CodecConfig(weights=str(tiny_codec_path), temporal_synthesis=str(path))))
    assert stage.codec.temporal_synthesis_name == "t" and stage.codec.synthesis_name == ""
    assert stage.codec.temporal_g_s.up[0].out_channels == 64 and stage.codec.temporal_g_s is not stage.codec.model.g_s


def test_deeper_student_starts_as_the_codecs_own_g_s(tmp_path, tiny_data, tiny_codec_path):
    """Blocks added to the codec's layout start as the identity: at step 0 the student renders exactly
    what the codec's own g_s renders (the history's first entry holds both)."""
    codec_cfg = LatentCodec.from_file(tiny_codec_path).cfg
    cfg = st.SynthesisTrainConfig(codec=str(tiny_codec_path), out=str(tmp_path / "run"), up_widths="",
                                  blocks=codec_cfg.gs_blocks + 2, tail_blocks=codec_cfg.gs_tail_blocks + 1,
                                  steps=0, batch=2, crop=64, eval_every=50)
    st.train_synthesis(cfg)
    first = json.loads((tmp_path / "run" / "history.jsonl").read_text().splitlines()[0])
    assert first["kodak_psnr"] == first["teacher_kodak_psnr"]
    cfg.out, cfg.steps, cfg.bf16 = str(tmp_path / "run-bf16"), 2, True
    assert torch.load(st.train_synthesis(cfg), weights_only=False)["step"] == 2


def test_wrong_init_fails_before_the_decoder_inputs(tmp_path, tiny_data, tiny_codec_path):
    cfg = st.SynthesisTrainConfig(codec=str(tiny_codec_path), out=str(tmp_path / "run"), init="no-such-synthesis",
                                  steps=1, batch=2, crop=64)
    with pytest.raises(FileNotFoundError, match="no synthesis named 'no-such-synthesis'"):
        st.train_synthesis(cfg)
    assert not (tmp_path / "cache" / "synthesis").exists()  # nothing was computed or cached


def test_warm_up_on_a_fresh_start_not_on_resume(tmp_path, tiny_data, tiny_codec_path):
    """``--warmup-steps``: the lr ramps up from a fresh Adam; a resumed run (Adam's state restored) does not ramp
    again. One schedule for both trainers (models.training.scheduled_lr)."""
    from latentcast.models.training import scheduled_lr

    assert scheduled_lr(1.0, 0, start=0, length=100, opt_start=0, warmup=4) == pytest.approx(0.25)
    assert scheduled_lr(1.0, 3, start=0, length=100, opt_start=0, warmup=4) == 1.0
    assert scheduled_lr(1.0, 80, start=0, length=100, opt_start=None, warmup=4) == 0.5  # the last 20 %
    assert scheduled_lr(1.0, 1001, start=1000, length=10, opt_start=1000, warmup=4) == pytest.approx(0.5)
    cfg = st.SynthesisTrainConfig(codec=str(tiny_codec_path), out=str(tmp_path / "run"), up_widths="16,8",
                                  steps=3, batch=2, crop=64, checkpoint_every=2, eval_every=50, warmup_steps=10)
    st.train_synthesis(cfg)
    cfg.steps = 5
    st.train_synthesis(cfg)
    lrs = [json.loads(line).get("lr") for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    lrs = [v for v in lrs if v is not None]
    assert lrs == [pytest.approx(cfg.lr * 3 / 10), pytest.approx(cfg.lr * 0.5)]  # step 3 of 10 warm; step 5 resumed
    with pytest.raises(ValueError, match="warmup_steps -1 must be >= 0"):
        st.train_synthesis(dataclasses.replace(cfg, warmup_steps=-1))
