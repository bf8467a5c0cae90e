"""models.composer: none (direct latent decode) and ControlNet composition with tiny random
components built from configs with fixed seeds (no hub, no download), through the code path the
cloud uses (ComposeRequest -> Composer.compose, batched)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from latentcast.models.composer import (  # noqa: E402
    ADAPTER_FILE,
    ComposeRequest,
    ControlNetComposer,
    LatentDecoderComposer,
    caption_for,
    load_components,
    make_composer,
    save_components,
    seed_for,
    tiny_components,
)
from latentcast.proto.bitstream import Roi  # noqa: E402

SIZE = 64  # frames are SIZE x SIZE unless said otherwise: diffusion latent 8 x 8


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    import cv2

    base = np.random.default_rng(seed).integers(0, 255, (7, 9, 3)).astype(np.float32)
    return cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def composer() -> ControlNetComposer:
    return ControlNetComposer(**tiny_components(0))


@pytest.fixture(scope="module")
def z_c(composer):
    """ẑ_c in the diffusion VAE's space (the paper profile: the codec reconstructs the SD latent)."""
    img = torch.from_numpy(smooth_image(SIZE, SIZE, 3)).permute(2, 0, 1)[None].float() / 255
    return composer.space.encode(img)[0]


@pytest.fixture(scope="module")
def roi_mask() -> np.ndarray:
    m = np.zeros((SIZE // 8, SIZE // 8), bool)  # on the latent grid
    m[2:6, 1:5] = True
    return m


def req(z, mask, **kw) -> ComposeRequest:
    base = dict(latent=z, mask=mask, width=SIZE, height=SIZE, labels=["person"], stream_id="cam-1", steps=2)
    base.update(kw)
    return ComposeRequest(**base)


# --------------------------------------------------------------------------- captions and seeds


def test_caption_for_examples():
    assert caption_for(["person", "car", "person"]) == "a photo of a car, two persons"
    assert caption_for(["car", "person", "person"]) == caption_for(["person", "person", "car"])  # ROI order free
    assert caption_for([]) == "a photo"
    assert caption_for(["", "  "]) == "a photo"
    assert caption_for(["umbrella"]) == "a photo of an umbrella"
    assert caption_for(["bus"] * 3) == "a photo of three buses"
    assert caption_for(["traffic_light", "Traffic light"]) == "a photo of two traffic lights"
    assert caption_for(["puppy", "puppy", "knife", "knife"]) == "a photo of two knives, two puppies"
    assert caption_for(["sheep"] * 4) == "a photo of four sheep"
    assert caption_for(["person"] * 13) == "a photo of 13 persons"
    assert caption_for(["car"], prefix="a street photo with") == "a street photo with a car"


def test_seed_for_is_stable_and_per_stream():
    a = seed_for("cam-1")
    assert a == seed_for("cam-1") and 0 <= a < 2**63
    assert a != seed_for("cam-2")
    assert a != seed_for("cam-1", base=1)


# --------------------------------------------------------------------------- none


def test_none_composer_equals_latent_to_frame(tiny_codec):
    img_a, img_b = smooth_image(80, 96, 1), smooth_image(64, 128, 2)
    rois = [Roi(x0=10, y0=12, x1=50, y1=60, label_id=0)]
    recs = [tiny_codec.decompress(tiny_codec.compress(img_a, rois, rate_point=1)),
            tiny_codec.decompress(tiny_codec.compress(img_b, rate_point=0)),
            tiny_codec.decompress(tiny_codec.compress(img_a, rate_point=2))]
    comp = make_composer("none", codec=tiny_codec)
    assert isinstance(comp, LatentDecoderComposer) and comp.describe()["latent_space"] == "pixels:4"
    frames = comp.compose([ComposeRequest.from_reconstruction(r, stream_id="x") for r in recs])
    for rec, f in zip(recs, frames):
        assert f.dtype == np.uint8 and f.shape == rec.frame.shape
        assert np.array_equal(f, rec.frame)
        direct = tiny_codec.latent_to_frame(torch.from_numpy(rec.latent)[None], rec.packet.header.width,
                                            rec.packet.header.height)
        assert np.array_equal(f, direct)
    single = LatentDecoderComposer(tiny_codec.latent_space(), batch=False).compose(
        [ComposeRequest.from_reconstruction(recs[0])], return_latents=True)[0]
    assert np.array_equal(single.frame, recs[0].frame) and single.steps == 0


# --------------------------------------------------------------------------- controlnet


def test_shapes_and_dtypes(composer, z_c, roi_mask):
    odd = torch.nn.functional.pad(z_c, (0, 1, 0, -1))  # (4, 7, 9): a 72 x 56 frame
    out = composer.compose([req(z_c, roi_mask), req(odd, None, width=72, height=56, stream_id="cam-2")],
                           return_latents=True)
    assert out[0].frame.shape == (SIZE, SIZE, 3) and out[0].frame.dtype == np.uint8
    assert out[1].frame.shape == (56, 72, 3) and out[1].frame.dtype == np.uint8
    assert tuple(out[0].latent.shape) == (4, 8, 8) and tuple(out[1].latent.shape) == (4, 7, 9)
    assert out[0].latent.dtype == torch.float32
    assert out[0].steps == 2 and out[0].caption == "a photo of a person"
    frames = composer.compose([req(z_c, roi_mask)])
    assert isinstance(frames[0], np.ndarray) and np.array_equal(frames[0], out[0].frame)
    d = composer.describe()
    assert d["kind"] == "controlnet" and d["scheduler"] == "DPMSolverMultistepScheduler" and d["same_space"]


def test_fixed_seed_per_stream(composer, z_c, roi_mask):
    a = composer.compose([req(z_c, roi_mask)], return_latents=True)[0]
    b = composer.compose([req(z_c, roi_mask)], return_latents=True)[0]
    assert np.array_equal(a.frame, b.frame) and torch.equal(a.latent, b.latent)
    fresh = ControlNetComposer(**tiny_components(0)).compose([req(z_c, roi_mask)])[0]
    assert np.array_equal(a.frame, fresh)  # same seed, same weights: same frame on a new composer
    c = composer.compose([req(z_c, roi_mask, stream_id="cam-9")])[0]
    assert not np.array_equal(a.frame, c)
    assert a.seed == seed_for("cam-1")


def test_batch_equals_one_by_one(composer, z_c, roi_mask):
    other = z_c.flip(-1)
    reqs = [req(z_c, roi_mask), req(other, ~roi_mask, stream_id="cam-2", labels=["car", "car"])]
    batched = composer.compose(reqs, return_latents=True)
    single = [composer.compose([r], return_latents=True)[0] for r in reqs]
    for b, s in zip(batched, single):
        assert torch.allclose(b.latent, s.latent, atol=1e-4, rtol=1e-4)
        assert np.abs(b.frame.astype(int) - s.frame.astype(int)).max() <= 1


def test_roi_latents_stay_close(composer, z_c, roi_mask, record_property):
    kept = composer.compose([req(z_c, roi_mask)], return_latents=True)[0].latent
    free = composer.compose([req(z_c, roi_mask, keep_roi=False)], return_latents=True)[0].latent
    m = torch.from_numpy(roi_mask)
    scale = z_c[:, m].abs().mean().item()
    d_kept = (kept - z_c)[:, m].abs().max().item()
    d_free = (free - z_c)[:, m].abs().mean().item()
    record_property("roi_latent_max_abs_diff_keep_roi", d_kept)
    record_property("roi_latent_mean_abs_diff_without_keep_roi", d_free)
    print(f"ROI latent distance: keep_roi max {d_kept:.3g}; without keep_roi mean {d_free:.3g} "
          f"(|ẑ_c| mean {scale:.3g}; random tiny weights)")
    assert d_kept < 1e-5
    assert d_free > d_kept
    assert not torch.allclose(kept[:, ~m], z_c[:, ~m])  # outside the ROIs the diffusion composed something


def test_caption_and_guidance_change_the_output(composer, z_c, roi_mask):
    base = composer.compose([req(z_c, roi_mask)])[0]
    other = composer.compose([req(z_c, roi_mask, labels=["car", "car", "bicycle"])])[0]
    assert not np.array_equal(base, other)
    guided = ControlNetComposer(**tiny_components(0), guidance_scale=3.0)
    g1 = guided.compose([req(z_c, roi_mask)])[0]
    assert not np.array_equal(base, g1) and np.array_equal(g1, guided.compose([req(z_c, roi_mask)])[0])


def test_condition_reaches_the_output(composer, z_c, roi_mask):
    a = composer.compose([req(z_c, roi_mask, keep_roi=False)], return_latents=True)[0].latent
    b = composer.compose([req(z_c * 3 + 0.5, roi_mask, keep_roi=False)], return_latents=True)[0].latent
    assert not torch.allclose(a, b)


def test_partial_noise_start(composer, z_c, roi_mask, record_property):
    r = req(z_c, roi_mask, steps=4, strength=0.5, keep_roi=False)
    a = composer.compose([r], return_latents=True)[0]
    b = composer.compose([r], return_latents=True)[0]
    assert a.steps == 2 and a.meta["schedule_steps"] == 4  # the last half of a 4-step schedule
    assert torch.equal(a.latent, b.latent) and np.array_equal(a.frame, b.frame)
    full = composer.compose([req(z_c, roi_mask, steps=4, keep_roi=False)], return_latents=True)[0]
    assert full.steps == 4 and not torch.equal(a.latent, full.latent)
    d_part = (a.latent - z_c).abs().mean().item()
    d_full = (full.latent - z_c).abs().mean().item()
    record_property("latent_mean_abs_diff_strength_0.5", d_part)
    record_property("latent_mean_abs_diff_strength_1", d_full)
    assert d_part < d_full  # starting from ẑ_c keeps the output nearer to it
    one = composer.compose([req(z_c, roi_mask, steps=4, strength=0.01)], return_latents=True)[0]
    assert one.steps == 1  # at least one step is run


def test_server_path_with_a_pixel_space_codec(tiny_codec):
    """tiny codec (pixels:4, 48 ch at 1/4) -> packet -> Reconstruction -> ControlNet composition: ẑ_c is
    resampled to the SD grid for the adapter; keep_roi pastes the codec's decode in pixels."""
    img = smooth_image(80, 96, 5)
    roi = Roi(x0=16, y0=16, x1=48, y1=48, label_id=0)
    rec = tiny_codec.decompress(tiny_codec.compress(img, [roi], rate_point=2))
    comp = make_composer("controlnet", sd="tiny", codec=tiny_codec)
    assert not comp.describe()["same_space"] and comp.adapter.in_channels == 49
    r = ComposeRequest.from_reconstruction(rec, labels=["person"], stream_id="cam-3", steps=2)
    out = comp.compose([r], return_latents=True)[0]
    assert out.frame.shape == (80, 96, 3) and tuple(out.latent.shape) == (4, 10, 12)
    rows, cols = np.nonzero(rec.mask)  # mask cells of 16 pixels on the codec's y grid
    y0, y1 = rows.min() * 16, min(80, (rows.max() + 1) * 16)
    x0, x1 = cols.min() * 16, min(96, (cols.max() + 1) * 16)
    assert np.array_equal(out.frame[y0:y1, x0:x1], rec.frame[y0:y1, x0:x1])
    outside = np.ones((80, 96), bool)
    outside[y0:y1, x0:x1] = False
    assert not np.array_equal(out.frame[outside], rec.frame[outside])
    part = comp.compose([ComposeRequest.from_reconstruction(rec, stream_id="cam-3", steps=4, strength=0.5)],
                        return_latents=True)[0]
    assert part.steps == 2 and part.frame.shape == (80, 96, 3)


def test_diffusion_loss_trains_adapter_and_codec_output(z_c, roi_mask):
    comp = ControlNetComposer(**tiny_components(0))
    comp.adapter.requires_grad_(True)
    latent = z_c[None].clone().requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    loss = comp.diffusion_loss(z_c[None], latent, torch.from_numpy(roi_mask)[None], ["a photo of a person"],
                               generator=g)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert comp.adapter.conv_in.weight.grad.abs().sum() > 0
    assert latent.grad is not None and latent.grad.abs().sum() > 0


# --------------------------------------------------------------------------- weights and errors


def test_save_and_load_components(tmp_path, composer, z_c, roi_mask):
    comps = tiny_components(0)
    save_components(comps, tmp_path / "sd", tmp_path / "cn")
    assert (tmp_path / "cn" / ADAPTER_FILE).is_file()
    loaded = ControlNetComposer(**load_components(str(tmp_path / "sd"), str(tmp_path / "cn")))
    a = composer.compose([req(z_c, roi_mask)], return_latents=True)[0]
    b = loaded.compose([req(z_c, roi_mask)], return_latents=True)[0]
    assert torch.allclose(a.latent, b.latent, atol=1e-5) and np.abs(a.frame.astype(int) - b.frame).max() <= 1
    (tmp_path / "cn" / ADAPTER_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=ADAPTER_FILE):
        load_components(str(tmp_path / "sd"), str(tmp_path / "cn"))
    with pytest.raises(FileNotFoundError, match="no-such-controlnet"):
        load_components(str(tmp_path / "sd"), str(tmp_path / "no-such-controlnet"))
    (tmp_path / "sd" / "unet" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="unet"):
        load_components(str(tmp_path / "sd"))


def test_errors(composer, z_c, roi_mask, tmp_path):
    with pytest.raises(ValueError, match="none, controlnet"):
        make_composer("stable-cascade")
    with pytest.raises(ValueError, match="steps"):
        composer.compose([req(z_c, roi_mask, steps=0)])
    with pytest.raises(ValueError, match="strength"):
        composer.compose([req(z_c, roi_mask, strength=0.0)])
    with pytest.raises(ValueError, match="channels"):
        composer.compose([req(torch.zeros(3, 8, 8), None)])
    with pytest.raises(ValueError, match="width"):
        composer.compose([req(z_c, roi_mask, width=0)])
    with pytest.raises(ValueError, match="mask shape"):
        composer.compose([req(z_c, np.ones((3, 5), bool))])
    with pytest.raises(ValueError, match="mask"):
        composer.compose([req(z_c, np.ones((2, 2, 2), bool))])
    missing = tmp_path / "no-such-sd"
    with pytest.raises(FileNotFoundError, match="no-such-sd"):
        load_components(str(missing))
    with pytest.raises(ValueError, match="adapter"):
        ControlNetComposer(**{**tiny_components(0, codec_channels=48)})  # adapter for 48 ch, ẑ_c in SD space
    with pytest.raises(ValueError, match="needs"):
        make_composer("controlnet")
