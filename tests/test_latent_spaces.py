"""Tests for latentcast.models.latent_spaces (fast: tiny models, small crops)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from latentcast.models.latent_spaces import (
    LATENT_SPACE_SPECS,
    SDVAE,
    LatentSpace,
    PixelSpace,
    TinyAutoencoder,
    load_latent_space,
    taef2,
)
from latentcast.shared import shared_path


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / ((a - b) ** 2).mean()))


def _shared(*parts: str) -> Path:
    try:
        return shared_path(*parts)
    except FileNotFoundError as e:
        pytest.skip(f"shared file missing: {e}")


def _image(seed: int = 0, size: tuple[int, int] = (32, 48)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, *size, generator=g)


@pytest.fixture(scope="module")
def taef2_model() -> TinyAutoencoder:
    _shared("models", "taef2_encoder.pth")
    _shared("models", "taef2_decoder.pth")
    return taef2()


@pytest.fixture(scope="module")
def kodak_crop() -> torch.Tensor:
    from PIL import Image

    path = _shared("data", "images", "kodak", "kodim01.png")
    img = np.array(Image.open(path).convert("RGB"))  # 512 x 768
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0
    return x[..., 192:320, 320:448].contiguous()  # 128 x 128 centre crop


# --------------------------------------------------------------------------- TAEF2 (real weights)


def test_taef2_structure(taef2_model: TinyAutoencoder) -> None:
    m = taef2_model
    assert (m.name, m.channels, m.factor) == ("taef2", 32, 8)
    assert m.encoder_layers is not None and m.decoder_layers is not None
    enc_pool = [i for i, la in enumerate(m.encoder_layers) if la.kind == "block" and la.pool]
    dec_pool = [i for i, la in enumerate(m.decoder_layers) if la.kind == "block" and la.pool]
    assert enc_pool == [11, 12, 13]
    assert dec_pool == [3, 4, 5]
    assert [i for i, la in enumerate(m.encoder_layers) if la.kind == "conv" and la.stride == 2] == [2, 6, 10]
    assert [i for i, la in enumerate(m.decoder_layers) if la.kind == "upsample"] == [6, 11, 16]
    assert m.decoder_layers[0].kind == "clamp"
    assert not any(p.requires_grad for p in m.parameters())


def test_taef2_roundtrip_psnr(taef2_model: TinyAutoencoder, kodak_crop: torch.Tensor) -> None:
    z = taef2_model.encode(kodak_crop)
    assert z.shape == (1, 32, 16, 16)
    assert not z.requires_grad
    with torch.no_grad():
        y = taef2_model.decode(z)
    assert y.shape == kodak_crop.shape
    assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0
    # measured 24.9 dB on this (highly textured) crop; 27.2 dB on the whole kodim01
    assert 22.0 < _psnr(y, kodak_crop) < 30.0


def test_taef2_decoder_only(taef2_model: TinyAutoencoder, kodak_crop: torch.Tensor) -> None:
    dec = taef2(with_encoder=False)
    assert dec.encoder is None and (dec.channels, dec.factor) == (32, 8)
    z = taef2_model.encode(kodak_crop[..., :32, :32])
    with torch.no_grad():
        assert torch.equal(dec.decode(z), taef2_model.decode(z))
    with pytest.raises(RuntimeError, match="without an encoder"):
        dec.encode(kodak_crop)


def test_taef2_missing_shared_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LATENTCAST_SHARED", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"taef2_encoder\.pth.*madebyollin/taesd"):
        taef2()


# --------------------------------------------------------------------------- TAESD from config


@pytest.mark.parametrize("midblock_gn", [False, True])
def test_tiny_taesd_save_reload_identical(tmp_path: Path, midblock_gn: bool) -> None:
    m = TinyAutoencoder.from_config(latent_channels=4, width=16, midblock_gn=midblock_gn, seed=3)
    assert (m.channels, m.factor) == (4, 8)
    enc_sd, dec_sd = m.encoder.state_dict(), m.decoder.state_dict()
    # the default config reproduces the classic taesd layout: encoder 0..14, decoder 1..19
    assert {k.split(".")[0] for k in enc_sd} == {str(i) for i in range(15)}
    assert "1.weight" in dec_sd and "19.weight" in dec_sd and "0.weight" not in dec_sd
    assert any(".pool.1.weight" in k for k in enc_sd) == midblock_gn

    enc_p, dec_p = tmp_path / "tiny_encoder.pth", tmp_path / "tiny_decoder.pth"
    torch.save(enc_sd, enc_p)
    torch.save(dec_sd, dec_p)
    r = TinyAutoencoder.from_files(encoder_path=enc_p, decoder_path=dec_p)
    assert (r.name, r.channels, r.factor) == ("tiny", 4, 8)
    assert r.encoder_layers == m.encoder_layers and r.decoder_layers == m.decoder_layers

    x = _image(1)
    z1, z2 = m.encode(x), r.encode(x)
    assert torch.equal(z1, z2)
    with torch.no_grad():
        assert torch.equal(m.decode(z1), r.decode(z2))


def test_tiny_taesd_seed_and_factor() -> None:
    a = TinyAutoencoder.from_config(width=8, seed=5)
    b = TinyAutoencoder.from_config(width=8, seed=5)
    c = TinyAutoencoder.from_config(width=8, seed=6)
    x = _image(2)
    assert torch.equal(a.encode(x), b.encode(x))
    assert not torch.equal(a.encode(x), c.encode(x))
    f4 = TinyAutoencoder.from_config(latent_channels=16, width=8, encoder_blocks=(1, 1, 1), decoder_blocks=(1, 1, 1))
    assert (f4.channels, f4.factor) == (16, 4)
    assert f4.encode(x).shape == (1, 16, 8, 12)
    with pytest.raises(ValueError, match="same"):
        TinyAutoencoder.from_config(encoder_blocks=(1, 1), decoder_blocks=(1, 1, 1))


def test_tiny_taesd_safetensors_diffusers_layout(tmp_path: Path) -> None:
    """One file with ``encoder.layers.N`` / ``decoder.layers.N-1`` keys (diffusers numbering)."""
    from safetensors.torch import save_file

    m = TinyAutoencoder.from_config(width=8, midblock_gn=True, seed=0)
    both = {f"encoder.layers.{k}": v.half() for k, v in m.encoder.state_dict().items()}
    for k, v in m.decoder.state_dict().items():
        idx, rest = k.split(".", 1)
        both[f"decoder.layers.{int(idx) - 1}.{rest}"] = v.half()
    path = tmp_path / "x.safetensors"
    save_file(both, str(path))
    r = TinyAutoencoder.from_files(encoder_path=path, decoder_path=path)
    assert r.name == "x"
    assert r.encoder_layers == m.encoder_layers and r.decoder_layers == m.decoder_layers
    x = _image(4)
    assert torch.allclose(r.encode(x), m.encode(x), atol=5e-2)


def test_tiny_taesd_save_files_roundtrip(tmp_path: Path) -> None:
    m = TinyAutoencoder.from_config(width=8, seed=1)
    m.save_files(encoder_path=tmp_path / "a_encoder.pth", decoder_path=tmp_path / "a_decoder.pth")
    r = load_latent_space(f"taesd:{tmp_path}")
    assert isinstance(r, TinyAutoencoder) and r.name == "a"
    z = torch.randn(1, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(r.decode(z), m.decode(z))


def test_taesd_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope_decoder\.pth.*madebyollin/taesd"):
        TinyAutoencoder.from_files(encoder_path=None, decoder_path=tmp_path / "nope_decoder.pth")


def test_taesd_rejects_foreign_state_dict(tmp_path: Path) -> None:
    p = tmp_path / "bad_encoder.pth"
    torch.save({"conv_in.weight": torch.zeros(4, 3, 3, 3)}, p)
    with pytest.raises(ValueError, match="conv_in.weight"):
        TinyAutoencoder.from_files(encoder_path=p, decoder_path=None)
    sd = TinyAutoencoder.from_config(width=8).decoder.state_dict()
    sd["3.pool.9.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad_decoder.pth")
    with pytest.raises(ValueError, match=r"(?s)bad_decoder\.pth.*3\.pool\.9\.weight"):
        TinyAutoencoder.from_files(encoder_path=None, decoder_path=tmp_path / "bad_decoder.pth")


def test_decode_keeps_gradients_encode_does_not() -> None:
    m = TinyAutoencoder.from_config(width=8, seed=0).requires_grad_(False)
    z = torch.randn(1, 4, 2, 2, requires_grad=True)
    m.decode(z).mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    x = _image(0, (16, 16)).requires_grad_(True)
    assert not m.encode(x).requires_grad
    assert m.encode(x, grad=True).requires_grad


def test_shape_errors() -> None:
    m = TinyAutoencoder.from_config(width=8, seed=0)
    with pytest.raises(ValueError, match=r"\(1, 3, 30, 48\)"):
        m.encode(torch.rand(1, 3, 30, 48))
    with pytest.raises(ValueError, match=r"\(1, 4, 32, 32\)"):
        m.encode(torch.rand(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"\(3, 32, 32\)"):
        m.encode(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="floating"):
        m.encode(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(1, 5, 2, 2\)"):
        m.decode(torch.rand(1, 5, 2, 2))
    with pytest.raises(TypeError):
        m.encode(np.zeros((1, 3, 8, 8), np.float32))  # type: ignore[arg-type]
    assert m.latent_shape(64, 32) == (4, 8, 4)
    with pytest.raises(ValueError, match="60x32"):
        m.latent_shape(60, 32)


# --------------------------------------------------------------------------- SD VAE

_TINY_VAE = {
    "block_out_channels": [8, 16],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 4,
    "norm_num_groups": 4,
    "layers_per_block": 1,
    "sample_size": 32,
    "scaling_factor": 0.5,
}


def test_sd_vae_tiny(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    m = SDVAE.from_config(_TINY_VAE, seed=0)
    assert isinstance(m, LatentSpace) and (m.channels, m.factor) == (4, 2)
    x = _image(0, (16, 24))
    z = m.encode(x)
    assert z.shape == (1, 4, 8, 12)
    assert torch.equal(z, m.encode(x))  # posterior mean: deterministic
    with torch.no_grad():
        raw = m.vae.encode(x * 2 - 1).latent_dist.mean
        y = m.decode(z)
    torch.testing.assert_close(z, raw * 0.5)
    assert y.shape == x.shape and 0.0 <= float(y.min()) and float(y.max()) <= 1.0

    # same seed -> same weights; saved pipeline-style folder (vae/) loads back identically
    again = SDVAE.from_config(_TINY_VAE, seed=0)
    assert torch.equal(again.encode(x), z)
    m.vae.save_pretrained(str(tmp_path / "pipe" / "vae"))
    r = load_latent_space(f"sd-vae:{tmp_path / 'pipe'}")
    assert isinstance(r, SDVAE) and r.scaling_factor == 0.5
    assert torch.equal(r.encode(x), z)
    assert not any(p.requires_grad for p in r.parameters())


def test_sd_vae_missing_folder(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        SDVAE.from_pretrained(tmp_path / "missing" / "vae folder")


def test_sd_vae_hub_id_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    diffusers = pytest.importorskip("diffusers")
    seen = {}

    def fake(source: str, subfolder: str | None = None, **kw: object) -> object:
        seen.update(source=source, subfolder=subfolder, **kw)
        return SDVAE.from_config(_TINY_VAE).vae

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", fake)
    m = load_latent_space("sd-vae:stabilityai/stable-diffusion-2-1-base/vae", local_files_only=True)
    assert seen == {"source": "stabilityai/stable-diffusion-2-1-base", "subfolder": "vae", "local_files_only": True}
    assert m.name == "sd-vae" and m.channels == 4


def test_sd_vae_without_diffusers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r'pip install "latentcast\[sd\]"'):
        SDVAE.from_config(_TINY_VAE)


# --------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("factor,channels", [(1, 3), (2, 12), (8, 192)])
def test_pixel_space_exact(factor: int, channels: int) -> None:
    p = PixelSpace(factor)
    assert (p.channels, p.factor) == (channels, factor)
    x = _image(7, (16, 24))
    z = p.encode(x)
    assert z.shape == (1, channels, 16 // factor, 24 // factor)
    assert torch.equal(p.decode(z), x)


def test_pixel_space_errors() -> None:
    with pytest.raises(ValueError, match=r"\(1, 3, 12, 16\)"):
        PixelSpace(8).encode(torch.rand(1, 3, 12, 16))
    with pytest.raises(ValueError):
        PixelSpace(0)


# --------------------------------------------------------------------------- registry


def test_registry_pixels_and_taesd(tmp_path: Path) -> None:
    assert load_latent_space("pixels").channels == 3
    assert load_latent_space(" pixels:8 ").channels == 192
    m = TinyAutoencoder.from_config(width=8, seed=0)
    m.save_files(encoder_path=tmp_path / "e.pth", decoder_path=tmp_path / "d.pth")
    r = load_latent_space(f"taesd:{tmp_path / 'e.pth'},{tmp_path / 'd.pth'}", name="mine")
    assert isinstance(r, TinyAutoencoder) and r.name == "mine" and r.channels == 4


def test_registry_taef2(taef2_model: TinyAutoencoder) -> None:
    r = load_latent_space("taef2", with_encoder=False)
    assert isinstance(r, TinyAutoencoder) and (r.channels, r.factor) == (32, 8)


@pytest.mark.parametrize(
    "spec",
    ["vqgan", "taesd:", "taesd:a,b,c", "pixels:0", "pixels:x", "sd-vae:", "taef2:extra", ""],
)
def test_registry_errors(spec: str) -> None:
    with pytest.raises(ValueError) as ei:
        load_latent_space(spec)
    msg = str(ei.value)
    assert repr(spec) in msg
    for form in LATENT_SPACE_SPECS:
        assert form in msg


def test_registry_taesd_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither"):
        load_latent_space(f"taesd:{tmp_path / 'nothing'}")
    with pytest.raises(ValueError, match="exactly one"):
        load_latent_space(f"taesd:{tmp_path}")
