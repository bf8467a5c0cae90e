"""Experiment (issue 14): does an overlapping (lapped) linear synthesis lift elic-lite-v3's low rates?

Why: v3's linear path maps each cell's ŷ to its own 16x16 pixels. At the lowest rate points most coefficients
round to zero and the render shows 16x16 blocks; g_s, which sees the neighbours, has not learned to hide them
in 12,000 steps. A lapped synthesis lets each cell's coefficients reach 8 pixels into the neighbouring cells
(a transposed convolution, kernel 32, stride 16, padding 8), so the linear part can learn smooth, overlapping
basis functions, as lapped transforms do in classical coding::

    ŷ ──g_s (as trained)──────────────────────────────────────────┐
    ├──1x1 S (as trained) ─► shuffle 16 ─────────────────────────+──► pixels ─► unshuffle 4 ─► ẑ_c
    └──(lapped arm) ConvTranspose 32/16/8, starts at 0 ──────────┘

Decoder only: the encoder, entropy model and rates stay fixed (ŷ is computed without gradients), so both arms
spend the same bits and the PSNR difference per rate point is the lever's whole effect. Both arms train g_s and
S from the same start with the same crops, rates, λ weights and Adam settings; the lapped arm adds the
overlapping term. Kodak is scored with the training forward (ŷ rounded, ideal code lengths). Usage:

    python tools/experiments/lapped_synthesis.py --start <last.pt> --arm control --steps 1500 --out DIR
    python tools/experiments/lapped_synthesis.py --start <last.pt> --arm lapped --steps 1500 --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from latentcast.models.elic import CELL, ElicCodec, ElicConfig
from latentcast.models.latent_spaces import load_latent_space
from latentcast.models.training import RandomCrops, _read_rgb, default_cache_dir
from latentcast.shared import shared_path


class LappedLinear(nn.Module):
    """S·ŷ per cell plus a zero-initialised transposed convolution reaching half a cell into each neighbour."""

    def __init__(self, linear: nn.Module, M: int):
        super().__init__()
        self.linear = linear
        self.overlap = nn.ConvTranspose2d(M, 3, 2 * CELL, stride=CELL, padding=CELL // 2, bias=False)
        nn.init.zeros_(self.overlap.weight)

    def forward(self, y_hat: torch.Tensor) -> torch.Tensor:
        with torch.autocast(y_hat.device.type, enabled=False):
            extra = F.pixel_unshuffle(self.overlap(y_hat.float()), self.linear.factor)
            return self.linear(y_hat) + extra


class Capture(nn.Module):
    """Stands in for g_s in the codec's forward: keeps its inputs and returns a dummy latent."""

    def __init__(self, channels: int, factor: int):
        super().__init__()
        self.channels, self.factor = channels, factor
        self.args: tuple = ()

    def forward(self, y_hat, mask, z_hat):
        self.args = (y_hat, mask, z_hat)
        b, _, h, w = y_hat.shape
        f = CELL // self.factor
        return y_hat.new_zeros(b, self.channels, h * f, w * f)


def decoder_inputs(model: ElicCodec, g_s: nn.Module, x: torch.Tensor, rate: torch.Tensor) -> tuple[tuple, torch.Tensor]:
    """(ŷ, mask, ẑ) of ``x`` from the fixed encoder, and the bits per image."""
    cap = Capture(model.cfg.latent_channels, model.cfg.latent_factor)
    model.g_s = cap
    try:
        with torch.no_grad():
            res = model(x, rate=rate, bf16=True)
    finally:
        model.g_s = g_s
    return cap.args, (res["bits_y"] + res["bits_z"]) / (x.shape[2] * x.shape[3])


def evaluate(model: ElicCodec, kodak: list[tuple[list, list]]) -> dict:
    """Kodak bpp and PSNR per rate point from the cached decoder inputs."""
    out = {"bpp": [], "psnr": []}
    with torch.no_grad():
        for q in range(model.n_rates):
            b, p = [], []
            for x, per_rate in kodak:
                args, bpp = per_rate[q]
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    lat = model.g_s(*args).float()
                rec = F.pixel_shuffle(lat, model.cfg.latent_factor).clamp(0, 1)
                b.append(float(bpp))
                p.append(10 * math.log10(1.0 / ((torch.round(rec * 255) / 255 - x) ** 2).mean().item()))
            out["bpp"].append(round(float(np.mean(b)), 4))
            out["psnr"].append(round(float(np.mean(p)), 3))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--start", required=True, help="a `latentcast train codec` checkpoint (last.pt) with linear_path")
    ap.add_argument("--arm", choices=("control", "lapped"), required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=200, help="steps of linear lr warm-up (a fresh Adam's first "
                    "steps move every weight by about lr and cost both arms ~1 dB)")
    ap.add_argument("--kodak", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    state = torch.load(a.start, map_location="cpu", weights_only=False)
    cfg = ElicConfig.from_dict(state["codec"])
    if not cfg.linear_path:
        raise SystemExit(f"{a.start}: the codec has no linear path")
    model = ElicCodec(cfg)
    model.load_state_dict(state["model"])
    model.eval()
    if a.arm == "lapped":
        model.g_s.linear = LappedLinear(model.g_s.linear, cfg.M)
    g_s = model.g_s
    for p in model.parameters():
        p.requires_grad_(False)
    for p in g_s.parameters():
        p.requires_grad_(True)
    space = load_latent_space("pixels:4")
    rng = np.random.default_rng(1)
    crops = RandomCrops(default_cache_dir() / "train-images", 192, cfg.latent_factor, rng, space)
    kodak = []
    for path in sorted(shared_path("data", "images", "kodak").glob("*.png"))[: a.kodak]:
        x = torch.from_numpy(_read_rgb(path, None)).permute(2, 0, 1)[None].float() / 255
        kodak.append((x, [decoder_inputs(model, g_s, x, torch.tensor([q])) for q in range(model.n_rates)]))
    steps = torch.tensor([math.exp(k * cfg.log_step) for k in cfg.rate_steps])
    lam = state["train"]["lam"] / steps**2 / crops.latent_var
    opt = torch.optim.Adam([p for p in g_s.parameters() if p.requires_grad], lr=a.lr)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = {"args": vars(a), "start_step": state["step"], "curve": [{"step": 0, "sec": 0.0, **evaluate(model, kodak)}]}
    print(a.arm, log["curve"][-1], flush=True)
    t0 = time.time()
    for step in range(1, a.steps + 1):
        x, target = crops.batch(8)
        rate = torch.from_numpy(rng.integers(0, model.n_rates, 8))
        args, _ = decoder_inputs(model, g_s, x, rate)
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, step / max(a.warmup, 1))
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lat = g_s(*args).float()
        loss = (lam[rate] * ((lat - target) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(g_s.parameters(), 1.0)
        opt.step()
        if step % a.eval_every == 0 or step == a.steps:
            model.eval()
            log["curve"].append({"step": step, "sec": round(time.time() - t0, 1), **evaluate(model, kodak)})
            print(a.arm, log["curve"][-1], flush=True)
            (out / f"{a.arm}.json").write_text(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
