"""Experiment: how many P-frame residual bits would a learned conditional entropy model save (issue 18)?

The shipped P-frame tables (``proto.temporal.TemporalTables``) code a coded cell's residual symbols
``s`` (M channels) with zero-mean Gaussian tables chosen by (rate point, mode, coded last frame, the
cell's class). The issue asks for a small network that predicts each symbol's mean and scale from what
the decoder already holds. This runs the edge's closed loop (grounded ROIs, motion, the shipped
defaults: keyframe at rate point 2, ROI cells at ``--rate``, background at 0) over a video, collects
every CODE cell of the training frames (index not divisible by 8) with what the decoder knows before
its residual (the moved previous latent, the background latent, the cell's residual in the previous
frame, its class, whether it was coded last frame, the previous latent of its 4 neighbours), fits
networks on the frames before ``--split`` and reports the code length of the cells after it:

- ``shipped``: the shipped tables (exact code lengths of the codec's Gaussian tables, escapes priced);
- ``refit``: the shipped contexts' best tables, fitted on the first part (what ``train temporal`` does);
- ``net scale``: a network's scale per symbol, mean 0, the nearest of the codec's tables;
- ``net mean+scale``: a network's mean (rounded: the symbol is coded as ``s - round(mu)``) and scale,
  the nearest table;
- ``net (ideal)``: the same network's discretized Gaussian, no table quantization (a bound).

    python tools/experiments/temporal_conditional_experiment.py --frames 795 \\
        --out results/temporal_levers/conditional/experiment.json
"""

from __future__ import annotations

import time

import numpy as np
from _video import key_state, load_video_codec, video_parser


def _collect(a, path, codec, tables):
    """Run the edge's closed loop; return per-cell arrays of the training frames' CODE cells (their frame,
    residual symbols and what the decoder knows before them)."""
    from latentcast.detector import YoloxDetector
    from latentcast.edge.grounding import Grounder
    from latentcast.proto.grid import transmit_mask
    from latentcast.proto.temporal import (
        CODE,
        Motion,
        _moved_cells,  # private: the prediction the decoder forms for a moved cell
        box_cells,
        cell_classes,
        choose_modes,
        choose_motion,
    )
    from latentcast.tools.eval.data import video_clip

    clip = video_clip(path, every=8, max_frames=a.frames)
    grounder = Grounder(labels=["person", "vehicle", "bicycle"], detector=YoloxDetector(score_threshold=0.3), every=5)
    steps, q = codec.rate_deltas, a.rate
    rows: dict[str, list[np.ndarray]] = {k: [] for k in ("frame", "s", "pred", "bg", "prev", "nb", "k", "coded")}
    st = None
    prev = None
    t0 = time.time()
    for i, frame in clip.frames():
        if i >= clip.n_frames:
            break
        h, w = frame.shape[:2]
        boxes = [(r.x0, r.y0, r.x1, r.y1) for r in grounder.update(frame).rois]
        y, z = codec.analyze(frame)
        if st is None:
            st, prev = key_state(codec, frame, i, (y, z))
            continue
        roi = transmit_mask(w, h, boxes, True)
        mv = choose_motion(st, y, roi, box_cells(boxes, roi.shape), step=steps[q]) if boxes else None
        modes, sym = choose_modes(st, y, roi, step=steps[q], bg_step=steps[0], threshold=1, bg_threshold=8, mv=mv)
        cells = modes == CODE
        if cells.any() and i % 8:
            r, c = np.nonzero(cells)
            pred = st.y[:, r, c] if mv is None else _moved_cells(st.y, r, c, mv[0, r, c], mv[1, r, c])
            pad = np.pad(st.y, ((0, 0), (1, 1), (1, 1)), mode="edge")
            nb = (pad[:, r, c + 1] + pad[:, r + 2, c + 1] + pad[:, r + 1, c] + pad[:, r + 1, c + 2]) / 4
            v = sym[:, r, c]
            rows["frame"].append(np.full(r.size, i))
            rows["s"].append(v.T)
            rows["pred"].append(pred.T)
            rows["bg"].append(st.bg[:, r, c].T)
            rows["prev"].append(prev[:, r, c].T)
            rows["nb"].append(nb.T)
            rows["k"].append(cell_classes(tables, v, q))
            rows["coded"].append(st.coded[r, c].astype(np.int64))
        frame_motion = None if mv is None else Motion(cells=np.where(cells[None], mv, 0))
        st.apply(modes, sym, step=steps[q], bg_step=steps[0], frame_id=i, motion=frame_motion)
        prev = np.where(((modes == CODE) | (modes == 3))[None], sym, 0)
        if i % 100 == 0:
            print(f"frame {i}, {time.time() - t0:.0f} s", flush=True)
    return {k: np.concatenate(v) for k, v in rows.items()}


def _table_bits(s: np.ndarray, t: np.ndarray, lengths: np.ndarray, R: int) -> np.ndarray:
    """Bits of symbols ``s`` each coded with table index ``t`` (same shapes)."""
    return lengths[t, np.clip(s, -R, R) + R]


def main(argv: list[str] | None = None) -> int:
    import torch

    from latentcast.proto.temporal import N_CLASSES, code_lengths
    from latentcast.shared import portable_path
    from latentcast.tools import provenance

    p = video_parser(__doc__, frames=795, out="results/temporal_levers/conditional/experiment.json",
                     frames_help="run over the first N frames")
    p.add_argument("--rate", type=int, default=0, help="rate point of ROI cells (default 0)")
    p.add_argument("--split", type=int, default=500, help="fit on cells of frames before this, score after it")
    p.add_argument("--val", type=int, default=400,
                   help="frames from this to --split choose the network's epoch (early stopping), not fitted")
    p.add_argument("--hidden", type=int, default=256, help="hidden width of the network")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--cache", default="", help="an .npz of collected cells to reuse (written if missing)")
    a = p.parse_args(argv)
    path, codec, tables = load_video_codec(a)
    q, step = a.rate, float(codec.rate_deltas[a.rate])
    from pathlib import Path
    if a.cache and Path(a.cache).is_file():
        d = dict(np.load(a.cache))
    else:
        d = _collect(a, path, codec, tables)
        if a.cache:
            np.savez_compressed(a.cache, **d)
    lengths, R = code_lengths(codec.y_tables)
    fit, test = d["frame"] < a.split, d["frame"] >= a.split
    s = d["s"].astype(np.int64)
    M = s.shape[1]
    # shipped: the context row of each cell (CODE cells: group = coded-last), its table per channel
    row = q * 4 * N_CLASSES + d["coded"] * N_CLASSES + d["k"]
    t_ship = tables.res_scale[row]  # (n, M)
    bits = {"shipped": _table_bits(s[test], t_ship[test], lengths, R).sum()}
    # refit: per (context, channel) the best table on the fit part
    ctx = d["coded"] * N_CLASSES + d["k"]
    t_refit = np.empty_like(t_ship)
    for cx in np.unique(ctx):
        sel_f, sel = fit & (ctx == cx), ctx == cx
        for m in range(M):
            hist = np.bincount(np.clip(s[sel_f, m], -R, R) + R, minlength=2 * R + 1)
            t_refit[sel, m] = int((lengths @ hist).argmin()) if hist.sum() else t_ship[sel, m][0]
    bits["refit"] = _table_bits(s[test], t_refit[test], lengths, R).sum()

    # the network: features of the cell -> (mean, log scale) per channel, in symbol units
    feats = np.concatenate([d["pred"] / step, d["bg"] / step, (d["pred"] - d["bg"]) / step, d["nb"] / step,
                            np.clip(d["prev"], -8, 8), np.eye(N_CLASSES)[d["k"]], d["coded"][:, None]], 1)
    X = torch.tensor(feats, dtype=torch.float32)
    S = torch.tensor(s, dtype=torch.float32)
    torch.manual_seed(0)
    mu_x, sd_x = X[torch.tensor(fit)].mean(0), X[torch.tensor(fit)].std(0) + 1e-3
    net = torch.nn.Sequential(torch.nn.Linear(X.shape[1], a.hidden), torch.nn.GELU(),
                              torch.nn.Linear(a.hidden, a.hidden), torch.nn.GELU(), torch.nn.Linear(a.hidden, 2 * M))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    Xn = (X - mu_x) / sd_x
    fi = torch.nonzero(torch.tensor(fit & (d["frame"] < a.val))).squeeze(1)
    vi = torch.nonzero(torch.tensor(fit & (d["frame"] >= a.val))).squeeze(1)
    ti = torch.nonzero(torch.tensor(test)).squeeze(1)
    normal = torch.distributions.Normal(0.0, 1.0)

    def nll_bits(out: torch.Tensor, target: torch.Tensor, use_mean: bool) -> torch.Tensor:
        mu = out[:, :M] if use_mean else torch.zeros_like(target)
        sig = torch.exp(out[:, M:]).clamp(0.11, 64)
        up = normal.cdf((target + 0.5 - mu) / sig)
        lo = normal.cdf((target - 0.5 - mu) / sig)
        return -torch.log2((up - lo).clamp_min(1e-9))

    results = {}
    for use_mean in (False, True):
        torch.manual_seed(0)
        for layer in net:
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
        best, best_state = float("inf"), None
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.epochs)
        for ep in range(a.epochs):
            perm = fi[torch.randperm(fi.numel())]
            for b in range(0, perm.numel(), 256):
                idx = perm[b:b + 256]
                loss = nll_bits(net(Xn[idx]), S[idx], use_mean).sum(1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
            with torch.no_grad():
                vb = nll_bits(net(Xn[vi]), S[vi], use_mean).sum().item() / vi.numel()
            if vb < best:
                best, best_state = vb, {k: v.clone() for k, v in net.state_dict().items()}
            print(f"{'mean+scale' if use_mean else 'scale'} epoch {ep}: validation {vb:.2f} bits/cell", flush=True)
        net.load_state_dict(best_state)
        with torch.no_grad():
            out = net(Xn[ti])
            ideal = nll_bits(out, S[ti], use_mean).sum().item()
            sig = torch.exp(out[:, M:]).clamp(0.11, 64).numpy()
            mu = np.rint(out[:, :M].numpy()).astype(np.int64) if use_mean else np.zeros_like(s[test])
        # the nearest table: the one whose ideal cost on a Gaussian of that scale is least (by scale grid)
        t_net = np.abs(np.log(sig)[..., None] - np.log(_table_scales(codec))[None, None]).argmin(-1)
        name = "net mean+scale" if use_mean else "net scale"
        bits[name] = _table_bits(s[test] - mu, t_net, lengths, R).sum()
        results[name + " (ideal)"] = ideal
    bits.update(results)
    n = int(test.sum())
    rows = [{"model": k, "bits_per_cell": float(v) / n, "vs_shipped": float(v) / float(bits["shipped"]) - 1}
            for k, v in bits.items()]
    result = {"command": provenance.command("python tools/experiments/temporal_conditional_experiment.py"),
              "commit": provenance.commit(), "machine": provenance.machine(),
              "data": f"{portable_path(path)}, first {a.frames} frames, CODE cells of frames not divisible by 8; "
                      f"fit on frames < {a.val}, epoch chosen on {a.val}..{a.split - 1} "
                      f"({int(fit.sum())} cells in all), "
                      f"scored on frames >= {a.split} ({n} cells)",
              "rate_point": q, "rows": rows}
    md = "\n".join(["# A learned conditional model for P-frame residuals: an experiment\n",
                    f"- command: `{result['command']}`", f"- commit {result['commit']}", f"- data: {result['data']}",
                    "", "| model | bits per coded cell | vs shipped |", "|---|---|---|",
                    *[f"| {r['model']} | {r['bits_per_cell']:.1f} | {100 * r['vs_shipped']:+.1f} % |" for r in rows],
                    ""])
    provenance.write_results(a.out, result, md)
    print(md)
    return 0


def _table_scales(codec) -> np.ndarray:
    """The scale of each of the codec's Gaussian tables (log-spaced from scale_min to scale_max)."""
    cfg = codec.cfg
    return np.exp(np.linspace(np.log(cfg.scale_min), np.log(cfg.scale_max), cfg.n_scales))


if __name__ == "__main__":
    raise SystemExit(main())
