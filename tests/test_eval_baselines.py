"""Classical baselines of ``latentcast eval`` (tools/eval/baselines.py) on tiny synthetic clips."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

pytest.importorskip("cv2")
av = pytest.importorskip("av")

from latentcast.tools.eval.baselines import (  # noqa: E402
    BASELINES,
    DownscaleCodec,
    JpegCodec,
    WebpCodec,
    X264Codec,
    X265Codec,
    _decode_video,
    _encode_video,
    _VideoSettings,
    make_baselines,
)
from latentcast.tools.eval.data import Clip  # noqa: E402

W, H, N, EVERY = 160, 120, 24, 8


def synth_frames(n: int = N, w: int = W, h: int = H) -> list[np.ndarray]:
    """Textured background (luma pattern, mild colour, light noise) with a bright square moving right."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    lum = 128 + 50 * np.sin(xx / 6.0 + yy / 9.0) * np.cos(yy / 7.0)
    bg = np.stack([lum * 1.15, lum, lum * 0.85], -1) + rng.normal(0, 3.0, (h, w, 1))
    out = []
    for i in range(n):
        f = bg.copy()
        x = 10 + 4 * i
        f[h // 3: h // 3 + 30, x: x + 30] = (250, 240, 200)
        out.append(np.clip(f, 0, 255).astype(np.uint8))
    return out


def make_clip(frames: list[np.ndarray], *, n_frames: int | None = None, every: int = EVERY, name: str = "synth",
              fps: float = 10.0) -> Clip:
    n = len(frames) if n_frames is None else n_frames
    h, w = frames[0].shape[:2]
    return Clip(name=name, fps=fps, width=w, height=h, n_frames=n, scored=tuple(range(0, n, every)),
                read=lambda: iter(frames))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def mean_psnr(clip: Clip, recon: dict[int, np.ndarray]) -> float:
    return float(np.mean([psnr(f, recon[i]) for i, f in clip.scored_frames()]))


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return synth_frames()


@pytest.fixture(scope="module")
def clip(frames) -> Clip:
    return make_clip(frames)


@pytest.fixture(scope="module")
def odd_image() -> Clip:
    img = synth_frames(1, 161, 121)[0]
    return Clip(name="odd.png", fps=1.0, width=161, height=121, n_frames=1, scored=(0,), read=lambda: iter([img]))


@pytest.fixture(scope="module")
def codecs() -> dict:
    return {c.name: c for c in make_baselines(list(BASELINES), threads=1)}  # threads=1: x264 slices = threads


@pytest.mark.parametrize("name", BASELINES)
def test_recon_exactly_for_scored_frames(name, codecs, clip, odd_image):
    codec = codecs[name]
    p = codec.params[len(codec.params) // 2]
    run = codec.run(clip, p)
    assert sorted(run.recon) == [0, 8, 16] == list(clip.scored)
    for r in run.recon.values():
        assert r.shape == (H, W, 3) and r.dtype == np.uint8
    video = name in ("x264", "x265", "downscale")
    assert run.frames_coded == (N if video else len(clip.scored))
    assert run.pixels == run.frames_coded * W * H  # downscale too: bpp is relative to the original frame
    assert run.bytes > 0 and run.encode_seconds > 0 and run.decode_seconds > 0
    one = codec.run(odd_image, p)  # a single image with an odd size: padded and cropped back by the video codecs
    assert list(one.recon) == [0] and one.recon[0].shape == (121, 161, 3) and one.recon[0].dtype == np.uint8
    assert one.frames_coded == 1 and one.pixels == 161 * 121


def test_default_sweeps_in_rate_order():
    assert JpegCodec().params == (1, 3, 5, 8, 12, 20, 30, 50, 75, 90)
    assert WebpCodec().params == (1, 2, 5, 10, 20, 35, 50, 75, 90)  # OpenCV maps WebP quality 0 to 1
    assert X264Codec().params == X265Codec().params == (51, 47, 44, 41, 38, 33, 28, 23, 18)
    assert DownscaleCodec().params == (8, 6, 4, 3, 2)
    assert X264Codec(params=[23, 51.0, 30]).params == (51.0, 30, 23)  # sorted into rate order


@pytest.mark.parametrize("name", ["x264", "jpeg"])
def test_bytes_increase_along_params(name, codecs, clip):
    codec = codecs[name]
    sizes = [codec.run(clip, p).bytes for p in codec.params]
    assert all(a < b for a, b in itertools.pairwise(sizes)), dict(zip(codec.params, sizes))
    if name == "x264":
        assert codec.run(clip, 51).bytes < codec.run(clip, 23).bytes


# Measured on the synthetic clip (x264 core 165, x265 4.2, libjpeg-turbo 3.1.2, libwebp of OpenCV 5.0, threads 1):
# rgb24 -> yuv420p -> rgb24 alone: 44.3 dB (the 4:2:0 ceiling of the video codecs); x264 CRF 18: 40.5,
# CRF 51: 24.8; x265 CRF 18: 41.7, CRF 51: 27.7; JPEG q90: 39.8, q1: 21.0; WebP q90: 40.7, q1: 30.9 dB.
# The bands leave ~2 dB for other library versions.
@pytest.mark.parametrize("name, param, lo, hi", [
    ("x264", 18, 38.0, 44.5), ("x264", 51, 22.0, 28.0), ("x265", 18, 39.0, 44.5), ("x265", 51, 25.0, 31.0),
    ("jpeg", 90, 37.5, 42.5), ("jpeg", 1, 18.0, 24.0), ("webp", 90, 38.0, 43.0), ("webp", 1, 28.0, 34.0),
])
def test_psnr_bands(name, param, lo, hi, codecs, clip):
    assert lo < mean_psnr(clip, codecs[name].run(clip, param).recon) < hi


def test_colour_round_trip_matches_swscale(clip):
    """x264 at CRF 0 is lossless: its reconstruction is exactly PyAV's rgb24 -> yuv420p -> rgb24 round trip,
    so encoder-side and decoder-side colour conversions agree (BT.601, limited range)."""
    run = X264Codec(params=(0,), threads=1).run(clip, 0)
    for i, f in clip.scored_frames():
        rt = av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p").to_ndarray(format="rgb24")
        assert np.array_equal(run.recon[i], rt)
    red = av.VideoFrame.from_ndarray(np.full((16, 16, 3), (255, 0, 0), np.uint8), format="rgb24")
    yuv = red.reformat(format="yuv420p").to_ndarray()
    assert (yuv[0, 0], yuv[16, 0], yuv[20, 0]) == (81, 90, 240)  # BT.601 limited range (BT.709 would give Y 63)


def test_video_bytes_cover_all_frames(frames, codecs):
    full = codecs["x264"].run(make_clip(frames), 28)
    cut = codecs["x264"].run(make_clip(frames, n_frames=8), 28)
    assert full.frames_coded == 24 and cut.frames_coded == 8
    assert full.bytes > cut.bytes
    assert full.pixels == 3 * cut.pixels


def test_x265_single_odd_image(codecs, odd_image):
    run = codecs["x265"].run(odd_image, 28)
    assert run.recon[0].shape == (121, 161, 3)
    assert mean_psnr(odd_image, run.recon) > 33.0  # measured 36.9 dB


def test_info_sei_not_counted_by_default(clip):
    plain, info = X264Codec(threads=1).run(clip, 51), X264Codec(threads=1, info_sei=True).run(clip, 51)
    assert info.bytes - plain.bytes > 300  # x264's version + options string (~600 bytes)
    assert all(np.array_equal(plain.recon[i], info.recon[i]) for i in clip.scored)
    plain, info = X265Codec().run(clip, 51), X265Codec(info_sei=True).run(clip, 51)
    assert info.bytes - plain.bytes > 1000  # x265's (~2.3 KB)


def test_headers_in_band_and_decoder_frame_count(clip):
    s = _VideoSettings(codec="x264", threads=1)
    bs = _encode_video(clip, s, 30)
    assert bs.extradata == b"" and bs.frames == N and len(bs.packets) == N
    nal_types = {b[4] & 0x1F for b in bs.packets[:1]}  # first NAL of the first packet after its start code
    assert bs.packets[0][:4] == b"\x00\x00\x00\x01" and nal_types == {7}  # SPS in-band
    bs.packets.pop()  # one frame lost
    with pytest.raises(RuntimeError, match="returned 23 frames for the 24"):
        _decode_video(clip, s, bs)


def test_short_clip_is_an_error(frames):
    liar = make_clip(frames[:5], n_frames=24)
    with pytest.raises(RuntimeError, match="yielded 5 frames"):
        X264Codec(threads=1).run(liar, 30)
    with pytest.raises(RuntimeError, match="ended before scored"):
        JpegCodec().run(liar, 50)


def test_gop_adds_keyframes(codecs, clip):
    assert X264Codec(gop=8, threads=1).run(clip, 28).bytes > codecs["x264"].run(clip, 28).bytes


def test_downscale(codecs, clip, odd_image):
    ds = codecs["downscale"]
    runs = {s: ds.run(clip, s) for s in (8, 4, 2)}
    q = {s: mean_psnr(clip, r.recon) for s, r in runs.items()}
    assert q[8] < q[4] < q[2], q  # measured 27.1 < 30.2 < 33.3 dB
    assert runs[8].bytes < runs[4].bytes < runs[2].bytes
    for r in runs.values():
        assert r.pixels == N * W * H and r.frames_coded == N
    assert runs[8].bytes < codecs["x264"].run(clip, 23).bytes  # same CRF, 1/64 of the pixels
    one = ds.run(odd_image, 2)  # an image: JPEG q85 at 80x60
    assert one.frames_coded == 1 and one.pixels == 161 * 121
    assert one.bytes < JpegCodec(params=(85,)).run(odd_image, 85).bytes


def test_unknown_name_and_options():
    with pytest.raises(ValueError, match="'mpeg2'.*jpeg, webp, x264, x265, downscale"):
        make_baselines(["x264", "mpeg2"])
    with pytest.raises(ValueError, match="'presett'.*preset"):
        make_baselines(["x264"], presett="fast")
    with pytest.raises(ValueError, match="more than once"):
        make_baselines(["jpeg", "jpeg"])
    # the runner passes the video options with every selection: JPEG ignores them
    (jpeg,) = make_baselines(["jpeg"], preset="medium", gop=None)
    assert isinstance(jpeg, JpegCodec)
    x264, ds = make_baselines(["x264", "downscale"], sweeps={"x264": (30, 40)}, preset="fast", gop=12)
    assert x264.params == (40, 30) and x264.describe()["preset"] == "fast" and ds.describe()["video"]["gop"] == 12


@pytest.mark.parametrize("make, match", [
    (lambda: X264Codec(params=(60,)), r"crf 60 is out of range.*0\.\.51"),
    (lambda: make_baselines(["x265"], sweeps={"x265": [23, 60]}), r"crf 60 is out of range"),
    (lambda: DownscaleCodec(crf=60), r"crf 60"),
    (lambda: X264Codec(preset="fastest"), r"'fastest'.*ultrafast, superfast"),
    (lambda: X264Codec(gop=0), r"gop 0"),
    (lambda: X264Codec(params=(True,)), r"crf True"),
    (lambda: JpegCodec(params=(0, 50)), r"jpeg quality 0 is out of range.*1\.\.100"),
    (lambda: JpegCodec(params=(50.5,)), r"jpeg quality 50\.5"),
    (lambda: WebpCodec(params=()), r"empty"),
    (lambda: DownscaleCodec(params=(0.5,)), r"scale 0\.5"),
    (lambda: X264Codec(params=(23, 23)), r"more than once"),
])
def test_bad_settings_fail_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_param_at_run(codecs, clip):
    with pytest.raises(ValueError, match="crf 60"):
        codecs["x264"].run(clip, 60)


def test_describe_is_json(codecs):
    for codec in codecs.values():
        d = json.loads(json.dumps(codec.describe()))
        assert isinstance(d, dict) and d
    v = codecs["x264"].describe()
    assert v["tune"] == "zerolatency" and v["pix_fmt"] == "yuv420p" and v["preset"] == "medium"
    assert v["encoder_version"].startswith("x264")
    assert codecs["x265"].describe()["av_options"]["x265-params"].startswith("log-level=error")
