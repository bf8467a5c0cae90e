"""The `latentcast` command: encode / info / decode as a user runs them (tiny seeded codec)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

from latentcast.tools.cli import main  # noqa: E402


def test_encode_info_decode(tmp_path, photo, tiny_codec_path, tiny_bundle, capsys):
    lcf = tmp_path / "photo.lcf"
    assert main(["encode", str(photo), "--roi", "20,30,120,100,1", "--rate", "2", "--bundle", str(tiny_bundle),
                 "-o", str(lcf)]) == 0
    assert "ROI-only" in capsys.readouterr().out
    assert main(["info", str(lcf)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["width"] == 240 and info["height"] == 176 and info["roi_only"]
    assert info["rois"][0]["label_id"] == 1 and info["total_bytes"] == lcf.stat().st_size
    out = tmp_path / "rec.png"
    assert main(["decode", str(lcf), "--weights", str(tiny_codec_path), "-o", str(out),
                 "--latent", str(tmp_path / "lat.npy")]) == 0
    rec = cv2.imread(str(out))
    assert rec.shape == (176, 240, 3)
    assert np.load(tmp_path / "lat.npy").shape == (48, 44, 60)


def test_pytorch_and_onnx_encoders_agree(tmp_path, photo, tiny_codec_path, tiny_bundle, capsys):
    """Both encoders make packets the decoder accepts; they differ only where g_a's float rounding
    (ONNX Runtime vs PyTorch) lands on a quantization boundary, which is the encoder's free choice."""
    import dataclasses

    from latentcast.models.codec import LatentCodec
    from latentcast.proto.bitstream import Packet

    a, b = tmp_path / "a.lcf", tmp_path / "b.lcf"
    assert main(["encode", str(photo), "--weights", str(tiny_codec_path), "-o", str(a)]) == 0
    assert main(["encode", str(photo), "--bundle", str(tiny_bundle), "--analysis", "float32", "-o", str(b)]) == 0
    pa, pb = Packet.from_bytes(a.read_bytes()), Packet.from_bytes(b.read_bytes())
    assert dataclasses.replace(pa.header, symbol_crc=0) == dataclasses.replace(pb.header, symbol_crc=0)
    assert abs(a.stat().st_size - b.stat().st_size) <= 0.02 * a.stat().st_size
    codec = LatentCodec.from_file(tiny_codec_path)
    la = codec.decompress(pa, decode_frame=False).latent
    lb = codec.decompress(pb, decode_frame=False).latent
    assert np.abs(la - lb).mean() < 1e-2 * (np.abs(la).mean() + 1e-6)
    # the bundle's default, g_a in int8: another y, a packet of the same kind the decoder takes as well
    c = tmp_path / "c.lcf"
    assert main(["encode", str(photo), "--bundle", str(tiny_bundle), "-o", str(c)]) == 0
    pc = Packet.from_bytes(c.read_bytes())
    assert dataclasses.replace(pc.header, symbol_crc=0) == dataclasses.replace(pb.header, symbol_crc=0)
    assert codec.decompress(pc, decode_frame=False).latent.shape == la.shape
    assert main(["encode", str(photo), "--bundle", str(tiny_bundle), "--analysis", "int4", "-o", str(c)]) == 2
    assert "analysis 'int4' is not one of int8, float32" in capsys.readouterr().err


def test_encode_with_a_coded_background(tmp_path, photo, tiny_codec_path, tiny_bundle, capsys):
    lcf = tmp_path / "bg.lcf"
    assert main(["encode", str(photo), "--roi", "20,30,120,100,1", "--rate", "2", "--background", "0",
                 "--bundle", str(tiny_bundle), "-o", str(lcf)]) == 0
    assert "ROIs + background at rate point 0" in capsys.readouterr().out
    assert main(["info", str(lcf)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == 2 and info["bg_rate_point"] == 0 and info["levels"] == {"roi": 2, "background": 0}
    assert main(["decode", str(lcf), "--weights", str(tiny_codec_path), "-o", str(tmp_path / "bg.png")]) == 0
    assert "192/192 latent cells transmitted" in capsys.readouterr().out  # 240x176 pads to 256x192: 16 x 12 cells
    only = tmp_path / "only.lcf"
    assert main(["encode", str(photo), "--roi", "20,30,120,100,1", "--rate", "2", "--bundle", str(tiny_bundle),
                 "-o", str(only)]) == 0
    assert only.stat().st_size < lcf.stat().st_size
    capsys.readouterr()
    assert main(["info", str(only)]) == 0
    assert json.loads(capsys.readouterr().out)["levels"] == {"roi": 2, "background": "none"}


def test_encode_rdoq_choice(tmp_path, photo, tiny_codec_path, tiny_bundle, capsys):
    """`encode --rdoq 0` rounds plainly, the default chooses symbols for bits too, a strong λ for bits above all:
    the packets shrink in that order and all decode; a negative λ is a clear error."""
    sizes = []
    for lam in ("0", None, "1"):
        lcf = tmp_path / f"rdoq-{lam}.lcf"
        extra = [] if lam is None else ["--rdoq", lam]
        assert main(["encode", str(photo), "--rate", "2", "--bundle", str(tiny_bundle), "-o", str(lcf), *extra]) == 0
        assert main(["decode", str(lcf), "--weights", str(tiny_codec_path), "-o", str(tmp_path / "rec.png")]) == 0
        sizes.append(lcf.stat().st_size)
    assert sizes[0] > sizes[1] > sizes[2], sizes
    capsys.readouterr()
    bad = ["encode", str(photo), "--rdoq", "-1", "--bundle", str(tiny_bundle), "-o", str(tmp_path / "x.lcf")]
    assert main(bad) == 2
    assert "rdoq -1.0 out of range: a number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "x.lcf").exists()


@pytest.mark.parametrize("args,message", [
    (["--roi", "20,30,120,100", "--rate", "1", "--background", "2"], r"background 2 out of range: None .* 0\.\.1"),
    (["--roi", "20,30,120,100", "--background", "coarse"], r"--background: background 'coarse': expected 'none'"),
    (["--background", "0"], r"--background codes the cells outside the ROIs: give --roi or --labels"),
    (["--roi", "20,30,120,100", "--full", "--background", "0"], r"--background codes the cells outside the ROIs"),
])
def test_bad_background_is_a_clear_error(tmp_path, photo, tiny_bundle, args, message):
    with pytest.raises(SystemExit, match=message):
        main(["encode", str(photo), *args, "--bundle", str(tiny_bundle), "-o", str(tmp_path / "x.lcf")])
    assert not (tmp_path / "x.lcf").exists()


def test_bad_roi_is_a_clear_error(tmp_path, photo, tiny_bundle):
    with pytest.raises(SystemExit, match="outside the 240x176 image"):
        main(["encode", str(photo), "--roi", "0,0,500,10", "--bundle", str(tiny_bundle), "-o", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        main(["encode", str(photo), "--roi", "1,2,3", "-o", str(tmp_path / "x")])


def test_encode_with_labels_grounds_rois(tmp_path, tiny_bundle, capsys):
    """`encode --labels person` on a vtest frame: YOLOX-nano finds pedestrians, their boxes become the
    packet's ROIs (label id 0 = 'person') and the header carries the label list's hash."""
    from latentcast.proto.bitstream import Packet
    from latentcast.proto.ids import label_set_hash

    from .conftest import shared_or_skip

    video = shared_or_skip() / "data" / "video" / "vtest.avi"
    lcf = tmp_path / "v.lcf"
    assert main(["encode", str(video), "--labels", "person", "--bundle", str(tiny_bundle), "-o", str(lcf)]) == 0
    assert "person" in capsys.readouterr().out
    hd = Packet.from_bytes(lcf.read_bytes()).header
    assert hd.roi_only and len(hd.rois) >= 2 and {r.label_id for r in hd.rois} == {0}
    assert hd.label_set_hash == label_set_hash(["person"])
    assert main(["encode", str(video), "--labels", "unicorn", "--bundle", str(tiny_bundle), "-o", str(lcf)]) == 2
    assert "unicorn" in capsys.readouterr().err


def test_bench_composer_runs_from_the_cli(tmp_path):
    """``latentcast bench composer``: both composers timed on a vtest frame, the command recorded as typed."""
    pytest.importorskip("diffusers")
    from tests.conftest import shared_or_skip

    shared_or_skip()
    out = tmp_path / "composer.json"
    assert main(["bench", "composer", "--steps", "1", "--repeats", "1", "--batch", "1", "--strength", "1",
                 "--no-detector", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {(r["composer"], r.get("steps")) for r in result["runs"]} == {("none", None), ("controlnet", 1)}
    assert all(r["seconds_per_frame"] > 0 for r in result["runs"])
    assert result["command"].split()[0] == "latentcast"  # the program as typed (argv is pytest's here)
    assert "| composer |" in out.with_suffix(".md").read_text()


# ---------------------------------------------------------------------- the command's shape


def _readme_commands() -> list[str]:
    """Every ``latentcast ...`` line of the README's shell blocks (comments and env prefixes dropped)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    lines = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            line = re.sub(r"^(?:[A-Z_]+=\S+\s+)+", "", line)  # LATENTCAST_EDGE__...=true latentcast edge ...
            if line.startswith("latentcast "):
                lines.append(line)
    return lines


def test_every_readme_command_parses():
    """The README's commands keep their spelling: each parses (nothing runs)."""
    import shlex

    from latentcast.tools.cli import build_parser

    commands = _readme_commands()
    assert len(commands) > 20 and any(c.startswith("latentcast train codec") for c in commands)
    for line in commands:
        args = build_parser().parse_args(shlex.split(line)[1:])
        assert callable(args.func), line


def test_train_options_are_the_dataclass_defaults():
    """``train codec`` and ``train composer`` take their defaults from the config dataclasses (one place)."""
    from latentcast.models.composer_training import ComposerTrainConfig
    from latentcast.models.training import TrainConfig
    from latentcast.tools.cli import build_parser
    from latentcast.tools.options import dataclass_from_args

    a = build_parser().parse_args(["train", "codec"])
    assert dataclass_from_args(TrainConfig, a) == TrainConfig()
    assert TrainConfig().lr == 2e-4  # what the shipped weights and the README's training command use
    a = build_parser().parse_args(["train", "codec", "--steps-1", "5", "--lr", "5e-5", "--mask-fraction", "0.25"])
    cfg = dataclass_from_args(TrainConfig, a)
    assert (cfg.stage1_steps, cfg.lr, cfg.mask_fraction) == (5, 5e-5, 0.25)
    a = build_parser().parse_args(["train", "composer", "--sd", "tiny", "--train-gs", "--precision", "bf16"])
    cfg = dataclass_from_args(ComposerTrainConfig, a)
    assert cfg == ComposerTrainConfig(sd="tiny", train_gs=True, precision="bf16")


@pytest.mark.parametrize("argv", [
    ["bench", "stream", "--kodak", "3"],  # a codec-benchmark option
    ["bench", "codec", "--streams", "1"],  # a stream-benchmark option
    ["train", "codec", "--sd", "tiny"],  # a composer option
    ["train", "temporal", "--lr", "1e-4"],  # a codec option
    ["export", "edge", "--model", "tiny-random"],  # a grounding-export option
])
def test_each_subcommand_has_only_its_own_options(argv, capsys):
    from latentcast.tools.cli import main as cli_main

    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_service_commands_do_not_import_torch():
    """Declaring and parsing the edge's commands needs no torch (the edge has none)."""
    import subprocess
    import sys

    code = ("import sys; from latentcast.tools.cli import build_parser\n"
            "for argv in (['edge', '--describe'], ['info', 'x.lcf'], ['task', 'list'], ['token', 'hash']):\n"
            "    build_parser().parse_args(argv)\n"
            "print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_results_commands_leave_out_this_machines_folders(monkeypatch, tmp_path):
    """provenance.command: the home folder as ~, the shared folder as $LATENTCAST_SHARED, the current one relative."""
    import sys
    from pathlib import Path

    from latentcast.tools import provenance

    monkeypatch.chdir(tmp_path)
    home = str(Path.home())
    monkeypatch.setattr(sys, "argv", ["x", "--out", str(tmp_path / "res"), "--history",
                                      home + "/.cache/latentcast/runs/r/history.jsonl", "--lr", "1e-4", "rel/p"])
    expect = "tool --out res --history ~/.cache/latentcast/runs/r/history.jsonl --lr 1e-4 rel/p"
    assert provenance.command("tool") == expect
    # a results file's own paths (e.g. codec_learning_curve's checkpoints) are recorded the same way
    assert provenance.portable_arg(home + "/.cache/latentcast/ab/a/step200.pt") == "~/.cache/latentcast/ab/a/step200.pt"
    assert provenance.portable_arg("rel/p") == "rel/p"


def test_results_without_a_suffix_are_written_as_json(tmp_path):
    """``--out results/x`` writes results/x.json and results/x.md (it wrote a JSON file named ``x``)."""
    from latentcast.tools.provenance import results_path, write_results

    out = write_results(tmp_path / "bench", {"a": 1}, "| a |")
    assert out == tmp_path / "bench.json" and json.loads(out.read_text()) == {"a": 1}
    assert (tmp_path / "bench.md").read_text() == "| a |" and not (tmp_path / "bench").exists()
    assert results_path("r/eval.json").name == "eval.json"
