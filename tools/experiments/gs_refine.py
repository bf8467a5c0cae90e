"""Experiment (issue 14): is the synthesis transform what limits elic-lite's quality?

Both arms start from the same released codec and train on the same crops for the same steps with g_a,
the hyperprior and the entropy networks frozen (the packets do not change; only the cloud's decoder does):

    control : g_s fine-tuned as it is (1/16 -> 1/4, 48 channels = 4x4x3 pixels per cell, linear output)
    refine  : g_s + a residual refinement at 1/2 resolution (features at 1/4 -> x2, with the coarse
              frame, two ResBlocks, a zero-initialised 12-channel output -> x2 = an RGB residual)

ŷ and ẑ are the exact decoder inputs (``LatentCodec.encode_symbols_y_hat``), computed once per image
and rate point. Kodak is only evaluated. Usage:

    python tools/experiments/gs_refine.py models/weights/elic-lite-v2.safetensors --steps 1500 --threads 1 \
        --out results/gs_refine
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from latentcast.models.codec import LatentCodec
from latentcast.models.elic import ResBlock
from latentcast.models.synthesis_training import _fit64, decoder_inputs
from latentcast.models.training import _read_rgb, default_cache_dir, training_sources
from latentcast.shared import shared_path

RATES = (1, 2, 3)


def _conv(a, b, k=3):
    return nn.Conv2d(a, b, k, padding=k // 2)


class Refine(nn.Module):
    def __init__(self, feat: int = 64, width: int = 32):
        super().__init__()
        self.up = nn.Sequential(_conv(feat, 4 * width), nn.PixelShuffle(2), nn.LeakyReLU(0.1))
        self.inp = _conv(12 + width, width)
        self.body = nn.Sequential(ResBlock(width), ResBlock(width))
        self.out = _conv(width, 12)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, feat: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        h = self.inp(torch.cat([self.up(feat), F.pixel_unshuffle(coarse, 2)], 1))
        return coarse + F.pixel_shuffle(self.out(self.body(F.leaky_relu(h, 0.1))), 2)


class Decoder(nn.Module):
    """g_s (a copy) and optionally the refinement: (ŷ, mask, ẑ) -> RGB in [0,1]-ish at full resolution."""

    def __init__(self, gs: nn.Module, refine: bool):
        super().__init__()
        self.gs = gs
        self.refine = Refine() if refine else None

    def forward(self, y, mask, z):
        gs = self.gs
        h = gs.head(torch.cat([y, mask, gs.global_net(z)], 1))
        h = gs.up(gs.trunk(F.leaky_relu(h, 0.1)))
        coarse = F.pixel_shuffle(gs.out(h), 4)
        return coarse if self.refine is None else self.refine(h, coarse)


def latents(codec: LatentCodec, img: np.ndarray) -> dict:
    tx = np.ones((img.shape[0] // 16, img.shape[1] // 16), dtype=bool)
    return {q: decoder_inputs(codec, img, q, tx) for q in RATES}


def prepare(codec, items, cache: Path, max_side: int) -> list:
    cache.mkdir(parents=True, exist_ok=True)
    data = []
    t0 = time.time()
    for i, (name, img_fn) in enumerate(items):
        f = cache / f"{name}.npz"
        if f.is_file():
            d = np.load(f)
            img = d["img"]
            lat = {q: (d[f"y{q}"], d[f"z{q}"]) for q in RATES}
        else:
            img = _fit64(img_fn(), max_side)
            lat = latents(codec, img)
            np.savez(f, img=img, **{f"y{q}": v[0] for q, v in lat.items()}, **{f"z{q}": v[1] for q, v in lat.items()})
        data.append((img, lat))
        if i % 20 == 0:
            print(f"  latents {i + 1}/{len(items)} {time.time() - t0:.0f}s", flush=True)
    return data


def batch(data, rng, n: int, crop: int):
    xs, ys, zs = [], [], []
    for _ in range(n):
        img, lat = data[rng.integers(len(data))]
        q = RATES[rng.integers(len(RATES))]
        y, z = lat[q]
        h, w = img.shape[:2]
        r = rng.integers(0, (h - crop) // 64 + 1) * 64
        c = rng.integers(0, (w - crop) // 64 + 1) * 64
        xs.append(img[r:r + crop, c:c + crop])
        ys.append(y[:, r // 16:(r + crop) // 16, c // 16:(c + crop) // 16])
        zs.append(z[:, r // 64:(r + crop) // 64, c // 64:(c + crop) // 64])
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255
    return x, torch.from_numpy(np.stack(ys)), torch.from_numpy(np.stack(zs))


@torch.no_grad()
def evaluate(dec: Decoder, kodak) -> dict:
    dec.eval()
    res = {}
    for q in RATES:
        ps = []
        for img, lat in kodak:
            y, z = lat[q]
            yt = torch.from_numpy(y)[None]
            out = dec(yt, torch.ones_like(yt[:, :1]), torch.from_numpy(z)[None])[0].clamp(0, 1)
            rec = (out.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
            mse = np.mean((rec.astype(np.float64) - img) ** 2)
            ps.append(10 * np.log10(255 ** 2 / mse))
        res[q] = float(np.mean(ps))
    dec.train()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("weights")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=192)
    ap.add_argument("--max-side", type=int, default=1024)
    ap.add_argument("--arms", default="control,refine")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/gs_refine")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    codec = LatentCodec.from_file(a.weights)
    cache = default_cache_dir() / "gs_refine" / codec.weights_hash.hex()[:16]
    train_items = [(n, (lambda p=p, f=f: _read_rgb(p, f))) for n, p, f in training_sources(vtest_stride=5)]
    kodak_dir = shared_path("data", "images", "kodak")
    kodak_items = [(f"kodak-{p.stem}", (lambda p=p: _read_rgb(p, None))) for p in sorted(kodak_dir.glob("*.png"))]
    print(f"{len(train_items)} training images, {len(kodak_items)} Kodak", flush=True)
    kodak = prepare(codec, kodak_items, cache / "kodak", 10_000)
    train = prepare(codec, train_items, cache / "train", a.max_side)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = {"weights": a.weights, "args": vars(a), "arms": {}}
    for arm in a.arms.split(","):
        gs = LatentCodec.from_file(a.weights).model.g_s
        dec = Decoder(gs, refine=(arm == "refine"))
        n_new = sum(p.numel() for p in dec.refine.parameters()) if dec.refine else 0
        opt = torch.optim.Adam(dec.parameters(), lr=a.lr)
        rng = np.random.default_rng(0)
        curve = [{"step": 0, "psnr": evaluate(dec, kodak), "sec": 0.0}]
        print(arm, curve[-1], flush=True)
        t0 = time.time()
        for step in range(1, a.steps + 1):
            x, y, z = batch(train, rng, a.batch, a.crop)
            loss = F.mse_loss(dec(y, torch.ones_like(y[:, :1]), z), x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % a.eval_every == 0 or step == a.steps:
                curve.append({"step": step, "psnr": evaluate(dec, kodak), "sec": time.time() - t0})
                print(arm, curve[-1], flush=True)
        sec_dec = []
        with torch.no_grad():
            img, lat = kodak[0]
            y, z = lat[2]
            yt = torch.from_numpy(y)[None]
            for _ in range(3):
                t = time.perf_counter()
                dec(yt, torch.ones_like(yt[:, :1]), torch.from_numpy(z)[None])
                sec_dec.append(time.perf_counter() - t)
        log["arms"][arm] = {"new_params": n_new, "curve": curve, "decode_s_768x512": float(np.median(sec_dec))}
        torch.save(dec.state_dict(), out / f"{arm}.pt")
        (out / "gs_refine.json").write_text(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
