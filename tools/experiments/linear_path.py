"""Experiment (issue 14): does a PCA-initialised linear path let elic-lite learn past its ~28 dB ceiling?

Why: trained for 10 h, elic-lite-v2's transform pair reconstructs Kodak at 28.2 dB even unquantized, what a
block PCA keeping 48 of a 16x16 cell's 768 values gives (160 coefficients give 35.5 dB). Trained as a plain
autoencoder (no quantization, no rate) it gains 0.2 dB per 400 steps at lr 1e-4 and diverges at 1e-3: the
capacity is there, the optimisation reaches it slowly. A linear path that starts at the PCA solution gives the
codec the high-rate ceiling from step 0, and the nonlinear transforms learn the rest::

    x ──g_a (ELIC-lite, fresh)─────────────┐
    └──unshuffle 16 ─► 1x1: α Vᵀ (x - m) ──+──► y ──► hyperprior, contexts, ŷ (as elic.py)
                                               │
    ŷ ──g_s (ELIC-lite, fresh, last conv 0)──┐ │
    └──1x1: V/α ─► shuffle 16 ─► + m ─► unshuffle 4 ──+──► ẑ_c (pixels:4)

V: the first M principal components of 16x16x3 cells of the training images (pixel_unshuffle order), m their
mean, α a fixed scale (the step of rate point 3 is 1/α in PCA units). Both arms train the same fresh codec
(seed 0, same crops, rates, steps, λ, Adam lr, clipping, bf16 transforms); the control has no linear path.
Evaluated on the first Kodak images with the training forward (ŷ rounded, ideal code lengths of the training
entropy model), so the two arms are measured alike. Usage:

    python tools/experiments/linear_path.py --arm pca --steps 6000 --threads 1 --out results/linear_path
    python tools/experiments/linear_path.py --arm control --steps 6000 --threads 1 --out results/linear_path
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

from latentcast.models.elic import CONFIGS, ElicCodec
from latentcast.models.latent_spaces import load_latent_space
from latentcast.models.training import RandomCrops, _read_rgb, cell_components, default_cache_dir
from latentcast.shared import shared_path

CELL = 16


class LinearAnalysis(nn.Module):
    def __init__(self, V: torch.Tensor, mean: torch.Tensor, alpha: float):
        super().__init__()
        M = V.shape[1]
        self.proj = nn.Conv2d(V.shape[0], M, 1)
        with torch.no_grad():
            self.proj.weight.copy_((alpha * V.T)[:, :, None, None])
            self.proj.bias.copy_(-alpha * V.T @ mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):  # float32: bf16 would round y by more than the finest step
            return self.proj(F.pixel_unshuffle(x.float(), CELL))


class LinearSynthesis(nn.Module):
    def __init__(self, V: torch.Tensor, mean: torch.Tensor, alpha: float):
        super().__init__()
        self.proj = nn.Conv2d(V.shape[1], V.shape[0], 1)
        with torch.no_grad():
            self.proj.weight.copy_((V / alpha)[:, :, None, None])
            self.proj.bias.copy_(mean)

    def forward(self, y_hat: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            return F.pixel_unshuffle(F.pixel_shuffle(self.proj(y_hat.float()), CELL), 4)


class WithLinear(nn.Module):
    """Wraps a module computing ``f(*args)`` as ``f(*args) + lin(args[0])``."""

    def __init__(self, f: nn.Module, lin: nn.Module):
        super().__init__()
        self.f, self.lin = f, lin

    def forward(self, x, *rest):
        return self.f(x, *rest).float() + self.lin(x)


def pca(crops: RandomCrops, M: int, n_batches: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    V, mean, _ = cell_components(crops, M, batches=n_batches)
    return V.float(), mean.float()


@torch.no_grad()
def evaluate(model: ElicCodec, kodak: list[torch.Tensor]) -> dict:
    out = {"bpp": [], "psnr": []}
    for q in range(model.n_rates):
        b, p = [], []
        for x in kodak:
            res = model(x, rate=torch.tensor([q]))
            b.append(((res["bits_y"] + res["bits_z"]) / (x.shape[2] * x.shape[3])).item())
            rec = F.pixel_shuffle(res["latent"], 4).clamp(0, 1)
            p.append(10 * math.log10(1.0 / ((torch.round(rec * 255) / 255 - x) ** 2).mean().item()))
        out["bpp"].append(round(float(np.mean(b)), 4))
        out["psnr"].append(round(float(np.mean(p)), 3))
    return out


def to_checkpoint(src: Path, curve: Path, dst: Path, latent_var: float) -> None:
    """The pca arm's model as a checkpoint of the product's trainer (``ElicConfig.linear_path``: the same
    modules, named ``g_a``/``a_lin`` and ``g_s``/``g_s.linear``)."""
    import dataclasses

    from latentcast.models.training import TrainConfig, save_checkpoint

    state = torch.load(src)
    rename = {"g_a.f.": "g_a.", "g_a.lin.": "a_lin.", "g_s.f.": "g_s.", "g_s.lin.": "g_s.linear."}
    sd = {}
    for k, v in state.get("model", state).items():
        for old, new in rename.items():
            if k.startswith(old):
                k = new + k[len(old):]
                break
        sd[k] = v
    cfg = dataclasses.replace(CONFIGS["lite"], linear_path=True)
    ElicCodec(cfg).load_state_dict(sd)  # every tensor has its place
    step = json.loads(curve.read_text())["curve"][-1]["step"]
    train = dataclasses.asdict(TrainConfig(overrides={"linear_path": True}))
    save_checkpoint(dst, {"model": sd, "step": step, "stage": 1, "train": train, "codec": cfg.to_dict(),
                          "latent_var": latent_var})
    print("wrote", dst, "at step", step, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arm", choices=("pca", "control"), required=True)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lam", type=float, default=64.0)
    ap.add_argument("--alpha", type=float, default=8.0, help="PCA coefficients per unit of y")
    ap.add_argument("--kodak", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/linear_path")
    ap.add_argument("--resume", action="store_true", help="continue from <out>/<arm>.pt")
    ap.add_argument("--init", default="", help="start from a saved model (<out>/<arm>.safetensors) when there is "
                    "no <out>/<arm>.pt to resume (Adam starts again)")
    ap.add_argument("--save", default="", help="only write the model of <out>/<arm>.pt to this .safetensors file")
    ap.add_argument("--to-checkpoint", default="", help="only write <out>/pca.pt as a `latentcast train codec` "
                    "checkpoint (ElicConfig.linear_path) for `latentcast release codec`")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    space = load_latent_space("pixels:4")
    crops = RandomCrops(default_cache_dir() / "train-images", 192, 4, rng, space)
    cfg = CONFIGS["lite"]
    model = ElicCodec(cfg)
    if a.arm == "pca":
        V, mean = pca(crops, cfg.M)
        model.g_a = WithLinear(model.g_a, LinearAnalysis(V, mean, a.alpha))
        model.g_s = WithLinear(model.g_s, LinearSynthesis(V, mean, a.alpha))
        with torch.no_grad():  # the nonlinear parts start silent: step 0 is the PCA codec
            model.g_a.f[-1].weight.zero_()
            model.g_a.f[-1].bias.zero_()
            model.g_s.f.out.weight.zero_()
            model.g_s.f.out.bias.zero_()
    rng = np.random.default_rng(1)  # both arms draw the same crops and rates from here on
    crops.rng = rng
    kodak_paths = sorted(shared_path("data", "images", "kodak").glob("*.png"))[: a.kodak]
    kodak = [torch.from_numpy(_read_rgb(p, None)).permute(2, 0, 1)[None].float() / 255 for p in kodak_paths]
    steps = torch.tensor([math.exp(k * cfg.log_step) for k in cfg.rate_steps])
    lam = a.lam / steps**2 / crops.latent_var
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    start, sec0 = 0, 0.0
    if a.to_checkpoint:
        to_checkpoint(out / "pca.pt", out / "pca.json", Path(a.to_checkpoint), crops.latent_var)
        return
    if a.save:
        from safetensors.torch import save_file

        state = torch.load(out / f"{a.arm}.pt")
        save_file({k: v.contiguous() for k, v in state["model"].items()}, a.save,
                  metadata={"step": str(json.loads((out / f"{a.arm}.json").read_text())["curve"][-1]["step"])})
        return
    if a.init and not (out / f"{a.arm}.pt").is_file():
        from safetensors import safe_open
        from safetensors.torch import load_file

        model.load_state_dict(load_file(a.init))
        with safe_open(a.init, "pt") as fh:
            start = int(fh.metadata()["step"])
        log = json.loads((out / f"{a.arm}.json").read_text())
        log["curve"] = [c for c in log["curve"] if c["step"] <= start]
        sec0 = log["curve"][-1]["sec"]
        rng = crops.rng = np.random.default_rng(1 + start)
        print(a.arm, "started from", a.init, "at step", start, flush=True)
    elif a.resume and (out / f"{a.arm}.pt").is_file():
        state = torch.load(out / f"{a.arm}.pt")
        model.load_state_dict(state.get("model", state))
        if "opt" in state:
            opt.load_state_dict(state["opt"])
        log = json.loads((out / f"{a.arm}.json").read_text())
        start, sec0 = log["curve"][-1]["step"], log["curve"][-1]["sec"]
        rng = crops.rng = np.random.default_rng(1 + start)
        print(a.arm, "resumed at step", start, flush=True)
    else:
        log = {"args": vars(a), "curve": [{"step": 0, "sec": 0.0, **evaluate(model, kodak)}]}
        print(a.arm, log["curve"][-1], flush=True)
    t0 = time.time() - sec0
    for step in range(start + 1, a.steps + 1):
        x, target = crops.batch(8)
        rate = torch.from_numpy(rng.integers(0, model.n_rates, 8))
        res = model(x, rate=rate, bf16=True)
        bpp = (res["bits_y"] + res["bits_z"]) / (x.shape[2] * x.shape[3])
        mse = ((res["latent"] - target) ** 2).mean(dim=(1, 2, 3))
        loss = (bpp + lam[rate] * mse).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % a.eval_every == 0 or step == a.steps:
            log["curve"].append({"step": step, "sec": round(time.time() - t0, 1), **evaluate(model, kodak)})
            print(a.arm, log["curve"][-1], flush=True)
            (out / f"{a.arm}.json").write_text(json.dumps(log, indent=1))
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, out / f"{a.arm}.pt")


if __name__ == "__main__":
    main()
