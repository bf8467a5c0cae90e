"""The task-aware classical anchors of ``latentcast eval``: x264/x265 with ROI QP offsets, x265 on frozen frames.

The grounding is replaced by fixed ROIs (a stand-in with the real ``rois(clip)`` interface), so these tests
check what the encoders do with them on a synthetic clip, not the detector."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("av")

from latentcast.proto.bitstream import Roi  # noqa: E402
from latentcast.tools.eval.baselines import X265Codec  # noqa: E402
from latentcast.tools.eval.task_aware import (  # noqa: E402
    FreezeVideoCodec,
    RoiVideoCodec,
    make_task_aware,
    parse_roi_level,
)
from tests.test_eval_baselines import make_clip, psnr, synth_frames  # noqa: E402

BOX = Roi(x0=32, y0=32, x1=96, y1=80)  # pixels, a multiple of 16 so both encoders' blocks line up


class FixedRois:
    """The grounding stand-in: the same ROI on every frame."""

    def __init__(self, rois=(BOX,)) -> None:
        self._rois = list(rois)

    def rois(self, clip):
        return {i: list(self._rois) for i in range(clip.n_frames)}

    def describe(self) -> dict:
        return {"source": "fixed ROIs (test)"}


def region_psnr(clip, recon, box, inside: bool) -> float:
    vals = []
    for i, f in clip.scored_frames():
        m = np.zeros(f.shape[:2], bool)
        m[box.y0:box.y1, box.x0:box.x1] = True
        sel = m if inside else ~m
        vals.append(psnr(f[sel], recon[i][sel]))
    return float(np.mean(vals))


def test_roi_levels_parse_and_refuse():
    assert parse_roi_level("33/-0.2/0.4") == (33.0, -0.2, 0.4)
    assert parse_roi_level("51/-0.4/0") == (51.0, -0.4, 0.0)
    for bad, match in (("33/0.4", "not <crf>/<ROI qoffset>/<background qoffset>"), ("x/0/0.2", "not <crf>"),
                       ("60/0/0.2", "crf"), ("33/-1.5/0", "ROI qoffset"), ("33/0/1.5", "background qoffset")):
        with pytest.raises(ValueError, match=match):
            parse_roi_level(bad)


def _plain(codec: str, crf: int):
    from latentcast.tools.eval.baselines import X264Codec

    return (X264Codec if codec == "x264" else X265Codec)(params=[crf], threads=1)


def test_x264_roi_offsets_keep_the_roi_and_coarsen_the_background():
    """At the same CRF with ROIs at -0.2 and the background at +0.4, x264 keeps (or improves) the box's quality,
    codes the background coarser and spends fewer bytes: the side data reaches the encoder."""
    clip = make_clip(synth_frames(n=8, w=160, h=128), every=4)
    r = RoiVideoCodec("x264", FixedRois(), params=["38/-0.2/0.4"], threads=1).run(clip, "38/-0.2/0.4")
    p = _plain("x264", 38).run(clip, 38)
    assert set(r.recon) == set(clip.scored) and r.frames_coded == clip.n_frames
    assert region_psnr(clip, r.recon, BOX, True) > region_psnr(clip, p.recon, BOX, True) - 0.2
    assert region_psnr(clip, r.recon, BOX, False) < region_psnr(clip, p.recon, BOX, False) - 3.0
    assert r.bytes < p.bytes
    # no ROI and no offsets: the plain encoder's bitstream
    none = RoiVideoCodec("x264", FixedRois(rois=()), params=["38/0/0"], threads=1).run(clip, "38/0/0")
    assert none.bytes == p.bytes


def test_x265_roi_offsets_refine_the_roi_and_a_positive_background_offset_hurts_it():
    """x265 refines the box at -0.2 and leaves the background as it was; with a positive background offset its
    ROIs get coarser too (why the default x265 sweep keeps the background at 0)."""
    clip = make_clip(synth_frames(n=8, w=160, h=128), every=4)
    p = _plain("x265", 38).run(clip, 38)
    codec = RoiVideoCodec("x265", FixedRois(), threads=1)
    r = codec.run(clip, "38/-0.2/0")
    assert region_psnr(clip, r.recon, BOX, True) > region_psnr(clip, p.recon, BOX, True) + 1.0
    assert abs(region_psnr(clip, r.recon, BOX, False) - region_psnr(clip, p.recon, BOX, False)) < 0.5
    pos = codec.run(clip, "38/-0.2/0.2")
    assert region_psnr(clip, pos.recon, BOX, True) < region_psnr(clip, r.recon, BOX, True) - 1.0
    assert all(level.endswith("/0") for level in codec.params)


def noisy_scene(n: int, *, w: int = 160, h: int = 128, square: bool = True) -> list[np.ndarray]:
    """A still textured scene with sensor noise (sigma 2 grey levels) and, optionally, a bright square moving
    right along the top."""
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:h, 0:w]
    bg = (128 + 60 * np.sin(xx / 5.0) * np.cos(yy / 6.0))[..., None].repeat(3, -1)
    out = []
    for i in range(n):
        f = bg + rng.normal(0, 2.0, bg.shape)
        if square:
            f[0:16, 8 * i: 8 * i + 16] = 250
        out.append(np.clip(f, 0, 255).astype(np.uint8))
    return out


def test_freeze_repeats_the_reconstruction_where_nothing_changed():
    """Noise under the threshold is frozen: the far background of consecutive reconstructions is (nearly all)
    identical, and the moving square is sent. (Bytes are not asserted: under CRF, x265 answers a
    simpler frame with a lower QP, so freezing is measured in `latentcast eval`, not assumed to save.)"""
    clip = make_clip(noisy_scene(8), every=1)
    codec = FreezeVideoCodec(FixedRois(rois=(Roi(x0=96, y0=96, x1=128, y1=128),)), params=[30], threads=1)
    run = codec.run(clip, 30)
    assert run.frames_coded == 8 and set(run.recon) == set(range(8))
    assert 0 < codec.refreshed < 0.3  # the square's blocks and the ROI's, not the noise
    far = (slice(40, 88), slice(16, 80))  # away from the square, the ROI and their deblocked edges
    same = [np.mean(run.recon[i][far] == run.recon[i - 1][far]) for i in range(2, 8)]
    assert min(same) > 0.95, same
    # the square is where it is in the source, not frozen at an old place
    for i in (3, 6):
        assert run.recon[i][2:14, 8 * i + 2: 8 * i + 14].mean() > 200


def test_freeze_always_sends_the_rois():
    """With a threshold nothing reaches, only the ROIs are sent: a square moving inside the ROI is where the
    source has it; without the ROI it stays frozen where it first was."""
    clip = make_clip(noisy_scene(8), every=1)
    top = Roi(x0=0, y0=0, x1=160, y1=16)
    with_roi = FreezeVideoCodec(FixedRois(rois=(top,)), params=[30], freeze_threshold=250, threads=1).run(clip, 30)
    without = FreezeVideoCodec(FixedRois(rois=()), params=[30], freeze_threshold=250, threads=1).run(clip, 30)
    assert with_roi.recon[6][2:14, 50:62].mean() > 200 and with_roi.recon[6][2:14, 2:14].mean() < 200
    assert without.recon[6][2:14, 50:62].mean() < 200 and without.recon[6][2:14, 2:14].mean() > 200


def test_freeze_sends_every_block_when_the_threshold_is_zero():
    clip = make_clip(noisy_scene(4, square=False), every=1)
    codec = FreezeVideoCodec(FixedRois(rois=()), params=[30], freeze_threshold=0, threads=1)
    run = codec.run(clip, 30)
    assert codec.refreshed == 1.0 and run.frames_coded == 4


def test_factory_names_and_describe():
    codecs = make_task_aware(["x264-roi", "x265-roi", "x265-freeze"], grounding=None, detector=None)
    assert [c.name for c in codecs] == ["x264-roi", "x265-roi", "x265-freeze"]
    assert codecs[0].params[0] == "51/-0.2/0.2" and codecs[1].params[0] == "51/-0.2/0"
    assert codecs[1].param_name == "crf/roi/bg"
    for c in codecs:
        c.grounded = FixedRois()
        json.dumps(c.describe())
    assert "qg-size=8" in codecs[1].describe()["av_options"]["x265-params"]
    with pytest.raises(ValueError, match="unknown task-aware codec 'x266-roi'"):
        make_task_aware(["x266-roi"], grounding=None, detector=None)
    with pytest.raises(ValueError, match="ROI codec 'vp9' is not one of x264, x265"):
        RoiVideoCodec("vp9", FixedRois())


def test_report_names_the_strongest_classical_anchor():
    from latentcast.tools.eval.report import markdown, strongest_classical

    def e(v):
        return {"bd_rate_percent": v, "over": [0.5, 0.9] if v is not None else None, "bd_quality": None}

    bd = {"map": {"x265": {"x264": e(30.0), "x264-roi": e(-20.0), "x265-roi": e(None), "latentcast-roi": e(-90.0)}}}
    result = {"anchor": "x265", "bd_rate": bd}
    assert strongest_classical(result, "map") == ("x264-roi", -20.0)  # latentcast curves are not anchors
    bd["map"]["x265"]["x264-roi"]["bd_rate_percent"] = 5.0
    assert strongest_classical(result, "map") == ("x265", 0.0)
    assert strongest_classical({"anchor": "latentcast-roi", "bd_rate": bd}, "map") is None
    result.update(data={"path": "v.avi", "kind": "video", "clips": 1, "frames": 8, "scored_frames": 1, "every": 8,
                        "sizes": ["8x8"]}, command="c", commit="x", machine={}, seconds=1, ground_truth="g",
                  gt_boxes=1, scored_classes=["person"], labels=["person"], bpp="b", uncompressed={},
                  points=[], codecs={"x265": {}, "x264": {}, "x264-roi": {}, "latentcast-roi": {}})
    assert "- mAP@0.5:0.95: **x265**" in markdown(result)
