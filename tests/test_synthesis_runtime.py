"""The temporal render's cost levers: g_s on only what kept cells need (``from_global(keep=...)``), g_s on
ONNX Runtime (``models/synthesis_runtime.py``) and the pixel latent space's frame as a byte rearrangement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentcast.models.elic import CONFIGS, SynthesisToLatent

pytest.importorskip("onnx")


def _g_s(**kw) -> SynthesisToLatent:
    cfg = CONFIGS["lite"].__class__(**{**CONFIGS["lite"].to_dict(), "M": 32, "groups": (8, 8, 16), "Nz": 8,
                                       "gs_width": 16, **kw})
    torch.manual_seed(0)
    g = SynthesisToLatent(cfg).eval()
    with torch.no_grad():  # random but not tiny activations: scale the output conv up
        g.out.weight.mul_(4.0)
    return g


SHAPES = [{}, {"gs_up_widths": (12, 8), "gs_blocks": 2, "gs_tail_blocks": 0},  # the shipped fast synthesis' shape
          {"latent_factor": 8, "latent_channels": 32}, {"latent_factor": 16}]


def _inputs(g: SynthesisToLatent, rows: int, cols: int, seed: int = 1):
    r = torch.Generator().manual_seed(seed)
    y = torch.randn(1, g.head.in_channels - 1 - g.global_net[-1].out_channels, rows, cols, generator=r)
    return y, torch.ones(1, 1, rows, cols), torch.randn(1, g.global_net[-1].out_channels, rows, cols, generator=r)


@pytest.mark.parametrize("kw", SHAPES)
@pytest.mark.parametrize("keep", [(3, 6, 2, 9), (0, 4, 0, 3), (5, 9, 8, 11), (0, 9, 0, 11)])
def test_keep_returns_the_whole_crop_output_on_the_kept_cells(kw, keep):
    g = _g_s(**kw)
    y, m, gz = _inputs(g, 9, 11)
    with torch.no_grad():
        whole = g.from_global(y, m, gz)
        part = g.from_global(y, m, gz, keep=keep)
    s = whole.shape[2] // 9  # latent pixels per cell
    r0, r1, c0, c1 = keep
    torch.testing.assert_close(part, whole[:, :, r0 * s: r1 * s, c0 * s: c1 * s], rtol=0, atol=1e-5)


def test_keep_outside_the_crop_is_an_error():
    g = _g_s()
    with pytest.raises(ValueError, match=r"keep \(0, 10, 0, 2\) is not inside the crop's 9x11 cells"):
        g.from_global(*_inputs(g, 9, 11), keep=(0, 10, 0, 2))


@pytest.mark.parametrize("kw", SHAPES[:3])
def test_onnx_runtime_synthesis_computes_what_torch_does(kw):
    from latentcast.models.synthesis_runtime import onnx_synthesis

    g = _g_s(**kw)
    ort = onnx_synthesis(g, threads=1)
    assert onnx_synthesis(g, threads=1) is ort  # exported once per g_s and thread count
    for rows, cols, keep in ((9, 11, None), (9, 11, (3, 6, 2, 9)), (4, 6, (0, 4, 0, 6)), (12, 5, (10, 12, 4, 5))):
        y, m, gz = _inputs(g, rows, cols)
        with torch.no_grad():
            want = g.from_global(y, m, gz, keep=keep)
        got = ort(y, m, gz, keep=keep)
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kw", SHAPES[:2])
def test_bf16_synthesis_is_float32_within_bfloat16_precision(kw):
    """runtime bf16: a channels_last copy of g_s under bfloat16 autocast (the original stays float32 and
    contiguous), float32 out, kept cells as the whole crop's, values within bfloat16's precision of float32."""
    from latentcast.models.synthesis_runtime import render_synthesis

    g = _g_s(**kw)
    bf = render_synthesis(g, "bf16")
    assert render_synthesis(g, "bf16") is bf and bf.g_s is not g  # one copy per g_s
    assert all(p.dtype == torch.float32 for p in g.parameters())
    assert all(p.is_contiguous() for p in g.parameters())
    for rows, cols, keep in ((9, 11, None), (9, 11, (3, 6, 2, 9))):
        y, m, gz = _inputs(g, rows, cols)
        with torch.no_grad():
            want = g.from_global(y, m, gz, keep=keep)
        got = bf(y, m, gz, keep=keep)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert not torch.equal(got, want)  # it did run in bfloat16
        assert (got - want).abs().max() < 0.03 * want.abs().max() + 1e-3
    with pytest.raises(ValueError, match="render runtime 'fp8' is not one of auto, onnx, torch, bf16"):
        render_synthesis(g, "fp8")


def test_temporal_decoder_runtimes_and_a_bad_one(tiny_codec, monkeypatch):
    from latentcast.models.temporal import TemporalDecoder
    from latentcast.proto.temporal import TemporalTables

    tables = TemporalTables.flat(M=tiny_codec.M, n_rates=tiny_codec.n_rates)
    with pytest.raises(ValueError, match="render runtime 'tvm' is not one of auto, onnx, torch, bf16"):
        TemporalDecoder(codec=tiny_codec, tables=tables, runtime="tvm")
    assert TemporalDecoder(codec=tiny_codec, tables=tables, runtime="torch").runtime == "torch"
    from latentcast.models import synthesis_runtime

    for has, want in ((True, "bf16"), (False, "onnx")):  # auto (the default): bf16 where the CPU has it
        monkeypatch.setattr(synthesis_runtime, "cpu_has_bf16", lambda has=has: has)
        assert TemporalDecoder(codec=tiny_codec, tables=tables).runtime == want


def test_pixel_latent_frames_are_the_latent_space_decoder_output():
    from latentcast.models.latent_spaces import PixelSpace

    class _C:  # LatentCodec.latent_to_frame on a bare object: only latent_space() is used
        def latent_space(self):
            return PixelSpace(4)

    from latentcast.models.codec import LatentCodec

    lat = torch.rand(1, 48, 9, 11) * 1.4 - 0.2  # values outside [0, 1] clamp
    got = LatentCodec.latent_to_frame(_C(), lat, 41, 30)
    img = PixelSpace(4).decode(lat)[0, :, :30, :41]
    want = (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    assert got.shape == (30, 41, 3) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)
