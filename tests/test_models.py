"""models.elic / models.quant: shapes of both configurations, fake-quant vs exact integer path."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from latentcast.models.elic import CONFIGS, ElicCodec, ElicConfig  # noqa: E402
from latentcast.models.quant import QConv  # noqa: E402


@pytest.mark.parametrize("name", ["lite", "paper"])
def test_training_pass_shapes_and_rates(name):
    torch.manual_seed(0)
    model = ElicCodec(CONFIGS[name])
    x = torch.rand(2, 3, 64, 128)
    mask = torch.ones(2, 1, 4, 8)
    mask[1, :, :2] = 0
    out = model(x, rate=torch.tensor([0, model.n_rates - 1]), mask=mask)
    f = CONFIGS[name].latent_factor
    assert out["latent"].shape == (2, CONFIGS[name].latent_channels, 64 // f, 128 // f)
    assert out["bits_y"].shape == (2,) and torch.all(out["bits_y"] > 0) and torch.all(out["bits_z"] > 0)
    (out["bits_y"].sum() + out["latent"].square().mean()).backward()
    assert model.g_a[0].weight.grad is not None and model.ep[0][0].conv.weight.grad is not None


def test_paper_config_matches_elic():
    c = CONFIGS["paper"]
    assert (c.N, c.M, c.groups) == (192, 320, (16, 16, 32, 64, 192))


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match=r"groups \(16, 16\) sum to 32, not M=64"):
        ElicConfig(M=64, groups=(16, 16))


def test_fake_quant_tracks_the_exact_integer_layer():
    torch.manual_seed(1)
    layer = QConv(8, 6, 3, in_scale=0.25, in_zero=128, out_scale=1 / 16, relu=True, upsample=2)
    codes = torch.randint(0, 256, (1, 8, 5, 7)).double()
    fake = layer(codes.float()).double()
    layer.freeze()
    exact = layer(codes, exact=True)
    assert exact.shape == fake.shape == (1, 6, 10, 14)
    assert torch.equal(exact, torch.round(exact))
    assert (exact - fake).abs().max() <= 1.0  # only requantization rounding differs


def test_exact_layer_is_order_independent():
    """The integer result does not depend on the convolution algorithm: compare with a direct sum."""
    torch.manual_seed(2)
    layer = QConv(4, 3, 3, in_scale=1 / 16, in_zero=0, out_scale=1 / 16, relu=False)
    layer.freeze()
    codes = torch.randint(0, 256, (1, 4, 4, 5)).double()
    out = layer(codes, exact=True)[0].numpy()
    w = layer.w_int.numpy().astype(np.int64)
    x = np.pad(codes[0].numpy().astype(np.int64), ((0, 0), (1, 1), (1, 1)))
    for c in range(3):
        for i in range(4):
            for j in range(5):
                acc = int((w[c] * x[:, i : i + 3, j : j + 3]).sum())
                t = acc * int(layer.mult[c]) + int(layer.bias_int[c])
                assert out[c, i, j] == t >> int(layer.shift)


def test_freeze_refuses_layers_that_cannot_be_exact():
    layer = QConv(8192, 4, 5, in_scale=1.0, in_zero=128, out_scale=1e-6, relu=False)
    with pytest.raises(ValueError, match="cannot be exact"):
        layer.freeze()


def test_small_variant_builds():
    cfg = dataclasses.replace(CONFIGS["lite"], latent_channels=4, latent_factor=8)
    assert ElicCodec(cfg).g_s.out.out_channels == 4
    assert CONFIGS["lite-taef2"].latent_channels == 32
