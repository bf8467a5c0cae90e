"""`latentcast eval`: data loading, latentcast as an eval codec, and the whole command on tiny inputs."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

from latentcast.tools.eval.data import Clip, GtBox, load_data
from tests.conftest import shared_or_skip

pytest.importorskip("pycocotools")
pytest.importorskip("matplotlib")


def _classes() -> list[str]:
    return (shared_or_skip() / "models" / "coco80_labels.txt").read_text().split("\n")[:80]


def test_video_clip_scores_every_nth_frame_and_rereads():
    root = shared_or_skip()
    (clip,) = load_data(root / "data" / "video" / "vtest.avi", classes=_classes(), every=8, max_frames=20)
    assert (clip.n_frames, clip.scored, clip.width, clip.height) == (20, (0, 8, 16), 768, 576)
    assert clip.fps == pytest.approx(10.0)
    a = dict(clip.scored_frames())
    b = dict(clip.scored_frames())  # a second pass reads the file again and gives the same frames
    assert sorted(a) == [0, 8, 16] and all(np.array_equal(a[k], b[k]) for k in a)
    assert sum(1 for _ in clip.frames()) == 20


def test_image_folder_and_errors(tmp_path):
    root = shared_or_skip()
    clips = load_data(root / "data" / "images" / "kodak", classes=_classes(), max_frames=3)
    assert [c.name for c in clips] == ["kodim01.png", "kodim02.png", "kodim03.png"]
    assert all(c.n_frames == 1 and c.scored == (0,) and c.gt is None for c in clips)
    with pytest.raises(FileNotFoundError, match="--data"):
        load_data(tmp_path / "missing.avi", classes=_classes())
    with pytest.raises(ValueError, match="no images"):
        load_data(tmp_path, classes=_classes())
    with pytest.raises(ValueError, match="every 0"):
        load_data(root / "data" / "video" / "vtest.avi", classes=_classes(), every=0)


def _coco_file(tmp_path, root) -> tuple:
    """Two Kodak images with hand-written annotations; one category that is no detector class."""
    for n in ("kodim04.png", "kodim15.png"):
        shutil.copy(root / "data" / "images" / "kodak" / n, tmp_path / n)
    doc = {"images": [{"id": 7, "file_name": "kodim04.png", "width": 512, "height": 768},
                      {"id": 9, "file_name": "kodim15.png", "width": 768, "height": 512}],
           "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "unicorn"}],
           "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [40, 30, 420, 700], "iscrowd": 0},
                           {"id": 2, "image_id": 9, "category_id": 2, "bbox": [0, 0, 10, 10], "iscrowd": 0},
                           {"id": 3, "image_id": 9, "category_id": 1, "bbox": [150, 50, 400, 450], "iscrowd": 0}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(doc))
    return path, doc


def test_coco_annotations_map_to_detector_classes(tmp_path):
    root = shared_or_skip()
    path, _ = _coco_file(tmp_path, root)
    clips = load_data(path, classes=_classes())
    assert [c.name for c in clips] == ["kodim04.png", "kodim15.png"]
    assert clips[0].gt == {0: [GtBox(x0=40, y0=30, x1=460, y1=730, class_id=0)]}
    assert [b.class_id for b in clips[1].gt[0]] == [0]  # the unicorn is ignored
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="not a COCO annotation file"):
        load_data(bad, classes=_classes())


@pytest.fixture(scope="module")
def latentcast_codecs():
    shared_or_skip()
    from latentcast.detector import YoloxDetector
    from latentcast.edge.encoder import EdgeEncoder
    from latentcast.models.codec import LatentCodec
    from latentcast.tools.eval.learned import GroundingSettings, LatentcastCodec

    enc, dec, det = EdgeEncoder(), LatentCodec.load("elic-lite"), YoloxDetector()
    gs = GroundingSettings(labels=("person",))
    return {m: LatentcastCodec(mode=m, grounding=gs, encoder=enc, decoder=dec, detector=det)
            for m in ("full", "roi", "roibg")}


def test_latentcast_rois_are_the_edge_grounders(latentcast_codecs):
    """ROIs of a tracked (non-detector) frame equal a fresh edge Grounder's over the same frames."""
    from latentcast.edge.grounding import Grounder

    root = shared_or_skip()
    (clip,) = load_data(root / "data" / "video" / "vtest.avi", classes=_classes(), every=8, max_frames=9)
    codec = latentcast_codecs["roi"]
    rois = codec.rois(clip)
    g = Grounder(labels=["person"], detector=codec.detector, every=5)
    expect = [g.update(f).rois for _, f in clip.frames()]
    assert sorted(rois) == [0, 8]
    assert rois[8] == expect[8] and rois[0] == expect[0] and len(rois[8]) >= 2


def test_latentcast_roi_packets_are_smaller_and_decode(latentcast_codecs):
    root = shared_or_skip()
    (clip,) = load_data(root / "data" / "video" / "vtest.avi", classes=_classes(), every=8, max_frames=9)
    full = latentcast_codecs["full"].run(clip, 1)
    roi = latentcast_codecs["roi"].run(clip, 1)
    assert full.frames_coded == roi.frames_coded == 2 and full.pixels == 2 * 768 * 576
    assert roi.bytes < 0.7 * full.bytes
    orig = dict(clip.scored_frames())
    for run in (full, roi):
        assert sorted(run.recon) == [0, 8]
        assert run.recon[8].shape == (576, 768, 3) and run.recon[8].dtype == np.uint8
    from latentcast.tools.eval.metrics import psnr

    assert 20 < psnr(orig[8], full.recon[8]) < 30  # elic-lite rate point 1 on a street frame
    assert latentcast_codecs["full"].params == (0, 1, 2)


def test_latentcast_roibg_fills_the_gap(latentcast_codecs):
    from latentcast.tools.eval.learned import LatentcastCodec, parse_roibg_level, roibg_levels

    root = shared_or_skip()
    (clip,) = load_data(root / "data" / "video" / "vtest.avi", classes=_classes(), every=8, max_frames=1)
    c = latentcast_codecs["roibg"]
    n = c.decoder.n_rates
    assert c.name == "latentcast-roibg" and c.param_name == "level" and c.params == roibg_levels(n)
    top = f"q{n - 1}/b0"
    bg = c.run(clip, top)
    full = latentcast_codecs["full"].run(clip, n - 1)
    roi = latentcast_codecs["roi"].run(clip, n - 1)
    assert roi.bytes < bg.bytes < full.bytes
    assert roibg_levels(3) == ("q1/b0", "q2/b0", "q2/b1")
    assert parse_roibg_level("q2/b1", 3) == (2, 1)
    for bad in ("q2b1", "q1/b2", "q3/b0", "x1/b0"):
        with pytest.raises(ValueError, match="roibg level"):
            parse_roibg_level(bad, 3)
    with pytest.raises(ValueError, match=r"roibg level 'q9/b0'"):
        LatentcastCodec(mode="roibg", grounding=c.grounding, encoder=c.encoder, decoder=c.decoder, detector=c.detector,
                        levels=("q9/b0",))


def _run_cli(*args) -> int:
    from latentcast.tools.cli import main

    return main(list(args))


def test_eval_command_on_images_writes_json_table_and_plots(tmp_path):
    root = shared_or_skip()
    out = tmp_path / "kodak"
    rc = _run_cli("eval", "--data", str(root / "data" / "images" / "kodak"), "--max-frames", "2",
                  "--codecs", "latentcast,jpeg,x265", "--labels", "all", "--out", str(out))
    assert rc == 0
    res = json.loads((out / "eval.json").read_text())
    assert {p["codec"] for p in res["points"]} == {"latentcast-full", "latentcast-roi", "jpeg", "x265"}
    assert res["data"]["scored_frames"] == 2 and res["tasks"] == ["detection", "classification"]
    assert res["ground_truth"].startswith("the detector's boxes")
    assert res["labels"] == "all detector classes (general detection)" and len(res["scored_classes"]) == 80
    # the uncompressed frames against their own detections: perfect by construction
    assert res["uncompressed"]["map50"] == pytest.approx(1.0) and res["uncompressed"]["top1"] == 1.0
    for p in res["points"]:
        assert p["bpp"] > 0 and 0 <= p["top1"] <= 1 and p["psnr"] > 10
    lc = sorted((p for p in res["points"] if p["codec"] == "latentcast-full"), key=lambda p: p["param"])
    assert [p["param"] for p in lc] == [0, 1, 2] and lc[0]["bpp"] < lc[1]["bpp"] < lc[2]["bpp"]
    jpeg = {p["param"]: p for p in res["points"] if p["codec"] == "jpeg"}
    assert jpeg[90]["psnr"] > jpeg[1]["psnr"] + 8 and jpeg[90]["bpp"] > 10 * jpeg[1]["bpp"]
    assert set(res["bd_rate"]) == {"map50", "map", "top1", "psnr", "ms_ssim"}
    assert "latentcast-full" in res["bd_rate"]["psnr"]["x265"]
    md = (out / "eval.md").read_text()
    assert "| latentcast-roi | jpeg |" in md and "## Points" in md
    for f in ("rate_accuracy.png", "examples.png"):
        assert (out / f).stat().st_size > 10_000
    assert "/" + "work" not in json.dumps(res["data"])  # no machine paths in results


def test_eval_command_on_video_scores_every_8th_frame(tmp_path):
    root = shared_or_skip()
    out = tmp_path / "vtest"
    rc = _run_cli("eval", "--data", str(root / "data" / "video" / "vtest.avi"), "--task", "detection",
                  "--max-frames", "17", "--codecs", "x264,downscale,webp", "--anchor", "x264", "--out", str(out))
    assert rc == 0
    res = json.loads((out / "eval.json").read_text())
    assert res["data"]["scored_frames"] == 3 and res["data"]["frames"] == 17
    # default task: the edge's default labels, mapped to detector classes as the edge maps them
    assert res["labels"] == ["person", "vehicle", "bicycle"]
    assert res["scored_classes"] == ["person", "bicycle", "car", "motorcycle", "bus", "truck"]
    assert res["gt_boxes"] >= 6
    x264 = {p["param"]: p for p in res["points"] if p["codec"] == "x264"}
    assert x264[18]["map50"] > x264[51]["map50"] and x264[18]["map50"] > 0.8
    assert x264[18]["frames_coded"] == 17 and x264[18]["kbps"] == pytest.approx(x264[18]["bpp"] * 768 * 576 * 10 / 1000)
    assert "top1" not in x264[18] and set(res["bd_rate"]) == {"map50", "map", "psnr", "ms_ssim"}


def test_eval_command_rejects_bad_choices(tmp_path, capsys):
    root = shared_or_skip()
    data = str(root / "data" / "images" / "kodak")
    with pytest.raises(SystemExit, match="--codecs 'h266' is not one of"):
        _run_cli("eval", "--data", data, "--codecs", "h266", "--out", str(tmp_path))
    with pytest.raises(SystemExit, match="--task 'ocr'"):
        _run_cli("eval", "--data", data, "--task", "ocr", "--out", str(tmp_path))
    with pytest.raises(SystemExit, match="unknown task label 'unicorn'"):
        _run_cli("eval", "--data", data, "--labels", "unicorn", "--out", str(tmp_path))
    with pytest.raises(SystemExit, match="--anchor 'x266'"):
        _run_cli("eval", "--data", data, "--codecs", "jpeg", "--anchor", "x266", "--max-frames", "1", "--out",
                 str(tmp_path))
    bad = tmp_path / "edge.yaml"
    bad.write_text("temporal:\n  compact_p: maybe\n")
    for cfg in (bad, tmp_path / "missing.yaml"):
        with pytest.raises(SystemExit, match=f"--edge-config {cfg}"):
            _run_cli("eval", "--data", data, "--codecs", "latentcast-temporal", "--edge-config", str(cfg),
                     "--max-frames", "1", "--out", str(tmp_path))


def test_clip_frames_stop_at_n_frames():
    frames = [np.full((4, 4, 3), i, np.uint8) for i in range(5)]
    clip = Clip(name="t", fps=5.0, width=4, height=4, n_frames=3, scored=(0, 2), read=lambda: iter(frames))
    assert [i for i, _ in clip.frames()] == [0, 1, 2]
    assert [int(f[0, 0, 0]) for _, f in clip.scored_frames()] == [0, 2]
    assert cv2 is not None


def test_eval_command_with_coco_annotations_scores_against_them(tmp_path):
    root = shared_or_skip()
    path, doc = _coco_file(tmp_path, root)
    out = tmp_path / "coco"
    rc = _run_cli("eval", "--data", str(path), "--task", "detection", "--codecs", "jpeg", "--anchor", "jpeg",
                  "--labels", "person", "--out", str(out))
    assert rc == 0
    res = json.loads((out / "eval.json").read_text())
    assert res["ground_truth"] == "annotations (COCO file)"
    assert res["gt_boxes"] == 2 and res["uncompressed"]["gt_boxes"] == 2  # the unicorn box is not a detector class
    # the detector on the uncompressed images against the hand-drawn boxes: a real accuracy, not 1 by construction
    assert 0.0 <= res["uncompressed"]["map"] < 1.0
    jpeg = {p["param"]: p for p in res["points"]}
    assert jpeg[90]["map50"] is not None and jpeg[90]["frames_coded"] == 2
