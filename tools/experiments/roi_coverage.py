"""Experiment: how much of each scored object lies outside the cells temporal coding re-codes (issue 18)?

A P frame re-codes only cells under the edge grounding's ROIs; the rest of an object (its feet, an arm, the
part the tracker's box has not reached yet) is rendered from the background or from a stale cell. This
grounds a video as the edge does (detector every ``every`` frames, the IoU tracker in between, ``margin``
pixels around each box, then ``proto.grid.roi_mask``'s cells) for several settings, and for every scored
frame (index divisible by 8) measures each reference box's area (YOLOX-nano on the original, score >= 0.3,
as ``latentcast eval``'s ground truth) that falls outside the ROI cells.

    python tools/experiments/roi_coverage.py --settings 5:8,1:8,5:16,5:24,2:8 \\
        --out results/temporal_levers/roi_coverage/coverage.json
"""

from __future__ import annotations

import numpy as np
from _video import video_parser


def main(argv: list[str] | None = None) -> int:
    from latentcast.detector import YoloxDetector
    from latentcast.proto.grid import transmit_mask
    from latentcast.shared import portable_path, shared_path
    from latentcast.tools import provenance
    from latentcast.tools.eval.data import video_clip
    from latentcast.tools.eval.learned import GroundingSettings, grounding_rois

    p = video_parser(__doc__, frames=795, out="results/temporal_levers/roi_coverage/coverage.json",
                     frames_help="run over the first N frames")
    p.add_argument("--settings", default="5:8,1:8,5:16,5:24,2:8",
                   help="comma-separated every:margin pairs (detector every N frames : pixels around a box)")
    a = p.parse_args(argv)
    from pathlib import Path

    path = Path(a.data) if Path(a.data).is_file() else shared_path(a.data)
    clip = video_clip(path, every=8, max_frames=a.frames)
    det = YoloxDetector(score_threshold=0.3)
    gt = {i: [d for d in det.detect(f) if d.score >= 0.3] for i, f in clip.scored_frames()}
    rows = []
    for s in a.settings.split(","):
        every, margin = (int(v) for v in s.split(":"))
        g = GroundingSettings(labels=("person", "vehicle", "bicycle"), every=every, margin=margin)
        rois = grounding_rois(clip, g, YoloxDetector(score_threshold=g.score_threshold), {}, every_frame=True)
        outside, cells, n = [], 0, 0
        for i, boxes in gt.items():
            mask = transmit_mask(clip.width, clip.height, [(r.x0, r.y0, r.x1, r.y1) for r in rois[i]], True)
            cells += int(mask.sum())
            pix = np.kron(mask, np.ones((16, 16), dtype=bool))[:clip.height, :clip.width]
            for b in boxes:
                x0, y0, x1, y1 = (int(round(v)) for v in (b.x0, b.y0, b.x1, b.y1))
                area = max((x1 - x0) * (y1 - y0), 1)
                outside.append(1.0 - pix[y0:y1, x0:x1].sum() / area)
                n += 1
        o = np.array(outside)
        rows.append({"every": every, "margin": margin, "boxes": n, "roi_cells_per_frame": cells / len(gt),
                     "mean_outside": float(o.mean()), "boxes_over_5pct_outside": float((o > 0.05).mean()),
                     "boxes_over_25pct_outside": float((o > 0.25).mean()),
                     "boxes_fully_outside": float((o > 0.99).mean())})
        print(rows[-1], flush=True)
    result = {"command": provenance.command("python tools/experiments/roi_coverage.py"),
              "commit": provenance.commit(), "machine": provenance.machine(),
              "data": f"{portable_path(path)}, first {clip.n_frames} frames, {len(gt)} scored (index % 8 == 0)",
              "rows": rows}
    md = "\n".join(["# Reference boxes outside the ROI cells\n", f"- command: `{result['command']}`",
                    f"- commit {result['commit']}", f"- data: {result['data']}", "",
                    "| detector every | margin px | ROI cells / frame | mean area outside | boxes > 5 % outside | "
                    "> 25 % | fully outside |", "|---|---|---|---|---|---|---|",
                    *[f"| {r['every']} | {r['margin']} | {r['roi_cells_per_frame']:.0f} "
                      f"| {100 * r['mean_outside']:.1f} % | {100 * r['boxes_over_5pct_outside']:.1f} % "
                      f"| {100 * r['boxes_over_25pct_outside']:.1f} % "
                      f"| {100 * r['boxes_fully_outside']:.1f} % |" for r in rows], ""])
    provenance.write_results(a.out, result, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
