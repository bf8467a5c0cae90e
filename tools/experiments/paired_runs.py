"""Two codec training runs side by side, step by step: a paired A/B of a lever on the training loss (issue 14).

Two runs of ``latentcast train codec`` with the same seed, batch and crop draw the same crops, rate points and
masks at every step, so their logged losses differ only by the lever (a wider g_a, a learning rate, ...).
Comparing them at the same steps removes the noise of the data, which decides single Kodak checkpoints by
several BD points::

    RUN/history.jsonl  (every 50 steps: bpp and nmse per rate point, averaged over the steps of that rate point)
        ─► loss_q = bpp_q + λ_q · nmse_q   (the trainer's loss, λ_q = λ / Δ_q², from RUN/train_config.json)
        ─► per window of steps: mean loss of each run, per rate point, and B against A in %

Usage::

    python tools/experiments/paired_runs.py ~/.cache/latentcast/runs/ab-n64 ~/.cache/latentcast/runs/ab-n96 \
        --window 1000 --out results/codec_capacity/paired.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from latentcast.models.elic import CONFIGS, ElicCodec, ElicConfig
from latentcast.models.training import rate_lambdas
from latentcast.tools import provenance


def _run(path: Path) -> tuple[dict, dict[int, np.ndarray]]:
    """(the run's train config, {step: loss per rate point}) of a run folder."""
    try:
        conf = json.loads((path / "train_config.json").read_text())
        lines = (path / "history.jsonl").read_text().splitlines()
    except OSError as exc:
        raise SystemExit(f"error: {path} is not a `latentcast train codec` run folder ({exc})") from None
    tc = conf["train"]
    cc = ElicConfig.from_dict(conf["codec"]) if "codec" in conf else CONFIGS[tc["model"]]
    lam = rate_lambdas(ElicCodec(cc), tc["lam"]).double().numpy()
    out = {}
    for line in lines:
        h = json.loads(line)
        if h.get("stage", 1) == 1:
            out[int(h["step"])] = np.asarray(h["bpp"]) + lam * np.asarray(h["nmse"])
    return tc, out


def compare(a: dict[int, np.ndarray], b: dict[int, np.ndarray], window: int) -> list[dict]:
    """Per window of ``window`` steps (the steps both runs logged): mean loss per rate point, B against A in %."""
    steps = sorted(set(a) & set(b))
    rows = []
    for s0 in range(0, (steps[-1] if steps else 0), window):
        ss = [s for s in steps if s0 < s <= s0 + window]
        if not ss:
            continue
        la, lb = np.mean([a[s] for s in ss], axis=0), np.mean([b[s] for s in ss], axis=0)
        rows.append({"steps": [s0, s0 + window], "n": len(ss), "loss_a": la.round(5).tolist(),
                     "loss_b": lb.round(5).tolist(), "b_vs_a_percent": ((lb / la - 1) * 100).round(2).tolist(),
                     "mean_percent": round(float(((lb / la - 1) * 100).mean()), 2)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a", help="run folder A (the control)")
    p.add_argument("b", help="run folder B (the lever)")
    p.add_argument("--window", type=int, default=1000, help="steps per row")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    ta, la = _run(Path(args.a))
    tb, lb = _run(Path(args.b))
    for k in ("seed", "batch", "crop", "mask_fraction"):
        if ta.get(k) != tb.get(k):
            print(f"warning: the runs differ in {k} ({ta.get(k)} / {tb.get(k)}): they do not see the same crops, "
                  "so the comparison is not paired")
    rows = compare(la, lb, args.window)
    print("| steps | loss A per rate point | loss B | B against A | mean |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['steps'][0]}–{r['steps'][1]} | {' / '.join(f'{v:.4f}' for v in r['loss_a'])} | "
              f"{' / '.join(f'{v:.4f}' for v in r['loss_b'])} | "
              f"{' / '.join(f'{v:+.2f} %' for v in r['b_vs_a_percent'])} | {r['mean_percent']:+.2f} % |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "command": provenance.command("python tools/experiments/paired_runs.py"), "commit": provenance.commit(),
            "a": {"run": Path(args.a).name, "overrides": ta.get("overrides"), "init": Path(ta.get("init") or "").name},
            "b": {"run": Path(args.b).name, "overrides": tb.get("overrides"), "init": Path(tb.get("init") or "").name},
            "loss": "bpp + λ_q · nmse per rate point, the trainer's loss", "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
