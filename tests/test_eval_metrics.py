"""latentcast.tools.eval.metrics: PSNR, (MS-)SSIM, COCO mAP, BD-rate, the ImageNet classifier."""

from __future__ import annotations

import math
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from latentcast.detector import Detection
from latentcast.shared import ENV_VAR, shared_path
from latentcast.tools.eval.data import GtBox
from latentcast.tools.eval.metrics import (
    MS_SSIM_MIN_SIDE,
    Classifier,
    bd_overlap,
    bd_quality,
    bd_rate,
    detection_map,
    ms_ssim,
    pareto_front,
    psnr,
    ssim,
    top1_agreement,
)


def _shared(*parts: str) -> Path:
    try:
        return shared_path(*parts)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def _kodak(name: str) -> np.ndarray:
    bgr = cv2.imread(str(_shared("data", "images", "kodak", name)), cv2.IMREAD_COLOR)
    assert bgr is not None
    return np.ascontiguousarray(bgr[:, :, ::-1])


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth, natural-looking random RGB texture (no shared data needed)."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, size=(h // 8, w // 8, 3)).astype(np.float32)
    return np.clip(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- PSNR


def test_psnr_known_values():
    a = np.full((8, 8, 3), 100, np.uint8)
    assert psnr(a, a + 1) == pytest.approx(10 * math.log10(255**2), abs=1e-9)  # MSE 1: 48.13 dB
    assert psnr(a, a + 1) == pytest.approx(48.1308, abs=1e-4)
    assert psnr(np.zeros_like(a), np.full_like(a, 255)) == pytest.approx(0.0, abs=1e-12)
    assert psnr(a, a) == pytest.approx(100.0)  # MSE floored at 1e-10 on [0, 1] pixels
    b = a.copy()
    b[0, 0, 0] = 110  # one pixel off by 10 of 192 values: MSE 100/192
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 * 192 / 100), abs=1e-9)


def test_psnr_input_errors():
    a = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=r"shapes differ: \(8, 8, 3\) vs \(8, 9, 3\)"):
        psnr(a, np.zeros((8, 9, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8 image, got ndarray .* float64"):
        psnr(a, a.astype(np.float64))


# ---------------------------------------------------------------------------------------------- (MS-)SSIM


def test_ssim_constant_images_give_the_luminance_term():
    # constant images: all variances are 0, so cs = C2 / C2 = 1 and SSIM is the luminance term alone
    c1 = (0.01 * 255) ** 2
    a = np.full((32, 40, 3), 100, np.uint8)
    b = np.full((32, 40, 3), 150, np.uint8)
    expected = (2 * 100 * 150 + c1) / (100**2 + 150**2 + c1)  # 0.92314...
    assert ssim(a, b) == pytest.approx(expected, abs=1e-9)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="10x32 is smaller than the 11-px window"):
        ssim(a[:, :10], b[:, :10])


def test_ms_ssim_identity_gray_and_size():
    img = _texture(176, 200)
    assert ms_ssim(img, img) == pytest.approx(1.0, abs=1e-12)
    g = img[:, :, 1]
    noisy = np.clip(g + np.random.default_rng(1).normal(0, 10, g.shape), 0, 255).astype(np.uint8)
    # a gray image is one channel: the same as three identical channels
    assert ms_ssim(g, noisy) == pytest.approx(ms_ssim(np.dstack([g] * 3), np.dstack([noisy] * 3)), abs=1e-12)
    assert MS_SSIM_MIN_SIDE == 161
    ms_ssim(img[:161, :161], img[:161, :161])  # the smallest size that works
    with pytest.raises(ValueError, match="200x160 is too small"):
        ms_ssim(img[:160], img[:160])
    with pytest.raises(ValueError, match="shapes differ"):
        ms_ssim(img, img[:170])


def test_ms_ssim_decreases_with_noise():
    img = _texture(192, 256)
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 1, img.shape)
    vals = [ms_ssim(img, np.clip(img + s * noise, 0, 255).astype(np.uint8)) for s in (1, 3, 8, 20, 50)]
    assert all(x > y for x, y in zip(vals, vals[1:])), vals
    assert 0.0 < vals[-1] < vals[0] < 1.0


@pytest.mark.parametrize("case, expected_ms, expected_ss", [
    # values from pytorch_msssim 1.0.0 (ms_ssim / ssim, data_range=255, float64 tensors) on the same pairs;
    # this module agrees to ~1.5e-6 (pytorch_msssim builds its Gaussian window in float32)
    ("offset30", 0.9954898, 0.9533759),
    ("roll1", 0.9182155, 0.6628442),
    ("odd_roll2", 0.6757582, 0.2372936),  # 701x509: odd sides at several scales (zero-padded pooling)
])
def test_ms_ssim_matches_pytorch_msssim(case, expected_ms, expected_ss):
    img = _kodak("kodim01.png")
    if case == "offset30":
        a, b = img, np.clip(img.astype(np.int16) + 30, 0, 255).astype(np.uint8)
    elif case == "roll1":
        a, b = img, np.roll(img, 1, axis=1)
    else:
        a, b = img[:509, :701], np.roll(img, 2, axis=0)[:509, :701]
    assert ms_ssim(a, b) == pytest.approx(expected_ms, abs=1e-5)
    assert ssim(a, b) == pytest.approx(expected_ss, abs=1e-5)


def test_ms_ssim_jpeg_q10_band():
    # kodim01 through OpenCV's JPEG at quality 10 (PSNR 24.8 dB). Measured: MS-SSIM 0.9178 (pytorch_msssim:
    # the same to 4e-7). Wrong variants on this pair: equal weights 0.884, no weights 0.542, reversed
    # weights 0.895, subsampling instead of 2x2 averaging 0.814, luma-only (gray) 0.933, single-scale SSIM
    # 0.694. (SSIM instead of cs at the fine scales gives 0.917 here, JPEG keeps the means: the
    # offset30 case above catches that one, 0.959 instead of 0.995.)
    img = _kodak("kodim01.png")
    ok, enc = cv2.imencode(".jpg", np.ascontiguousarray(img[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 10])
    assert ok
    rec = np.ascontiguousarray(cv2.imdecode(enc, cv2.IMREAD_COLOR)[:, :, ::-1])
    assert 0.905 < ms_ssim(img, rec) < 0.930


# ---------------------------------------------------------------------------------------------- mAP


def _gt() -> dict[int, list[GtBox]]:
    return {
        0: [GtBox(10, 10, 110, 110, 0), GtBox(200, 50, 260, 170, 0), GtBox(300, 300, 400, 350, 2)],
        1: [GtBox(50, 60, 150, 160, 2)],
        7: [],  # an image without objects: every prediction there is a false positive
    }


def _as_pred(gt: dict[int, list[GtBox]], scores=None, dx: float = 0.0) -> dict[int, list[Detection]]:
    scores = iter(scores) if scores is not None else iter(np.linspace(0.9, 0.5, 20))
    return {k: [Detection(b.x0 + dx, b.y0, b.x1 + dx, b.y1, b.class_id, str(b.class_id), float(next(scores)))
                for b in boxes] for k, boxes in gt.items()}


def test_map_perfect_predictions_any_scores():
    gt = _gt()
    m = detection_map(gt, _as_pred(gt, scores=[0.2, 0.9, 0.05, 0.6]), class_ids=[0, 2], class_names=["person", "car"])
    assert m["map50"] == 1.0 and m["map"] == 1.0
    assert m["gt_boxes"] == 4 and m["pred_boxes"] == 4
    assert m["per_class_ap50"] == {"person": 1.0, "car": 1.0}


def test_map_iou_0p61_counts_at_0p5_to_0p6_only():
    gt = {0: [GtBox(100, 100, 200, 200, 0)], 1: [GtBox(10, 20, 110, 120, 0)]}
    m = detection_map(gt, _as_pred(gt, dx=24.0), class_ids=[0])  # IoU = 76 / 124 = 0.613
    assert m["map50"] == pytest.approx(1.0)
    assert m["map"] == pytest.approx(0.3)  # matched at IoU thresholds 0.50, 0.55, 0.60 of ten
    assert m["per_class_ap50"] == {0: pytest.approx(1.0)}


def test_map_wrong_class_and_empty_predictions():
    gt = {0: [GtBox(10, 10, 110, 110, 0)]}
    wrong = {0: [Detection(10, 10, 110, 110, 2, "car", 0.9)]}
    m = detection_map(gt, wrong, class_ids=[0, 2], class_names=["person", "car"])
    assert m["map50"] == 0.0 and m["map"] == 0.0
    assert m["per_class_ap50"] == {"person": 0.0, "car": None}  # no car in the ground truth
    for empty in ({}, {0: []}):
        m = detection_map(gt, empty, class_ids=[0])
        assert (m["map50"], m["map"], m["pred_boxes"], m["gt_boxes"]) == (0.0, 0.0, 0, 1)


def test_map_false_positives_only_after_true_ones_keep_ap_1():
    gt = _gt()
    pred = _as_pred(gt, scores=[0.9, 0.8, 0.7, 0.6])
    pred[7] = [Detection(500, 500, 540, 560, 0, "0", 0.1)]  # on the empty image
    pred[0] = pred[0] + [
        Detection(400, 10, 450, 60, 2, "2", 0.05),
        Detection(12, 8, 108, 112, 0, "0", 0.3),
    ]  # duplicate
    m = detection_map(gt, pred, class_ids=[0, 2])
    assert m["map50"] == 1.0 and m["pred_boxes"] == 7
    pred[7] = [Detection(500, 500, 540, 560, 0, "0", 0.95)]  # the same false positive ranked first hurts
    assert detection_map(gt, pred, class_ids=[0, 2])["per_class_ap50"][0] < 0.9


def test_map_class_restriction_and_crowd():
    gt = _gt()
    gt[1] = gt[1] + [GtBox(300, 10, 340, 90, 5), GtBox(0, 200, 100, 300, 0, iscrowd=True)]
    pred = _as_pred({0: gt[0][:2]})  # only the two class-0 boxes of image 0
    pred[1] = [Detection(1, 201, 99, 299, 0, "0", 0.99), Detection(300, 10, 340, 90, 7, "7", 0.99)]
    m = detection_map(gt, pred, class_ids=[0])  # classes 2, 5 and 7 ignored; the crowd box is neither TP nor FP
    assert (m["map50"], m["map"], m["gt_boxes"], m["pred_boxes"]) == (1.0, 1.0, 2, 3)
    assert m["per_class_ap50"] == {0: 1.0}
    assert detection_map(gt, pred, class_ids=[0, 5])["map50"] == pytest.approx(0.5)  # class 5 missed: AP 0


def test_map_without_ground_truth_is_none():
    for gt in ({}, {0: []}, {0: [GtBox(1, 1, 5, 5, 3)]}, {0: [GtBox(1, 1, 50, 50, 0, iscrowd=True)]}):
        m = detection_map(gt, {0: [Detection(1, 1, 5, 5, 0, "0", 0.5)]} if gt else {}, class_ids=[0],
                          class_names=["person"])
        assert m["map50"] is None and m["map"] is None and m["gt_boxes"] == 0
        assert m["per_class_ap50"] == {"person": None}


def test_map_input_errors():
    gt = {0: [GtBox(10, 10, 110, 110, 0)]}
    with pytest.raises(ValueError, match="pred has 2 image id\\(s\\) not in gt: 3, 4"):
        detection_map(gt, {0: [], 3: [], 4: []}, class_ids=[0])
    with pytest.raises(ValueError, match="class_names has 1 names for 2 class_ids"):
        detection_map(gt, {}, class_ids=[0, 1], class_names=["person"])
    with pytest.raises(ValueError, match="class_ids is empty"):
        detection_map(gt, {}, class_ids=[])
    with pytest.raises(ValueError, match=r"detection on image 0: box \(5.0, 5.0, 5.0, 9.0\)"):
        detection_map(gt, {0: [Detection(5, 5, 5, 9, 0, "0", 0.5)]}, class_ids=[0])
    with pytest.raises(ValueError, match="score nan is not finite"):
        detection_map(gt, {0: [Detection(5, 5, 8, 9, 0, "0", float("nan"))]}, class_ids=[0])


# ---------------------------------------------------------------------------------------------- BD-rate

ANCHOR = [(0.10, 30.0), (0.20, 33.5), (0.40, 36.2), (0.80, 38.9), (1.60, 41.0)]


def test_pareto_front_drops_dominated_points():
    pts = [(0.3, 0.5), (0.1, 0.4), (0.2, 0.35), (0.4, 0.5), (0.1, 0.3), (0.5, 0.7)]
    assert pareto_front(pts) == [(0.1, 0.4), (0.3, 0.5), (0.5, 0.7)]
    assert pareto_front([]) == []
    with pytest.raises(ValueError, match="point \\(0.1, nan\\) is not finite"):
        pareto_front([(0.1, float("nan"))])


def test_bd_rate_scaled_rates_and_identity():
    test = [(r * 0.8, q) for r, q in ANCHOR]
    assert bd_rate(ANCHOR, test) == pytest.approx(-20.0, abs=1e-6)
    assert bd_rate(test, ANCHOR) == pytest.approx(25.0, abs=1e-6)
    assert bd_rate(ANCHOR, list(ANCHOR)) == pytest.approx(0.0, abs=1e-9)
    assert bd_overlap(ANCHOR, test) == (30.0, 41.0)
    # a dominated extra point on the test curve does not count
    assert bd_rate(ANCHOR, test + [(1.0, 35.0)]) == pytest.approx(-20.0, abs=1e-6)


def test_bd_rate_partial_overlap_and_none():
    shifted = [(r * 1.5, q + 5.0) for r, q in ANCHOR]  # qualities 35..46: overlap 35..41
    assert bd_overlap(ANCHOR, shifted) == (35.0, 41.0)
    assert bd_rate(ANCHOR, shifted) is not None
    far = [(r, q + 20.0) for r, q in ANCHOR]  # qualities 50..61: no overlap
    assert bd_rate(ANCHOR, far) is None and bd_overlap(ANCHOR, far) is None
    touching = [(0.1, 41.0), (0.2, 45.0)]  # zero-width overlap
    assert bd_rate(ANCHOR, touching) is None
    assert bd_rate(ANCHOR, ANCHOR[:1]) is None and bd_rate([], ANCHOR) is None
    assert bd_rate(ANCHOR, [(0.1, 35.0), (0.2, 35.0)]) is None  # the front keeps one point


def test_bd_quality_shift():
    up = [(r, q + 0.05) for r, q in ANCHOR]
    assert bd_quality(ANCHOR, up) == pytest.approx(0.05, abs=1e-9)
    assert bd_quality(up, ANCHOR) == pytest.approx(-0.05, abs=1e-9)
    assert bd_quality(ANCHOR, [(r * 100, q) for r, q in ANCHOR]) is None  # no shared rate range


def test_bd_rejects_non_positive_rates():
    with pytest.raises(ValueError, match=r"bd_rate test: rates must be > 0 \(log scale\), got \(0.0, 31.0\)"):
        bd_rate(ANCHOR, [(0.0, 31.0), (0.5, 35.0)])
    with pytest.raises(ValueError, match="bd_quality anchor: rates must be > 0"):
        bd_quality([(-1.0, 30.0), (1.0, 31.0)], ANCHOR)
    with pytest.raises(ValueError, match="rates must be > 0"):
        bd_overlap(ANCHOR, [(0.0, 31.0)])


# ---------------------------------------------------------------------------------------------- classifier


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    pytest.importorskip("ai_edge_litert")
    _shared("models", "mobilenet_v2_1.0_224_quant.tflite")
    _shared("models", "imagenet_labels.txt")
    return Classifier(threads=1)


def test_classifier_parrots(classifier):
    assert classifier.input_size == (224, 224)
    assert len(classifier.labels) == 1001 and classifier.labels[0] == "background"
    k = classifier.top1(_kodak("kodim23.png"))  # two parrots: measured class 89 "macaw"
    assert classifier.labels[k] == "macaw"
    with pytest.raises(ValueError, match="frame must be an \\(H, W, 3\\) uint8 RGB array"):
        classifier.top1(np.zeros((10, 10), np.uint8))


def test_classifier_missing_files(tmp_path, monkeypatch):
    with pytest.raises(
        FileNotFoundError, match=f"classifier model {re.escape(str(tmp_path / 'missing.tflite'))} not found.*{ENV_VAR}"
    ):
        Classifier(model_path=tmp_path / "missing.tflite")
    monkeypatch.setenv(ENV_VAR, str(tmp_path))  # an empty shared folder
    with pytest.raises(FileNotFoundError, match=f"models/mobilenet_v2_1.0_224_quant.tflite not found.*{ENV_VAR}"):
        Classifier()
    with pytest.raises(ValueError, match="threads 0 must be an integer >= 1"):
        Classifier(threads=0)


def test_top1_agreement():
    assert top1_agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert top1_agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(ValueError, match="3 reference classes but 2 test classes"):
        top1_agreement([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="both lists are empty"):
        top1_agreement([], [])
