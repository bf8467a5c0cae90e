"""`latentcast encode / decode / info` failures are one-line errors with a non-zero exit (issue 15, item 7)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

from latentcast.proto.bitstream import MAX_PACKET_BYTES  # noqa: E402
from latentcast.tools.cli import main  # noqa: E402

VALID = r"\.png, \.jpg, \.jpeg, \.bmp, \.webp, \.tif, \.tiff, \.ppm"


@pytest.fixture
def packet(tmp_path, photo, tiny_bundle):
    lcf = tmp_path / "photo.lcf"
    assert main(["encode", str(photo), "--rate", "0", "--bundle", str(tiny_bundle), "-o", str(lcf)]) == 0
    return lcf


def decode(lcf, out, weights, *more):
    return main(["decode", str(lcf), "--weights", str(weights), "-o", str(out), *more])


# 1. an output folder that does not exist / a write that fails


def test_decode_into_a_missing_folder_is_an_error(tmp_path, packet, tiny_codec_path, capsys):
    out = tmp_path / "missing" / "dir" / "x.png"
    with pytest.raises(
        SystemExit, match=r"^error: -o '.*/missing/dir/x\.png': folder '.*/missing/dir' does not exist$"
    ):
        decode(packet, out, tiny_codec_path)
    assert not out.exists() and not out.parent.exists()
    assert capsys.readouterr().out == ""  # no success line


def test_decode_into_a_file_as_folder_is_an_error(tmp_path, packet, photo, tiny_codec_path):
    with pytest.raises(SystemExit, match=r"folder '.*photo\.png' is not a folder"):
        decode(packet, photo / "x.png", tiny_codec_path)


def test_decode_latent_into_a_missing_folder_is_an_error(tmp_path, packet, tiny_codec_path):
    out = tmp_path / "rec.png"
    with pytest.raises(
        SystemExit, match=r"^error: --latent '.*/nowhere/lat\.npy': folder '.*/nowhere' does not exist$"
    ):
        decode(packet, out, tiny_codec_path, "--latent", str(tmp_path / "nowhere" / "lat.npy"))
    assert not out.exists()  # refused before anything was decoded or written


def test_decode_reports_a_failed_write(tmp_path, packet, tiny_codec_path, monkeypatch, capsys):
    monkeypatch.setattr(cv2, "imwrite", lambda *args, **kw: False)  # disk full, no permission, ...
    out = tmp_path / "rec.png"
    with pytest.raises(SystemExit, match=r"^error: could not write '.*rec\.png' \(cv2\.imwrite failed\)$"):
        decode(packet, out, tiny_codec_path)
    assert capsys.readouterr().out == ""


# 2. an output that is not an image format


@pytest.mark.parametrize("name,what", [("out.txt", "a .txt file"), ("out", "a file without an extension"),
                                       ("out.lcf", "a .lcf file")])
def test_decode_refuses_an_output_that_is_not_an_image(tmp_path, packet, name, what):
    out = tmp_path / name
    # refused up front: the weights are not even loaded (this file does not exist)
    with pytest.raises(
        SystemExit, match=rf"^error: -o '.*{name}': cannot write {what} as an image; use one of {VALID}$"
    ):
        decode(packet, out, tmp_path / "no-such-weights.safetensors")
    assert not out.exists()


def test_decode_accepts_every_listed_image_format(tmp_path, packet, tiny_codec_path, capsys):
    from latentcast.tools.packet import IMAGE_EXTENSIONS

    assert IMAGE_EXTENSIONS == (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
    img = np.zeros((8, 8, 3), np.uint8)
    for ext in IMAGE_EXTENSIONS:  # this OpenCV build writes all of them
        assert cv2.imwrite(str(tmp_path / f"probe{ext}"), img), ext
    out = tmp_path / "rec.JPG"  # the extension's case does not matter
    assert decode(packet, out, tiny_codec_path) == 0
    assert cv2.imread(str(out)).shape == (176, 240, 3)
    assert capsys.readouterr().out.startswith(f"{out}: 240x176")


# 3. over-large and missing input files (decode and info)


@pytest.mark.parametrize("cmd", ["decode", "info"])
def test_an_oversized_input_is_refused_before_reading(tmp_path, cmd, monkeypatch, tiny_codec_path):
    big = tmp_path / "big.lcf"
    with open(big, "wb") as f:
        f.truncate(MAX_PACKET_BYTES + 1)  # sparse: no disk, no memory

    def no_read(*args, **kw):
        raise AssertionError("the file was read")

    monkeypatch.setattr("builtins.open", no_read)
    monkeypatch.setattr("pathlib.Path.read_bytes", no_read)
    args = [cmd, str(big)] + (
        ["--weights", str(tiny_codec_path), "-o", str(tmp_path / "x.png")] if cmd == "decode" else []
    )
    with pytest.raises(SystemExit, match=rf"^error: '.*big\.lcf' is {MAX_PACKET_BYTES + 1} bytes, more than "
                                         rf"a packet can be \(MAX_PACKET_BYTES={MAX_PACKET_BYTES}\)$"):
        main(args)


@pytest.mark.parametrize("cmd", ["decode", "info"])
def test_a_missing_input_is_a_clear_error(tmp_path, cmd, tiny_codec_path):
    missing = tmp_path / "nope.lcf"
    args = [cmd, str(missing)] + (
        ["--weights", str(tiny_codec_path), "-o", str(tmp_path / "x.png")] if cmd == "decode" else []
    )
    with pytest.raises(SystemExit, match=r"^error: '.*nope\.lcf' does not exist$"):
        main(args)
    with pytest.raises(SystemExit, match=r"^error: cannot read '.*': Is a directory$"):
        main([cmd, str(tmp_path), *args[2:]])


# 4. a frame larger than the decoder accepts


@pytest.fixture
def small_limit(monkeypatch):
    """The decoder limit lowered to one pixel less than the 240x176 photo (the real one is 4096*2304)."""
    import latentcast.proto.bitstream as bitstream

    monkeypatch.setattr(bitstream, "MAX_DECODE_PIXELS", 240 * 176 - 1)
    return 240 * 176 - 1


def test_encode_refuses_a_frame_over_the_decoder_limit(tmp_path, photo, tiny_bundle, small_limit, monkeypatch):
    import latentcast.edge.encoder as edge

    def no_encode(*args, **kw):
        raise AssertionError("the frame was encoded")

    monkeypatch.setattr(edge.EdgeEncoder, "compress", no_encode)
    out = tmp_path / "x.lcf"
    with pytest.raises(SystemExit, match=rf"^error: '.*photo\.png' is 240x176 = 42240 pixels, more than the decoder "
                                         rf"limit of {small_limit} pixels; resize it first$"):
        main(["encode", str(photo), "--bundle", str(tiny_bundle), "-o", str(out)])
    assert not out.exists()


def test_encode_checks_a_videos_first_frame_too(tmp_path, photo, tiny_bundle, small_limit):
    video = tmp_path / "clip.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (240, 176))
    if not w.isOpened():
        pytest.skip("no MJPG writer in this OpenCV build")
    for _ in range(2):
        w.write(cv2.imread(str(photo)))
    w.release()
    assert cv2.imread(str(video)) is None  # read as a video, not as an image
    with pytest.raises(SystemExit, match=r"^error: '.*clip\.avi' is 240x176 = 42240 pixels, more than the decoder"):
        main(["encode", str(video), "--bundle", str(tiny_bundle), "-o", str(tmp_path / "x.lcf")])


def test_encode_at_the_decoder_limit_works(tmp_path, photo, tiny_bundle, monkeypatch):
    import latentcast.proto.bitstream as bitstream

    monkeypatch.setattr(bitstream, "MAX_DECODE_PIXELS", 240 * 176)
    assert main(["encode", str(photo), "--bundle", str(tiny_bundle), "-o", str(tmp_path / "x.lcf")]) == 0


def test_the_decoder_and_the_cli_share_one_limit():
    import latentcast.models.codec as codec
    import latentcast.proto.bitstream as bitstream

    assert codec.MAX_DECODE_PIXELS is bitstream.MAX_DECODE_PIXELS and bitstream.MAX_DECODE_PIXELS == 4096 * 2304


def test_encode_without_torch_still_checks_the_limit(tmp_path, photo, tiny_bundle):
    """The edge path (ONNX) needs no torch: the limit is there without it, and encoding works."""
    out = tmp_path / "x.lcf"
    code = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, Block())
        from latentcast.tools.cli import main
        assert main(["encode", {str(photo)!r}, "--bundle", {str(tiny_bundle)!r}, "-o", {str(out)!r}]) == 0
        assert "torch" not in sys.modules
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert out.stat().st_size > 0


# 5. --roi values that parse as integers but make no box


@pytest.mark.parametrize("roi,reason", [
    ("--roi=10,10,5,5", "x1 5 must be greater than x0 10"),
    ("--roi=10,20,30,20", "y1 20 must be greater than y0 20"),
    ("--roi=10,-5,20,20", "coordinates must be >= 0"),
    ("--roi=-5,0,10,10", "coordinates must be >= 0"),
    ("--roi=0,0,10,10,99999", "label_id 99999 out of range 0..65535"),
    ("--roi=0,0,10,10,-1", "label_id -1 out of range 0..65535"),
    ("--roi=0,0,20000,10", "coordinates must be <= 16384"),
    ("--roi=1,2,3", "expected x0,y0,x1,y1[,label_id]"),
    ("--roi=1,2,3,x", "values must be integers"),
])
def test_a_bad_roi_says_why(tmp_path, photo, roi, reason, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["encode", str(photo), roi, "-o", str(tmp_path / "x.lcf")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    value = roi.split("=", 1)[1]
    assert err == f"latentcast encode: error: argument --roi: {value!r}: {reason}"
