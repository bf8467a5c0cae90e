"""Experiment (issue 14): which RDOQ λ does a codec code best with, measured on training images?

The encoder's λ (``codec.rdoq``) moves every rate point along the codec's curve; a codec trained on RDOQ
symbols (``train codec --rdoq``) need not code best at the λ it was trained with. This measures a codec (a
released file, or a training checkpoint's average) at several λ on centre crops of *training* images
(``models.training.calibration_images``: the photos and vtest frames not divisible by 8, never Kodak), and
reports each λ's PSNR BD-rate against the first λ's curve: the λ to record at release
(``latentcast release codec --rdoq λ``)::

    checkpoint ─► ElicCodec.forward(rdoq=λ) on each crop, every rate point (ideal code length, as
        tools/codec_learning_curve.py) ─► (bpp, PSNR) per λ ─► BD-rate against the first λ

Usage::

    python tools/experiments/rdoq_lambda_sweep.py CHECKPOINT [--ema] --lambdas 0.05,0.065,0.08,0.1,0.13 \\
        --images 24 --threads 1 --out results/rdoq_training/lambda_sweep
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from latentcast.models.training import calibration_images
from latentcast.proto.symbols import check_rdoq
from latentcast.tools.codec_learning_curve import evaluate_checkpoint
from latentcast.tools.eval.metrics import bd_rate
from latentcast.tools.options import add_average_options, chosen_average
from latentcast.tools.provenance import command, commit, machine, write_results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a training checkpoint (.pt) or released weights (.safetensors)")
    p.add_argument("--lambdas", default="0.05,0.065,0.08,0.1,0.13",
                   help="comma-separated λ; BD-rates are against the first (default %(default)s)")
    p.add_argument("--images", type=int, default=24, help="training crops (default %(default)s)")
    p.add_argument("--size", type=int, default=512, help="crop side in pixels (default %(default)s)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/rdoq_training/lambda_sweep")
    add_average_options(p, "measure")
    a = p.parse_args(argv)
    try:
        lambdas = [check_rdoq(float(v)) for v in a.lambdas.split(",")]
    except ValueError as exc:
        p.error(f"--lambdas {a.lambdas!r}: {exc}")
    torch.set_num_threads(a.threads)
    images = calibration_images(a.images, a.size)
    if not images:
        p.error("no training images were found (set LATENTCAST_SHARED to the shared data folder)")
    t0 = time.monotonic()
    runs = [evaluate_checkpoint(Path(a.checkpoint), images, average=chosen_average(a), rdoq=lam) for lam in lambdas]
    base = list(zip(runs[0]["bpp"], runs[0]["psnr"], strict=True))
    rows = []
    for lam, r in zip(lambdas, runs, strict=True):
        bd = bd_rate(base, list(zip(r["bpp"], r["psnr"], strict=True)))
        rows.append({"rdoq": lam, "bpp": r["bpp"], "psnr": r["psnr"],
                     "bd_rate_psnr": None if bd is None else round(bd, 2)})
    result = {"command": command("python tools/experiments/rdoq_lambda_sweep.py"), "commit": commit(),
              "machine": machine(), "seconds": round(time.monotonic() - t0, 1), "checkpoint": runs[0]["checkpoint"],
              "step": runs[0]["step"], "average": runs[0]["average"],
              "images": f"{len(images)} centre crops of {a.size} px of training images (calibration_images)",
              "bpp": "ideal code length (ElicCodec.forward), headers excluded",
              "bd_rate_psnr": f"% bytes at equal PSNR against rdoq {lambdas[0]}", "lambdas": rows}
    md = ["| λ | bpp per rate point | PSNR dB per rate point | BD-rate against λ " f"{lambdas[0]:g} |",
          "|---|---|---|---|"]
    md += [f"| {r['rdoq']:g} | {' / '.join(f'{v:.4f}' for v in r['bpp'])} | "
           f"{' / '.join(f'{v:.2f}' for v in r['psnr'])} | {r['bd_rate_psnr']:+.2f} % |" for r in rows]
    out = write_results(a.out, result, "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
