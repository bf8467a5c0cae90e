"""Shared fixtures: tiny seeded codecs (no download), shared-data lookup."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest

from latentcast.shared import shared_dir


def write_training_images(folder: Path, size: tuple[int, int], n: int = 2) -> list[tuple[str, Path, None]]:
    """``n`` smooth random PNGs of ``size`` (w, h), seed 0, as ``models.training.training_sources`` lists them."""
    import cv2

    rng = np.random.default_rng(0)
    srcs = []
    for i in range(n):
        p = folder / f"img{i}.png"
        cv2.imwrite(str(p), cv2.resize(rng.integers(0, 255, (12, 12, 3)).astype(np.uint8), size,
                                       interpolation=cv2.INTER_CUBIC))
        srcs.append((f"img{i}", p, None))
    return srcs


@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
    """``train synthesis`` on two tiny PNGs (its training sources), one of them as its Kodak, no video, and a
    cache under ``tmp_path`` (tests of models.synthesis_training and of the task loss)."""
    from latentcast.models import synthesis_training as st

    srcs = write_training_images(tmp_path, (200, 136))
    monkeypatch.setattr(st, "training_sources", lambda **_: srcs)
    kodak = [("k0", lambda: st._read_rgb(srcs[0][1], None))]
    monkeypatch.setattr(st, "_kodak_items", lambda: kodak)
    monkeypatch.setattr(st, "_vtest_items", lambda: [])
    monkeypatch.setenv("LATENTCAST_CACHE", str(tmp_path / "cache"))
    return srcs


def shared_or_skip() -> Path:
    try:
        return shared_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def _write_tiny_codec(folder: Path, *, channel_gains: bool = False, loud: bool = False) -> Path:
    """A tiny, randomly initialised (seed 0), frozen codec weight file; with ``channel_gains``, each rate
    point's channels get random offsets in -6..6 table steps; ``loud``: g_a's output 60x larger, so that a
    frame's changes reach its quantizer steps (the random g_a's latents change by ~0.06 for steps of 1..9)."""
    torch = pytest.importorskip("torch")
    from latentcast.models.codec import LatentCodec
    from latentcast.models.elic import CONFIGS, ElicCodec

    torch.manual_seed(0)
    cfg = dataclasses.replace(CONFIGS["lite"], N=32, M=64, groups=(16, 16, 32), Nz=16, Nh=32, ctx=16, ep=32,
                              gs_width=32, gs_blocks=1, channel_gains=channel_gains)
    model = ElicCodec(cfg)
    with torch.no_grad():  # spread the random entropy parameters over many tables and means
        for seq in model.ep:
            seq[-1].conv.weight.mul_(40.0)
        if loud:
            model.g_a[-1].weight.mul_(60.0)
            model.g_a[-1].bias.mul_(60.0)
        if channel_gains:
            model.rate_gain.copy_(torch.randint(-6, 7, model.rate_gain.shape) + 0.3)
            model.reset_rate_points()
    path = folder / f"tiny{'-gains' if channel_gains else ''}{'-loud' if loud else ''}.safetensors"
    LatentCodec.save(model, path, latent_space="pixels:4")
    return path


@pytest.fixture(scope="session")
def tiny_codec_path(tmp_path_factory) -> Path:
    """A tiny, randomly initialised (seed 0), frozen codec weight file."""
    return _write_tiny_codec(tmp_path_factory.mktemp("codec"))


def _tiny_variant(tmp_path_factory, **kw):
    """A loaded tiny codec made by ``_write_tiny_codec(**kw)`` in a fresh folder."""
    from latentcast.models.codec import LatentCodec

    return LatentCodec.from_file(_write_tiny_codec(tmp_path_factory.mktemp("codec"), **kw))


@pytest.fixture(scope="session")
def tiny_gain_codec(tmp_path_factory):
    """The tiny codec with per-rate-point channel gains (``ElicConfig.channel_gains``)."""
    return _tiny_variant(tmp_path_factory, channel_gains=True)


@pytest.fixture(scope="session")
def tiny_gain_bundle(tiny_gain_codec, tmp_path_factory) -> Path:
    return _export_bundle(tiny_gain_codec, tmp_path_factory.mktemp("gain-bundle"))


@pytest.fixture(scope="session")
def tiny_codec(tiny_codec_path):
    from latentcast.models.codec import LatentCodec

    return LatentCodec.from_file(tiny_codec_path)


def calibration_frames(n: int = 3, size: tuple[int, int] = (128, 192), seed: int = 5) -> list[np.ndarray]:
    """Smooth random (H, W, 3) uint8 frames (seeded): int8 calibration for tiny bundles, no shared data read."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = size
    return [cv2.resize(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), (w, h),
                       interpolation=cv2.INTER_CUBIC) for _ in range(n)]


def _export_bundle(codec, out: Path, **kw) -> Path:
    """The edge bundle of ``codec`` in ``out``, int8 stages calibrated on :func:`calibration_frames` (the
    exporter's warnings silenced)."""
    from latentcast.models.export import export_edge_bundle

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_edge_bundle(codec, out, **({"calibration": calibration_frames()} | kw))
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tiny_codec, tmp_path_factory) -> Path:
    return _export_bundle(tiny_codec, tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="session")
def loud_codec(tmp_path_factory):
    """The tiny codec with a 60x g_a (``_write_tiny_codec(loud=True)``): moving content codes latent cells."""
    return _tiny_variant(tmp_path_factory, loud=True)


@pytest.fixture(scope="session")
def loud_bundle(loud_codec, tmp_path_factory) -> Path:
    return _export_bundle(loud_codec, tmp_path_factory.mktemp("bundle"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def photo(tmp_path) -> Path:
    """A smooth random 240x176 PNG (seed 3) for the command-line tests."""
    import cv2

    rng = np.random.default_rng(3)
    img = cv2.resize(rng.integers(0, 255, (9, 12, 3)).astype(np.uint8), (240, 176), interpolation=cv2.INTER_CUBIC)
    p = tmp_path / "photo.png"
    cv2.imwrite(str(p), img)
    return p
