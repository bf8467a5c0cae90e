"""Integer entropy-parameter networks: trained with fake quantization, run exactly.

Why: the edge computes the entropy parameters (means, scale indices) in ONNX
Runtime, the cloud recomputes them in PyTorch on other hardware. A one-ulp
difference in a float network can move a scale index and derail the range
decoder. So every network whose output reaches the entropy coder is an
*integer network* (after Ballé et al., "Integer networks for data compression
with latent-variable models", ICLR 2019):

::

    codes u (uint8, zero point zp)                    per output channel c:
      │                                               W_c  int8 weights
      ▼                                               M_c  integer multiplier  (< 2**16)
    acc = conv(u - zp, W)        exact int32          B_c  integer bias (+ rounding half)
      ▼                                               S    shift (per layer)
    t = acc * M_c + B_c          exact in float64 (|t| < 2**53, checked at freeze time)
      ▼
    out = floor(t * 2**-S)       exact (power-of-two scaling)
      ▼
    [depth-to-space 2x]  [clip 0..255 for hidden layers]  ──► next layer's codes

Every value is an integer and every operation is exact, so the result is the
same on any IEEE machine, in any summation order (ONNX Runtime's
``ConvInteger`` accumulates in int32; PyTorch's float64 convolution of
integers below 2**53 is exact, and a final ``round`` removes any residue of a
non-exact algorithm such as Winograd on a GPU).

Training uses the same graph in *fake-quant* mode: real-valued activations are
``(u - zp) * s_in``, weights are rounded per channel to int8 and every output
is rounded to its code grid, all with straight-through gradients.
:meth:`QConv.freeze` turns the trained float parameters into the integer ones;
they are stored in the weight file and never recomputed (so no libm call on
any machine can change them).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ACT_MAX", "round_ste", "QConv", "quantize_input"]

ACT_MAX = 255  # hidden activations are uint8 codes
_MAX_EXACT = 2.0**52  # bound on |acc * M + B| for float64 exactness (with margin)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half up (``floor(x + 0.5)``, as the integer path does) with a straight-through gradient."""
    return x + (torch.floor(x + 0.5) - x).detach()


def quantize_input(x: torch.Tensor, resolution: float, *, exact: bool) -> torch.Tensor:
    """Real-valued signed input -> uint8 codes with zero point 128: ``clip(floor(x*res + 0.5), -128, 127) + 128``.

    ``resolution`` must be a power of two so that ``x * res`` is exact.
    """
    if exact:
        return torch.clamp(torch.floor(x * resolution + 0.5), -128, 127) + 128
    return torch.clamp(round_ste(x * resolution), -128, 127) + 128


class QConv(nn.Module):
    """A convolution between uint8 code grids (see module docstring).

    Args:
        in_ch, out_ch: channels (``out_ch`` after the optional depth-to-space).
        kernel: square kernel size (odd; padding keeps the size).
        in_scale: real value of one input code step.
        in_zero: input zero point (128 for signed inputs, 0 after a ReLU).
        out_scale: real value of one output code step, a float or one per output channel.
        relu: clip outputs to ``0..255`` (hidden layer); otherwise outputs are signed integers.
        upsample: 1, or 2 for a depth-to-space (pixel shuffle) after the convolution.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        *,
        in_scale: float,
        in_zero: int,
        out_scale: float | list[float],
        relu: bool,
        upsample: int = 1,
    ):
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError(f"kernel {kernel} must be odd")
        if upsample not in (1, 2):
            raise ValueError(f"upsample {upsample} not in (1, 2)")
        self.in_ch, self.out_ch, self.kernel, self.upsample = in_ch, out_ch, kernel, upsample
        self.relu = relu
        self.in_scale = float(in_scale)
        self.in_zero = int(in_zero)
        n_conv = out_ch * upsample * upsample
        self.conv = nn.Conv2d(in_ch, n_conv, kernel, padding=kernel // 2)
        if isinstance(out_scale, (int, float)):
            out_scale = [float(out_scale)] * out_ch
        if len(out_scale) != out_ch:
            raise ValueError(f"out_scale has {len(out_scale)} entries, expected {out_ch}")
        os_ = torch.tensor(out_scale, dtype=torch.float32).repeat_interleave(upsample * upsample)
        self.register_buffer("out_scale", os_, persistent=False)
        # integer parameters, filled by freeze() or by loading a frozen state dict
        self.register_buffer("w_int", torch.zeros(n_conv, in_ch, kernel, kernel, dtype=torch.int8))
        self.register_buffer("mult", torch.zeros(n_conv, dtype=torch.float64))
        self.register_buffer("bias_int", torch.zeros(n_conv, dtype=torch.float64))
        self.register_buffer("shift", torch.zeros((), dtype=torch.int64))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))

    # -- training (fake quantization) -------------------------------------------------
    def _weight_scale(self) -> torch.Tensor:
        w = self.conv.weight
        return (w.detach().abs().amax(dim=(1, 2, 3)).clamp_min(1e-8) / 127.0).to(w.dtype)

    def forward_fake(self, codes: torch.Tensor) -> torch.Tensor:
        x = (codes - self.in_zero) * self.in_scale
        sw = self._weight_scale().view(-1, 1, 1, 1)
        w = self.conv.weight
        wq = w + (torch.clamp(torch.round(w / sw), -127, 127) * sw - w).detach()
        out = F.conv2d(x, wq, self.conv.bias, padding=self.kernel // 2)
        out = round_ste(out / self.out_scale.view(1, -1, 1, 1).to(out.dtype))
        if self.upsample > 1:
            out = F.pixel_shuffle(out, self.upsample)
        if self.relu:
            out = torch.clamp(out, 0, ACT_MAX)
        return out

    # -- exact integer inference --------------------------------------------------------
    @torch.no_grad()
    def freeze(self) -> None:
        """Derive the integer parameters from the float ones (done once, then stored)."""
        w = self.conv.weight.detach().double()
        sw = w.abs().amax(dim=(1, 2, 3)).clamp_min(1e-12) / 127.0
        w_int = torch.clamp(torch.round(w / sw.view(-1, 1, 1, 1)), -127, 127)
        m = sw * self.in_scale / self.out_scale.double()
        shift = 15 - math.ceil(math.log2(float(m.max())))
        shift = max(0, min(shift, 40))
        mult = torch.round(m * 2.0**shift)
        bias = self.conv.bias.detach().double() if self.conv.bias is not None else torch.zeros_like(m)
        bias_int = torch.round(bias / self.out_scale.double() * 2.0**shift) + (2.0 ** (shift - 1) if shift > 0 else 0.0)
        fan_in = self.in_ch * self.kernel * self.kernel
        max_in = max(self.in_zero, ACT_MAX - self.in_zero)
        bound = (w_int.abs().sum(dim=(1, 2, 3)) * max_in * mult + bias_int.abs()).max()
        if float(bound) >= _MAX_EXACT or fan_in * 127 * max_in >= 2**31:
            raise ValueError(
                f"QConv({self.in_ch}->{self.out_ch}, k={self.kernel}) cannot be exact: bound {float(bound):.3g} "
                f">= 2**52 or int32 accumulator overflow; reduce the layer width"
            )
        self.w_int.copy_(w_int.to(torch.int8))
        self.mult.copy_(mult)
        self.bias_int.copy_(bias_int)
        self.shift.fill_(shift)
        self.frozen.fill_(True)

    def forward_exact(self, codes: torch.Tensor) -> torch.Tensor:
        if not bool(self.frozen):
            raise RuntimeError("QConv.forward_exact needs frozen integer parameters (call freeze() or load them)")
        x = codes.double() - self.in_zero
        acc = torch.round(F.conv2d(x, self.w_int.double(), padding=self.kernel // 2))
        t = acc * self.mult.view(1, -1, 1, 1) + self.bias_int.view(1, -1, 1, 1)
        out = torch.floor(t * 2.0 ** (-int(self.shift)))
        if self.upsample > 1:
            out = F.pixel_shuffle(out, self.upsample)
        if self.relu:
            out = torch.clamp(out, 0, ACT_MAX)
        return out

    def forward(self, codes: torch.Tensor, *, exact: bool = False) -> torch.Tensor:
        return self.forward_exact(codes) if exact else self.forward_fake(codes)


class QSequential(nn.ModuleList):
    """A chain of :class:`QConv` layers."""

    def forward(self, codes: torch.Tensor, *, exact: bool = False) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            codes = layer(codes, exact=exact)
        return codes
