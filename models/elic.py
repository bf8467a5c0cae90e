"""ELIC with integer entropy parameters, decoding into a diffusion latent space.

After He et al., "ELIC: Efficient Learned Image Compression with Unevenly
Grouped Space-Channel Contextual Adaptive Coding" (CVPR 2022), as used by
DISCOVER (sec. 3.2): the synthesis transform ``g_s`` outputs the diffusion
model's latent ``z_c`` (here at 1/8 of the frame), not pixels, and gets a
coarse global prior ``M(ẑ)`` from the hyper-latent besides the (possibly
partial) latent ``ŷ``::

    x ──g_a──► y ──h_a──► z ──round──► ẑ ─────────────────────────────┐  (always sent, factorized prior)
               │                      │                             │
               │                h_s (integer net) ──► H             │
               │                      │                             │
               │   for group k in 16/16/32/64/M-128, anchors then non-anchors (checkerboard):
               │     (μ, l) = ep_k(H, ch_k(ŷ_<k), sp_k(ŷ_k anchors))    integer nets
               └──►  s = floor((y - μ)/Δ_q + ½) inside the ROI mask, ŷ = μ + Δ_q s, ŷ = μ outside
                                                                    │
    ẑ_c = g_s([ŷ, mask, M(ẑ)])  ◄───────────────────────────────────┘

The entropy parameters ``(μ, l)`` come from :class:`~latentcast.models.quant.QConv`
integer networks, exact on any machine; ``Δ_q`` is the quantization step of
rate point ``q`` (a dyadic number), and ``l - k_q`` indexes the zero-mean
Gaussian table the symbol is coded with. Positions outside the ROI mask are
not coded and take the mean ``μ`` (the paper's eq. (2) fills them from the
hyperprior).

With ``linear_path`` (pixel latents only), a linear transform of each 16x16 cell runs beside both
transforms, ``y = g_a(x) + A·cell(x)`` and ``ẑ_c = g_s(...) + S·ŷ`` per cell (:class:`CellAnalysis`,
:class:`CellSynthesis`). Started from the principal components of training cells
(``models/training.py: init_linear_path``) with g_a's and g_s's last convolutions at zero, the codec
begins as a block-PCA transform coder (35.5 dB on Kodak with 160 coefficients, unquantized) and the
nonlinear transforms learn what it lacks, instead of learning the reconstruction from nothing
(``results/linear_path``).

Two configurations: ``paper`` (N=192, M=320, groups 16/16/32/64/192) and
``lite`` (N=64, M=160, groups 16/16/32/64/32), small enough for a CPU edge.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quant import QConv, QSequential, quantize_input, round_ste

__all__ = ["ElicConfig", "CONFIGS", "ElicCodec", "MEAN_RES", "Y_IN_RES", "analysis_halo", "analysis_stages",
           "crop_chain", "channel_slice", "CellAnalysis", "CellSynthesis", "zero_new_blocks"]

MEAN_RES = 64  # means are integers in units of 1/64
Y_IN_RES = 4  # context networks see ŷ in steps of 1/4 (clipped to ±32)
ACT_SCALE = 1.0 / 16  # real value of one hidden activation code


@dataclass(frozen=True)
class ElicConfig:
    name: str = "lite"
    N: int = 64  # analysis width (channels between strided convs of g_a)
    M: int = 160  # channels of the latent y (at 1/16)
    groups: tuple[int, ...] = (16, 16, 32, 64, 32)  # uneven channel groups, sum == M
    Nz: int = 32  # channels of the hyper-latent z (at 1/64): always sent, so it bounds the ROI-only saving
    Nh: int = 64  # width of the integer hyper synthesis and its output features H
    ctx: int = 48  # width of the integer channel / spatial context networks
    ep: int = 96  # width of the integer parameter-aggregation networks
    res_blocks: int = 1  # residual bottleneck blocks per g_a stage (ELIC: 3)
    attention: bool = False  # simplified attention blocks in g_a (ELIC: yes)
    gs_width: int = 128  # width of the synthesis transform
    gs_blocks: int = 3  # residual blocks of g_s at 1/16
    gs_up_widths: tuple[int, ...] = ()  # widths of g_s's x2 stages after 1/16 (() = gs_width, then halving, min 24)
    gs_tail_blocks: int = 1  # residual blocks of g_s at 1/latent_factor before its output conv
    latent_channels: int = 48  # channels of the target latent z_c (pixels:4 = 48, taef2: 32, SD: 4)
    latent_factor: int = 4  # z_c is at 1/latent_factor of the frame (g_s upsamples 16 -> factor)
    n_scales: int = 64  # Gaussian scale tables
    scale_min: float = 0.11  # smallest table scale
    scale_max: float = 64.0  # largest table scale
    rate_steps: tuple[int, ...] = (22, 14, 7, 0)  # k_q per rate point (0 = lowest rate): Δ_q = exp(δ k_q)
    channel_gains: bool = False  # learned per-channel offsets j_q,c: Δ_q,c = exp(δ (k_q + j_q,c)) (gain units)
    linear_path: bool = False  # a linear transform of 16x16 cells beside g_a and g_s (CellAnalysis; pixel latents)

    def __post_init__(self):
        if sum(self.groups) != self.M:
            raise ValueError(f"groups {self.groups} sum to {sum(self.groups)}, not M={self.M}")
        if self.latent_factor not in (1, 2, 4, 8, 16):
            raise ValueError(f"latent_factor {self.latent_factor} not in (1, 2, 4, 8, 16)")
        if self.linear_path and self.latent_channels != 3 * self.latent_factor**2:
            raise ValueError(f"linear_path needs a pixel latent (3 x latent_factor² = {3 * self.latent_factor**2} "
                             f"channels), not {self.latent_channels} channels")
        stages = int(math.log2(16 // self.latent_factor))
        if self.gs_up_widths and len(self.gs_up_widths) != stages:
            raise ValueError(f"gs_up_widths {self.gs_up_widths} has {len(self.gs_up_widths)} widths; "
                             f"latent_factor {self.latent_factor} needs {stages} (or () for the default)")

    @property
    def synthesis_up_widths(self) -> tuple[int, ...]:
        """Widths of g_s's x2 stages from 1/16 to 1/latent_factor."""
        if self.gs_up_widths:
            return tuple(self.gs_up_widths)
        widths, w = [], self.gs_width
        for i in range(int(math.log2(16 // self.latent_factor))):
            w = self.gs_width if i == 0 else max(w // 2, 24)
            widths.append(w)
        return tuple(widths)

    @classmethod
    def from_dict(cls, d: dict) -> ElicConfig:
        """The inverse of :meth:`to_dict` (JSON lists back to tuples; fields a file predates take defaults)."""
        d = dict(d)
        for k in ("groups", "rate_steps", "gs_up_widths"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    @property
    def log_step(self) -> float:
        """δ: log-distance between consecutive scale tables."""
        return math.log(self.scale_max / self.scale_min) / (self.n_scales - 1)

    def to_dict(self) -> dict:
        return asdict(self)


CONFIGS: dict[str, ElicConfig] = {
    # embedded default: synthesis straight to pixels (space-to-depth by 4), no latent decoder cost
    "lite": ElicConfig(),
    # the same codec targeting the TAEF2 diffusion latent (32 channels at 1/8)
    "lite-taef2": ElicConfig(name="lite-taef2", latent_channels=32, latent_factor=8),
    # the paper profile: ELIC targeting the Stable Diffusion VAE latent (4 channels at 1/8)
    "paper": ElicConfig(
        name="paper", N=192, M=320, groups=(16, 16, 32, 64, 192), Nz=192, Nh=192, ctx=128, ep=256,
        res_blocks=3, attention=True, gs_width=192, gs_blocks=3, latent_channels=4, latent_factor=8,
    ),
}


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)


class ResidualBottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 with a skip (ELIC's residual bottleneck block)."""

    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(_conv(ch, ch // 2, 1), nn.ReLU(inplace=True), _conv(ch // 2, ch // 2, 3),
                                  nn.ReLU(inplace=True), _conv(ch // 2, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class AttentionBlock(nn.Module):
    """Simplified attention (Cheng et al. 2020) as used in ELIC's g_a."""

    def __init__(self, ch: int):
        super().__init__()
        self.trunk = nn.Sequential(ResidualBottleneck(ch), ResidualBottleneck(ch), ResidualBottleneck(ch))
        self.gate = nn.Sequential(
            ResidualBottleneck(ch), ResidualBottleneck(ch), ResidualBottleneck(ch), _conv(ch, ch, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.trunk(x) * torch.sigmoid(self.gate(x))


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(_conv(ch, ch), nn.LeakyReLU(0.1, inplace=True), _conv(ch, ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def zero_new_blocks(module: nn.Module, provided: Iterable[str], prefix: str = "") -> list[str]:
    """Zero the last convolution of every residual block of ``module`` that ``provided`` (the parameter names
    a start file gives, each ``prefix`` + the name within ``module``) has nothing of, so a transform that only
    adds blocks to a trained layout starts as exactly that transform and training only improves on it
    (Net2Net's function-preserving deepening). Returns the blocks' names (within ``module``)."""
    provided = tuple(provided)
    zeroed = []
    for name, m in module.named_modules():
        if isinstance(m, ResBlock) and not any(k.startswith(f"{prefix}{name}.") for k in provided):
            last = m.body[-1]
            with torch.no_grad():
                last.weight.zero_()
                last.bias.zero_()
            zeroed.append(name)
    return zeroed


CELL = 16  # frame pixels per side of a cell of y


class CellAnalysis(nn.Module):
    """The linear path of g_a: each 16x16x3 cell of the frame -> M values of y (a 1x1 convolution on the cells;
    float32 even under autocast: bfloat16 would round y by more than the finest quantization step)."""

    def __init__(self, cfg: ElicConfig):
        super().__init__()
        self.proj = nn.Conv2d(3 * CELL * CELL, cfg.M, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.proj(F.pixel_unshuffle(x.float(), CELL))


class CellSynthesis(nn.Module):
    """The linear path of g_s: M values of ŷ -> the cell's 16x16x3 pixels, in the pixel latent's layout
    (``pixel_unshuffle`` by ``latent_factor``); float32 even under autocast."""

    def __init__(self, cfg: ElicConfig):
        super().__init__()
        self.factor = cfg.latent_factor
        self.proj = nn.Conv2d(cfg.M, 3 * CELL * CELL, 1)

    def forward(self, y_hat: torch.Tensor) -> torch.Tensor:
        with torch.autocast(y_hat.device.type, enabled=False):
            pixels = F.pixel_shuffle(self.proj(y_hat.float()), CELL)
            return F.pixel_unshuffle(pixels, self.factor) if self.factor > 1 else pixels


def analysis_transform(cfg: ElicConfig) -> nn.Sequential:
    """g_a: 4 strided 5x5 convolutions (1 -> 1/16) with residual bottlenecks between."""
    layers: list[nn.Module] = []
    cin = 3
    for stage in range(4):
        cout = cfg.M if stage == 3 else cfg.N
        layers.append(_conv(cin, cout, 5, 2))
        if stage < 3:
            layers += [ResidualBottleneck(cfg.N) for _ in range(cfg.res_blocks)]
        if cfg.attention and stage in (1, 3):
            layers.append(AttentionBlock(cout))
        cin = cout
    return nn.Sequential(*layers)


def analysis_halo(cfg: ElicConfig, stride: int = 16) -> int:
    """Cells of y around a crop that g_a needs to compute the crop's inner cells exactly as in the whole
    frame: its receptive field's reach in pixels (sum over the convolutions of (k - 1) / 2 times the
    stride so far), in cells of ``stride`` pixels, rounded up. Parallel branches (attention) are summed,
    so the bound is safe. The edge computes y on the cells that changed with it (``edge/change.py``)."""
    return -(-sum(reach for _, _, reach in analysis_stages(analysis_transform(cfg))) // stride)


def analysis_stages(g_a: nn.Sequential) -> list[tuple[nn.Sequential, int, int]]:
    """g_a cut before each strided convolution: ``(stage, stride, reach)`` per stage, where ``stride`` is
    the frame's pixels per output position (2, 4, 8, 16) and ``reach`` how many frame pixels on each side
    of an output position's own pixels its value depends on within the stage (its convolutions'
    (k - 1) / 2 times the stride of their input). An output changes only if an input within ``reach``
    changed, and a crop with ``reach`` around a rectangle gives the whole frame's values on it: the edge
    recomputes each stage only where its input changed (``edge/change.py``)."""
    cut: list[list[nn.Module]] = []
    for m in g_a:
        if not cut or (isinstance(m, nn.Conv2d) and m.stride[0] > 1):
            cut.append([])
        cut[-1].append(m)
    out, jump = [], 1
    for mods in cut:
        stage, reach = nn.Sequential(*mods), 0
        for m in stage.modules():
            if isinstance(m, nn.Conv2d):
                reach += (m.kernel_size[0] - 1) // 2 * m.dilation[0] * jump
                jump *= m.stride[0]
        out.append((stage, jump, reach))
    return out


def hyper_analysis(cfg: ElicConfig) -> nn.Sequential:
    """h_a: y (1/16) -> z (1/64)."""
    return nn.Sequential(_conv(cfg.M, cfg.N, 3), nn.ReLU(inplace=True), _conv(cfg.N, cfg.N, 5, 2),
                         nn.ReLU(inplace=True), _conv(cfg.N, cfg.Nz, 5, 2))


class FactorizedPrior(nn.Module):
    """Per-channel non-parametric density for z (Ballé et al. 2018, appendix 6.1)."""

    def __init__(self, channels: int, filters: tuple[int, ...] = (3, 3, 3), init_scale: float = 10.0):
        super().__init__()
        self.channels = channels
        f = (1,) + filters + (1,)
        scale = init_scale ** (1 / (len(filters) + 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(filters) + 1):
            init = math.log(math.expm1(1 / scale / f[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, f[i + 1], f[i]), init)))
            self.biases.append(nn.Parameter(torch.rand(channels, f[i + 1], 1) - 0.5))
            if i < len(filters):
                self.factors.append(nn.Parameter(torch.zeros(channels, f[i + 1], 1)))

    def _logits_cdf(self, v: torch.Tensor) -> torch.Tensor:
        # v: (C, 1, n)
        for i, (m, b) in enumerate(zip(self.matrices, self.biases)):
            v = torch.matmul(F.softplus(m), v) + b
            if i < len(self.factors):
                v = v + torch.tanh(self.factors[i]) * torch.tanh(v)
        return v

    def likelihood(self, z: torch.Tensor) -> torch.Tensor:
        """Probability mass of the unit bin around each (noisy or rounded) value of z: (B, C, H, W)."""
        b, c, h, w = z.shape
        v = z.permute(1, 0, 2, 3).reshape(c, 1, -1)
        lo = self._logits_cdf(v - 0.5)
        up = self._logits_cdf(v + 0.5)
        sign = -torch.sign(lo + up).detach()
        p = torch.abs(torch.sigmoid(sign * up) - torch.sigmoid(sign * lo))
        return p.reshape(c, b, h, w).permute(1, 0, 2, 3).clamp_min(1e-9)

    @torch.no_grad()
    def pmfs(self, radius: int = 64) -> tuple[torch.Tensor, int]:
        """pmf of each channel over the integers -radius..radius, and the tail mass: (C, 2r+2)."""
        v = torch.arange(-radius, radius + 1, dtype=torch.float32).view(1, 1, -1).expand(self.channels, 1, -1)
        lo = torch.sigmoid(self._logits_cdf(v - 0.5))
        up = torch.sigmoid(self._logits_cdf(v + 0.5))
        pmf = (up - lo).squeeze(1).clamp_min(0).double()
        tail = (1 - pmf.sum(dim=1, keepdim=True)).clamp_min(0)
        return torch.cat([pmf, tail], dim=1), radius


def crop_chain(steps: list[tuple[Callable, int, int]], x, keep: tuple[int, int, int, int]):
    """Run a chain of convolutional steps on a crop ``x`` (1, C, rows, cols) on the y grid (16 frame pixels
    a cell) and return its output on the cells ``keep`` (r0, r1, c0, c1) only, the same values as the whole
    crop's output there. ``steps``: (step, reach, stride): a step's output at a position depends on its
    input within ``reach`` frame pixels; ``stride``: frame pixels per position of its output. After each
    step, ``x`` is cut to what the later steps need for ``keep``. Tensors or numpy arrays."""
    rows, cols = x.shape[2] * 16, x.shape[3] * 16  # the crop, in frame pixels
    r0, r1, c0, c1 = (v * 16 for v in keep)
    if not (0 <= r0 < r1 <= rows and 0 <= c0 < c1 <= cols):
        raise ValueError(f"keep {keep} is not inside the crop's {x.shape[2]}x{x.shape[3]} cells")
    margins, total = [], 0  # frame pixels each step's output still has to reach beyond keep
    for _, reach, _ in reversed(steps):
        margins.append(total)
        total += reach
    y0, y1, x0, x1 = 0, rows, 0, cols  # what x covers now
    for (step, _, stride), margin in zip(steps, reversed(margins)):
        x = step(x)
        n0, n1 = max(0, (r0 - margin) // stride * stride), min(rows, -(-(r1 + margin) // stride) * stride)
        m0, m1 = max(0, (c0 - margin) // stride * stride), min(cols, -(-(c1 + margin) // stride) * stride)
        if (n0, n1, m0, m1) != (y0, y1, x0, x1):
            x = x[:, :, (n0 - y0) // stride: (n1 - y0) // stride, (m0 - x0) // stride: (m1 - x0) // stride]
            y0, y1, x0, x1 = n0, n1, m0, m1
    return x


class SynthesisToLatent(nn.Module):
    """g_s with the global-information network M (two transposed convs and a conv, paper eq. (2))."""

    def __init__(self, cfg: ElicConfig):
        super().__init__()
        g = cfg.gs_width
        self.global_net = nn.Sequential(
            nn.ConvTranspose2d(cfg.Nz, g // 2, 5, stride=2, padding=2, output_padding=1), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(g // 2, g // 2, 5, stride=2, padding=2, output_padding=1), nn.ReLU(inplace=True),
            _conv(g // 2, g // 2, 3),
        )
        self.head = _conv(cfg.M + 1 + g // 2, g, 3)
        self.trunk = nn.Sequential(*[ResBlock(g) for _ in range(cfg.gs_blocks)])
        # x2 stages from 1/16 to 1/latent_factor (cfg.synthesis_up_widths), then the tail blocks
        up: list[nn.Module] = []
        w = g
        for w_out in cfg.synthesis_up_widths:
            up += [_conv(w, 4 * w_out, 3), nn.PixelShuffle(2), nn.LeakyReLU(0.1, inplace=True), ResBlock(w_out)]
            w = w_out
        self.up = nn.Sequential(*up, *[ResBlock(w) for _ in range(cfg.gs_tail_blocks)])
        self.out = _conv(w, cfg.latent_channels, 3)
        self.linear = CellSynthesis(cfg) if cfg.linear_path else None

    def forward(self, y_hat: torch.Tensor, mask: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
        return self.from_global(y_hat, mask, self.global_features(z_hat))

    def global_features(self, z_hat: torch.Tensor) -> torch.Tensor:
        """M(ẑ): the global information on the y grid (1/16). A temporal stream's ẑ is its keyframe's, so
        the cloud computes this once per keyframe and crops it with ŷ (``models/temporal.py``)."""
        return self.global_net(z_hat)

    def from_global(self, y_hat: torch.Tensor, mask: torch.Tensor, gz: torch.Tensor,
                    keep: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """The rest of g_s, on any crop of the y grid: ŷ, the mask and M(ẑ) -> the target latent.

        ``keep``: cells (r0, r1, c0, c1) of the crop whose output is all that is wanted; the result is then
        the latent of those cells only, the same values as the whole crop's output there, for less work:
        after each layer the tensor is cut to what the remaining layers need for ``keep`` (a layer at
        1/s needs its input within its reach), so the layers at 1/8 and 1/4 skip most of the margin."""
        x = self.inputs(y_hat, mask, gz)
        if keep is None:
            out = self.out(self.up(self.trunk(F.leaky_relu(self.head(x), 0.1))))
        else:
            out = crop_chain([(layer, reach * stride, stride) for layer, reach, stride in self.layers()], x, keep)
        return self.add_linear(out, y_hat, keep)

    def add_linear(self, out: torch.Tensor, y_hat: torch.Tensor,
                   keep: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """``out`` (the chain's output on the cells ``keep`` of the crop, or on all of it) plus the linear
        path's, which is per cell (the kept cells' own ŷ), in float32; ``out`` itself without a linear path.
        Every runtime of g_s ends with this (``models/synthesis_runtime.py``)."""
        if self.linear is None:
            return out
        if keep is not None:
            r0, r1, c0, c1 = keep
            y_hat = y_hat[:, :, r0:r1, c0:c1]
        return out.float() + self.linear(y_hat)

    @staticmethod
    def inputs(y_hat: torch.Tensor, mask: torch.Tensor, gz: torch.Tensor) -> torch.Tensor:
        """What :meth:`layers` start from: ŷ, the mask and M(ẑ) concatenated on the channels."""
        return torch.cat([y_hat, mask.to(y_hat.dtype), gz.to(y_hat.dtype)], dim=1)

    def layers(self) -> list[tuple[nn.Module, int, int]]:
        """What follows the concatenation in :meth:`from_global`, as a chain: (layer, reach in its own
        pixels, frame pixels per pixel of its output)."""
        out: list[tuple[nn.Module, int, int]] = [(self.head, 1, 16), (nn.LeakyReLU(0.1), 0, 16)]
        out += [(b, 2, 16) for b in self.trunk]
        stride = 16
        for m in self.up:
            if isinstance(m, nn.PixelShuffle):
                stride //= m.upscale_factor
            reach = 2 if isinstance(m, ResBlock) else (m.kernel_size[0] // 2 if isinstance(m, nn.Conv2d) else 0)
            out.append((m, reach, stride))
        out.append((self.out, self.out.kernel_size[0] // 2, stride))
        return out


StepFn = Callable[[int, bool, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ElicCodec(nn.Module):
    """The whole codec. Training: :meth:`forward`. Inference: :meth:`entropy_params_loop` with
    exact integer networks, driven by the encoder or the decoder (``latentcast.models.codec``)."""

    def __init__(self, cfg: ElicConfig):
        super().__init__()
        self.cfg = cfg
        self.g_a = analysis_transform(cfg)
        self.a_lin = CellAnalysis(cfg) if cfg.linear_path else None
        self.h_a = hyper_analysis(cfg)
        # one factorized prior per rate point: z is quantized with step Δz_q = sqrt(Δ_q)
        self.prior_z = nn.ModuleList([FactorizedPrior(cfg.Nz) for _ in cfg.rate_steps])
        a = ACT_SCALE
        self.h_s = QSequential([
            QConv(cfg.Nz, cfg.Nh, 3, in_scale=1.0, in_zero=128, out_scale=a, relu=True),
            QConv(cfg.Nh, cfg.Nh, 3, in_scale=a, in_zero=0, out_scale=a, relu=True, upsample=2),
            QConv(cfg.Nh, cfg.Nh, 3, in_scale=a, in_zero=0, out_scale=a, relu=True, upsample=2),
            QConv(cfg.Nh, cfg.Nh, 1, in_scale=a, in_zero=0, out_scale=a, relu=True),
        ])
        yin = 1.0 / Y_IN_RES
        self.ch_ctx = nn.ModuleList()
        self.sp_ctx = nn.ModuleList()
        self.ep = nn.ModuleList()
        for k, c in enumerate(cfg.groups):
            if k > 0:
                prev = sum(cfg.groups[:k])
                self.ch_ctx.append(QSequential([
                    QConv(prev, cfg.ctx, 3, in_scale=yin, in_zero=128, out_scale=a, relu=True),
                    QConv(cfg.ctx, cfg.ctx, 3, in_scale=a, in_zero=0, out_scale=a, relu=True),
                ]))
            self.sp_ctx.append(QSequential([
                QConv(c, cfg.ctx, 5, in_scale=yin, in_zero=128, out_scale=a, relu=True),
                QConv(cfg.ctx, cfg.ctx, 1, in_scale=a, in_zero=0, out_scale=a, relu=True),
            ]))
            n_in = cfg.Nh + cfg.ctx * (2 if k > 0 else 1)
            head = QConv(cfg.ep, 2 * c, 1, in_scale=a, in_zero=0,
                         out_scale=[1.0 / MEAN_RES] * c + [1.0] * c, relu=False)
            with torch.no_grad():  # start scale indices mid-table
                head.conv.bias[c:] += cfg.n_scales / 2
            self.ep.append(QSequential([
                QConv(n_in, cfg.ep, 1, in_scale=a, in_zero=0, out_scale=a, relu=True),
                QConv(cfg.ep, cfg.ep, 1, in_scale=a, in_zero=0, out_scale=a, relu=True),
                head,
            ]))
        self.g_s = SynthesisToLatent(cfg)
        n = len(cfg.rate_steps)
        # gain units (Cui et al., "Asymmetric Gained Deep Image Compression", CVPR 2021), in the form of
        # this codec's tables: each rate point learns a per-channel offset j_q,c in table steps (real while
        # training, rounded through the straight-through estimator), so a coarse rate point can drop a
        # channel a fine one keeps. The released file holds the integers in rate_k / rate_delta (n, M).
        self.rate_gain = nn.Parameter(torch.zeros(n, cfg.M)) if cfg.channel_gains else None
        shape = (n, cfg.M) if cfg.channel_gains else (n,)
        self.register_buffer("rate_k", torch.zeros(shape, dtype=torch.int64))
        self.register_buffer("rate_delta", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("rate_zdelta", torch.zeros(n, dtype=torch.float64))
        self.reset_rate_points()

    def reset_rate_points(self) -> None:
        """Set the table offsets k_q and steps Δ_q, Δz_q from the configuration.

        Δ_q is dyadic (8 fractional bits) so that μ + Δ s is exact in float64; all three are stored
        in the weight file and never recomputed there (exp() is not bit-identical across libms).
        With channel gains, each channel's offset adds the learned gain rounded to an integer."""
        ks = torch.tensor(self.cfg.rate_steps, dtype=torch.float64)
        self.rate_zdelta.copy_(torch.round(torch.exp(ks * self.cfg.log_step / 2) * 256) / 256)
        if self.rate_gain is not None:
            ks = ks[:, None] + torch.round(self.rate_gain.detach().double())
        self.rate_k.copy_(ks.to(torch.int64))
        self.rate_delta.copy_(torch.round(torch.exp(ks * self.cfg.log_step) * 256) / 256)

    def select_rate_points(self, keep: list[int]) -> None:
        """Keep only the rate points ``keep`` (ascending indices into the trained ones), e.g. to
        ship a subset of what was trained; their steps, table offsets and z priors move along."""
        n = self.n_rates
        if not keep or sorted(set(keep)) != list(keep) or not all(isinstance(q, int) and 0 <= q < n for q in keep):
            raise ValueError(f"rate points {keep!r} must be ascending distinct indices in 0..{n - 1}")
        import dataclasses

        self.cfg = dataclasses.replace(self.cfg, rate_steps=tuple(self.cfg.rate_steps[q] for q in keep))
        self.prior_z = nn.ModuleList([self.prior_z[q] for q in keep])
        idx = torch.tensor(keep)
        for name in ("rate_k", "rate_delta", "rate_zdelta"):
            setattr(self, name, getattr(self, name)[idx].clone())  # registered buffers: replaced in place
        if self.rate_gain is not None:
            self.rate_gain = nn.Parameter(self.rate_gain.detach()[idx].clone())

    # ------------------------------------------------------------------ shared pieces
    @property
    def n_rates(self) -> int:
        return len(self.cfg.rate_steps)

    def group_slices(self) -> list[slice]:
        out, s = [], 0
        for c in self.cfg.groups:
            out.append(slice(s, s + c))
            s += c
        return out

    def scales(self) -> torch.Tensor:
        c = self.cfg
        return c.scale_min * torch.exp(torch.arange(c.n_scales, dtype=torch.float64) * c.log_step)

    def hyper_features(self, z_hat: torch.Tensor, *, exact: bool) -> torch.Tensor:
        return self.h_s(quantize_input(z_hat, 1.0, exact=exact), exact=exact)

    def entropy_params_loop(self, H: torch.Tensor, step: StepFn, *, exact: bool) -> torch.Tensor:
        """Run the 2 x len(groups) context steps; ``step`` turns parameters into ŷ for one step.

        ``step(k, is_anchor, cells, mu, idx_raw)`` gets the group index, whether this is the
        anchor step, the (1,1,h,w) bool mask of the checkerboard cells of this step, and the
        means (real) and raw scale indices of group ``k`` at all cells; it returns ŷ of group
        ``k`` at all cells (values off ``cells`` are ignored). Returns the full ŷ.
        """
        b, _, h, w = H.shape
        dev = H.device
        r = torch.arange(h, device=dev).view(-1, 1)
        cc = torch.arange(w, device=dev).view(1, -1)
        anchor = ((r + cc) % 2 == 0).view(1, 1, h, w)
        dtype = torch.float64 if exact else H.dtype
        y_parts: list[torch.Tensor] = []
        codes_prev: list[torch.Tensor] = []
        for k, c in enumerate(self.cfg.groups):
            ctx = [H]
            if k > 0:
                ctx.append(self.ch_ctx[k - 1](torch.cat(codes_prev, dim=1), exact=exact))
            zeros = torch.full((b, c, h, w), 128.0, dtype=dtype, device=dev)
            sp = self.sp_ctx[k](zeros, exact=exact)
            out = self.ep[k](torch.cat(ctx + [sp], dim=1), exact=exact)
            mu, idx = out[:, :c] / MEAN_RES, out[:, c:]
            y_a = step(k, True, anchor, mu, idx)
            codes_a = torch.where(anchor, quantize_input(y_a, Y_IN_RES, exact=exact), zeros)
            sp = self.sp_ctx[k](codes_a, exact=exact)
            out = self.ep[k](torch.cat(ctx + [sp], dim=1), exact=exact)
            mu, idx = out[:, :c] / MEAN_RES, out[:, c:]
            y_n = step(k, False, ~anchor, mu, idx)
            y_k = torch.where(anchor, y_a, y_n)
            y_parts.append(y_k)
            codes_prev.append(quantize_input(y_k, Y_IN_RES, exact=exact))
        return torch.cat(y_parts, dim=1)

    def per_rate(self, table: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
        """A rate-point table (``rate_k`` or ``rate_delta``: (n,) or (n, M) with channel gains) at ``rate``:
        (B,) long, one rate point per image, gives (B,1|M,1,1); (B,1,h,w), one per latent cell (a
        background coded coarser than the ROIs), gives (B,1|M,h,w)."""
        v = table[rate]
        if rate.dim() == 1:
            return v.view(rate.shape[0], -1, 1, 1)
        return v if table.dim() == 1 else v[:, 0].movedim(-1, 1)

    def table_index(self, idx_raw: torch.Tensor, rate: torch.Tensor, channels: slice = slice(None)) -> torch.Tensor:
        """Exact integer table index: clip(idx_raw - k_q, 0, L-1) of the channels ``channels`` (a group's
        slice: ``idx_raw`` holds those channels only); ``rate`` as in :meth:`per_rate`."""
        k = channel_slice(self.per_rate(self.rate_k, rate), channels).to(idx_raw.dtype)
        return torch.clamp(idx_raw - k, 0, self.cfg.n_scales - 1)

    # ------------------------------------------------------------------ training
    def analyze(self, x: torch.Tensor, *, bf16: bool = False) -> torch.Tensor:
        """y of ``x`` in [0,1] (B,3,H,W), H and W multiples of 16: g_a (under bfloat16 autocast with ``bf16``),
        plus the linear path when the configuration has one; float32."""
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            y = self.g_a(x).float()
        return y if self.a_lin is None else y + self.a_lin(x)

    def forward(self, x: torch.Tensor, *, rate: torch.Tensor, mask: torch.Tensor | None = None,
                bf16: bool = False, rdoq: float = 0.0) -> dict:
        """Training pass. ``x`` in [0,1] (B,3,H,W) with H, W multiples of 64; ``rate`` (B,) rate-point
        indices; ``mask`` (B,1,H/16,W/16) in {0,1}: 1 where y is transmitted (None: everywhere);
        ``bf16``: run g_a and g_s under bfloat16 autocast (the CPU's AVX-512 BF16; the entropy model,
        the rates and every parameter stay float32); ``rdoq``: λ of the encoder's rate-distortion optimized
        quantization (``proto.symbols.quantize_y``, here with the Gaussian's bits; 0: plain rounding).

        Returns ``latent`` (ẑ_c), ``bits_y`` and ``bits_z`` per image (B,)."""
        y = self.analyze(x, bf16=bf16)
        z = self.h_a(y)
        dz = self.rate_zdelta[rate].view(-1, 1, 1, 1).to(z.dtype)
        zs_hat = round_ste(z / dz)  # the z symbols (straight-through), coded with the factorized prior
        z_hat = dz * zs_hat
        bits_z = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
        for q in torch.unique(rate).tolist():
            sel = rate == q
            bz = -torch.log2(self.prior_z[q].likelihood(zs_hat[sel])).sum(dim=(1, 2, 3))
            bits_z = bits_z.index_put((sel.nonzero()[:, 0],), bz)
        H = self.hyper_features(z_hat, exact=False)
        if mask is None:
            mask = torch.ones_like(y[:, :1])
        slices = self.group_slices()
        bits = torch.zeros(y.shape[0], device=y.device, dtype=y.dtype)
        log_step, smin = self.cfg.log_step, self.cfg.scale_min
        if self.rate_gain is None:
            delta_all = self.per_rate(self.rate_delta, rate).to(y.dtype)
            k_all = self.per_rate(self.rate_k, rate).to(y.dtype)
        else:  # the learned offsets, rounded straight-through: training sees the released file's steps
            k_all = (torch.tensor(self.cfg.rate_steps, dtype=y.dtype, device=y.device)[rate][:, None]
                     + round_ste(self.rate_gain[rate])).view(*self.rate_gain[rate].shape, 1, 1)
            delta_all = torch.exp(k_all * log_step)

        def step(k, _is_anchor, pos, mu, idx_raw):
            nonlocal bits
            yk = y[:, slices[k]]
            delta = channel_slice(delta_all, slices[k])
            lvl = torch.clamp(idx_raw - channel_slice(k_all, slices[k]), 0, self.cfg.n_scales - 1)
            # table lvl is the zero-mean Gaussian of std scales[lvl] over the *symbols* (y - μ)/Δ_q: the
            # offset k_q in lvl already divides σ_y by Δ_q (differentiable through the STE)
            s = smin * torch.exp(lvl * log_step)
            # rate and distortion both see the rounded (with ``rdoq``: the encoder's chosen) symbol, straight
            # through: the rate is the ideal code length of the real symbol under the real table. (The
            # additive-noise proxy charged 2-5x the real bits here, mostly for symbols that round to 0 at small
            # scales.)
            r = (yk - mu) / delta
            v_hat = round_ste(r) if rdoq == 0 else r + (rdoq_symbols(r.detach(), s.detach(), rdoq) - r).detach()
            bk = gauss_bits(v_hat, s)
            bits = bits + (bk * (pos & (mask > 0.5))).sum(dim=(1, 2, 3))
            y_hat = mu + delta * v_hat
            return torch.where(mask > 0.5, y_hat, mu)

        y_hat = self.entropy_params_loop(H, step, exact=False)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            latent = self.g_s(y_hat, mask, z_hat).float()
        return {"latent": latent, "bits_y": bits, "bits_z": bits_z}


def channel_slice(t: torch.Tensor, channels: slice) -> torch.Tensor:
    """``t[:, channels]`` for a per-channel tensor (B,M,...); a per-image one (B,1,...) as it is."""
    return t if t.shape[1] == 1 else t[:, channels]


def _gauss_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.erfc(-x / math.sqrt(2))


def gauss_bits(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Ideal code length in bits of the integer symbols ``v`` under a zero-mean Gaussian of std ``s`` over the
    unit bins (the training rate of y)."""
    p = _gauss_cdf((v + 0.5) / s) - _gauss_cdf((v - 0.5) / s)
    return -torch.log2(p.clamp_min(1e-9))


def rdoq_symbols(r: torch.Tensor, s: torch.Tensor, lam: float) -> torch.Tensor:
    """The encoder's rate-distortion optimized choice (``proto.symbols.quantize_y``) with the Gaussian's bits in
    place of the shipped tables' code lengths: of floor(r) and floor(r) + 1, the one with the smaller squared
    error + ``lam`` · bits (ties to the upper one, as there)."""
    lo = torch.floor(r)
    hi = lo + 1
    up = (hi - r) ** 2 + lam * gauss_bits(hi, s) <= (r - lo) ** 2 + lam * gauss_bits(lo, s)
    return torch.where(up, hi, lo)
