"""The evaluation's outputs: ``eval.json`` (every point), ``eval.md`` (tables), ``rate_accuracy.png``
(one panel per metric, one curve per codec, bpp on a log axis) and ``examples.png`` (one frame
reconstructed by every codec at the setting closest to a common bitrate, with its detections)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["write_report", "markdown", "plot_curves", "plot_examples"]

_LABELS = {"map50": "mAP@0.5", "map": "mAP@0.5:0.95", "top1": "top-1 agreement", "psnr": "PSNR (dB)",
           "ms_ssim": "MS-SSIM"}


def _fmt(v, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def _bd_cell(entry: dict | None, with_quality: bool = False) -> str:
    dq = "" if not (with_quality and entry and entry.get("bd_quality") is not None) else \
        f"; Δ {entry['bd_quality']:+.3g}"
    if not entry or entry.get("bd_rate_percent") is None:
        return "n/a (no overlap)" + dq
    lo, hi = entry["over"]
    return f"{entry['bd_rate_percent']:+.1f} % [{lo:.3g}–{hi:.3g}]" + dq


def _metrics(result: dict) -> list[str]:
    return list(result["bd_rate"])


def strongest_classical(result: dict, metric: str) -> tuple[str, float] | None:
    """The classical codec that needs the fewest bits for the same ``metric``: the most negative BD-rate against
    the run's anchor (the anchor itself counts as 0 %); None when the anchor is a latentcast curve."""
    anchor = result["anchor"]
    if anchor.startswith("latentcast"):
        return None
    best = (anchor, 0.0)
    for codec, entry in result["bd_rate"][metric].get(anchor, {}).items():
        v = (entry or {}).get("bd_rate_percent")
        if not codec.startswith("latentcast") and v is not None and v < best[1]:
            best = (codec, v)
    return best


def markdown(result: dict) -> str:
    """The results as markdown: setup, latentcast's BD-rates against each baseline, every codec's
    BD-rate against the anchor, and every point."""
    ms = _metrics(result)
    d = result["data"]
    lines = [f"# Rate vs accuracy: `{d['path']}`", "",
             f"- command: `{result['command']}`", f"- commit {result['commit']}, {result['machine'].get('cpu', '?')} "
             f"({result['machine'].get('cpus')} CPUs), {result['seconds']} s",
             f"- data: {d['kind']}, {d['clips']} clip(s), {d['frames']} frames coded by video codecs, "
             f"{d['scored_frames']} scored" + (f" (every {d['every']}th)" if d.get("every") else "") +
             f", sizes {', '.join(d['sizes'])}",
             f"- ground truth: {result['ground_truth']} ({result['gt_boxes']} boxes)",
             f"- scored classes: {len(result['scored_classes'])} ({', '.join(result['scored_classes'][:8])}"
             f"{', ...' if len(result['scored_classes']) > 8 else ''}); task labels: {result['labels']}",
             f"- bpp: {result['bpp']}", "",
             "BD-rate: Bjøntegaard delta rate on the metric vs log(bpp), PCHIP on each curve's Pareto front, over "
             "the metric interval in brackets where both curves exist. Negative = fewer bits than the anchor for "
             "the same accuracy; n/a = the curves share no interval of the metric. Δ = BD-metric: the average "
             "difference of the metric at equal rate over the bitrates both curves cover (positive = latentcast "
             "more accurate).", ""]
    strongest = {m: strongest_classical(result, m) for m in ms}
    if any(strongest.values()):
        lines += ["## The strongest classical anchor", "",
                  f"The classical codec with the most negative BD-rate against {result['anchor']}, per metric (the "
                  "table below gives latentcast's BD-rates against it as against every baseline):", ""]
        lines += [f"- {_LABELS[m]}: **{s[0]}**" + (f" ({s[1]:+.1f} % against {result['anchor']})" if s[1] else "")
                  for m, s in strongest.items() if s]
        lines.append("")
    ours = [c for c in result["codecs"] if c.startswith("latentcast")]
    others = [c for c in result["codecs"] if not c.startswith("latentcast")]
    if ours and others:
        lines += ["## latentcast against each baseline (BD-rate, baseline = anchor)", "",
                  "| latentcast | baseline | " + " | ".join(_LABELS[m] for m in ms) + " |",
                  "|---|---|" + "---|" * len(ms)]
        for o in ours:
            for b in others:
                lines.append(f"| {o} | {b} | " + " | ".join(_bd_cell(result["bd_rate"][m].get(b, {}).get(o), True)
                                                           for m in ms) + " |")
        lines.append("")
    anchor = result["anchor"]
    lines += [f"## Every codec against {anchor} (BD-rate)", "",
              "| codec | " + " | ".join(_LABELS[m] for m in ms) + " |", "|---|" + "---|" * len(ms)]
    for c in result["codecs"]:
        if c != anchor:
            lines.append(f"| {c} | " + " | ".join(_bd_cell(result["bd_rate"][m].get(anchor, {}).get(c))
                                                 for m in ms) + " |")
    u = result["uncompressed"]
    lines += ["", "## Points", "",
              "| codec | setting | bpp | kbit/s | " + " | ".join(_LABELS[m] for m in ms) +
              " | encode s/frame | decode s/frame |", "|---|---|---|---|" + "---|" * (len(ms) + 2),
              "| uncompressed | - | 24 | - | " + " | ".join(_fmt(u.get(m)) for m in ms) + " | - | - |"]
    for p in result["points"]:
        lines.append(
            f"| {p['codec']} | {p['param_name']} {p['param']} | {p['bpp']:.4f} | {_fmt(p.get('kbps'), '.0f')} | "
            + " | ".join(_fmt(p.get(m), ".2f" if m == "psnr" else ".3f") for m in ms)
            + f" | {p['encode_s_per_frame']:.3f} | {p['decode_s_per_frame']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _curves(points: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for p in points:
        out.setdefault(p["codec"], []).append(p)
    return {k: sorted(v, key=lambda p: p["bpp"]) for k, v in out.items()}


def _style(name: str) -> dict:
    if name.startswith("latentcast"):
        return {"linewidth": 2.5, "marker": "o", "linestyle": "-" if name.endswith("roi") else "--", "zorder": 3}
    return {"linewidth": 1.3, "marker": ".", "linestyle": "-"}


def plot_curves(result: dict, path: Path) -> None:
    """One panel per metric: the metric against bpp (log axis), one curve per codec."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = _metrics(result)
    ncol = min(3, len(ms))
    nrow = (len(ms) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 4.0 * nrow), squeeze=False)
    curves = _curves(result["points"])
    for ax, m in zip(axes.ravel(), ms):
        for name, pts in curves.items():
            xy = [(p["bpp"], p[m]) for p in pts if p.get(m) is not None]
            if xy:
                ax.plot(*zip(*xy), label=name, **_style(name))
        if result["uncompressed"].get(m) is not None:
            ax.axhline(result["uncompressed"][m], color="gray", linestyle=":", linewidth=1, label="uncompressed")
        ax.set_xscale("log")
        ax.set_xlabel("bits per pixel")
        ax.set_ylabel(_LABELS[m])
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.ravel()[len(ms):]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=8)
    fig.suptitle(f"{result['data']['path']}: {result['data']['scored_frames']} scored frames; ground truth: "
                 f"{'annotations' if result['ground_truth'].startswith('annotations') else 'detector on originals'}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _draw(img: np.ndarray, dets, min_score: float) -> np.ndarray:
    import cv2

    out = np.ascontiguousarray(img.copy())
    for d in dets:
        if d.score < min_score:
            continue
        cv2.rectangle(out, (int(d.x0), int(d.y0)), (int(d.x1), int(d.y1)), (255, 40, 40), 2)
        cv2.putText(out, d.label, (int(d.x0), max(10, int(d.y0) - 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 40, 40), 1,
                    cv2.LINE_AA)
    return out


def plot_examples(examples: dict, path: Path, *, min_score: float = 0.3, target_bpp: float | None = None) -> float:
    """The example frame: the original, then each codec at its setting nearest ``target_bpp`` (in
    log bpp; default: latentcast-roi's middle rate point), detections with score >= ``min_score``
    drawn. Returns the target bpp."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in examples["points"] if p["recon"] is not None]
    if target_bpp is None:
        ours = sorted((p for p in pts if p["codec"] == "latentcast-roi"), key=lambda p: p["bpp"]) or \
            sorted(pts, key=lambda p: p["bpp"])
        target_bpp = ours[len(ours) // 2]["bpp"]
    chosen = {}
    for p in pts:
        c = chosen.get(p["codec"])
        if c is None or abs(np.log(p["bpp"] / target_bpp)) < abs(np.log(c["bpp"] / target_bpp)):
            chosen[p["codec"]] = p
    tiles = [("original", _draw(examples["original"], examples["original_dets"], min_score))]
    for name, p in chosen.items():
        title = f"{name} {p['param_name']} {p['param']}: {p['bpp']:.4f} bpp"
        if p.get("map50") is not None:
            title += f", mAP@.5 {p['map50']:.2f}"
        tiles.append((title, _draw(p["recon"], p["dets"], min_score)))
    ncol = min(3, len(tiles))
    nrow = (len(tiles) + ncol - 1) // ncol
    h, w = examples["original"].shape[:2]
    fig, axes = plt.subplots(nrow, ncol, figsize=(ncol * 5.0, nrow * 5.0 * h / w + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (title, img) in zip(axes.ravel(), tiles):
        ax.imshow(img)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"{examples['frame']}: each codec at its setting nearest {target_bpp:.4f} bpp "
                 f"(detections with score >= {min_score})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return target_bpp


def write_report(result: dict, examples: dict | None, out: Path) -> list[Path]:
    """Write eval.json, eval.md, rate_accuracy.png and (with ``examples``) examples.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "eval.json", out / "eval.md", out / "rate_accuracy.png"]
    if examples is not None and examples["points"]:
        result["example"] = {"frame": examples["frame"], "file": "examples.png",
                             "target_bpp": plot_examples(examples, out / "examples.png",
                                                         min_score=result.get("gt_score", 0.3))}
        files.append(out / "examples.png")
    files[0].write_text(json.dumps(result, indent=2))
    files[1].write_text(markdown(result))
    plot_curves(result, files[2])
    log.info("wrote %s", ", ".join(str(f) for f in files))
    return files
