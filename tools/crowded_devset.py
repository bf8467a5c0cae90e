"""A development set of crowded street scenes: vtest frames tiled into 768x576 mosaics.

::

    vtest.avi frames i with i % 8 != 0 (never scored) and i % 5 != 0 (never a training crop)
        ─► downscale k x (k = 2, 3, 4) ─► k x k tiles ─► one 768x576 mosaic (objects small and many)

Crowded scenes are the camera's real case and where ROI-only coding failed on a held-out set of
street photographs (issue 14). This set is for development only: it is never read in training
(``models/training.py`` reads only vtest frames with ``i % 5 == 0``), and the held-out street
photographs stay held out. Ground truth comes from ``latentcast eval`` (YOLOX-nano on the
uncompressed mosaics) like any image folder::

    python -m latentcast.tools.crowded_devset --out devset/crowded
    latentcast eval --data devset/crowded --codecs latentcast,latentcast-roibg --out results/crowded

The mosaics are deterministic (the same frames in the same places on every machine); the folder
gets a ``manifest.json`` naming the frames of every tile.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["MOSAIC_SIZE", "GRIDS", "devset_frames", "build_devset", "main"]

MOSAIC_SIZE = (768, 576)  # (width, height) of every mosaic: vtest's own frame size
GRIDS = (2, 3, 4)  # tiles per side; each tile is a whole frame downscaled by this factor
PER_GRID = 8  # mosaics per grid size


def devset_frames(n_frames: int) -> list[int]:
    """Frame indices the set may use: neither scored by ``latentcast eval`` (i % 8 == 0) nor read in
    codec training (i % 5 == 0)."""
    return [i for i in range(n_frames) if i % 8 != 0 and i % 5 != 0]


def build_devset(video: Path, out: Path, *, grids: tuple[int, ...] = GRIDS, per_grid: int = PER_GRID) -> dict:
    """Write the mosaics and ``manifest.json`` into ``out``; returns the manifest."""
    import cv2

    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise FileNotFoundError(f"cannot open video {video}")
    frames: list[np.ndarray] = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(bgr)
    cap.release()
    allowed = devset_frames(len(frames))
    need = sum(per_grid * k * k for k in grids)
    if len(allowed) < need:
        raise ValueError(f"{video}: {len(allowed)} usable frames, the set needs {need}")
    # spread the tiles over the whole clip, each frame used at most once
    pick = iter(np.asarray(allowed)[np.linspace(0, len(allowed) - 1, need).astype(int)].tolist())
    out.mkdir(parents=True, exist_ok=True)
    W, H = MOSAIC_SIZE
    items = []
    for k in grids:
        tw, th = W // k, H // k
        for m in range(per_grid):
            mosaic = np.zeros((H, W, 3), np.uint8)
            tiles = []
            for r in range(k):
                for c in range(k):
                    i = next(pick)
                    mosaic[r * th:(r + 1) * th, c * tw:(c + 1) * tw] = cv2.resize(frames[i], (tw, th),
                                                                                   interpolation=cv2.INTER_AREA)
                    tiles.append(i)
            name = f"mosaic{k}x{k}-{m:02d}.png"
            cv2.imwrite(str(out / name), mosaic)
            items.append({"file": name, "grid": k, "frames": tiles})
    manifest = {"source": video.name, "size": list(MOSAIC_SIZE), "rule": "frames i % 8 != 0 and i % 5 != 0",
                "mosaics": items}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    log.info("%d mosaics written to %s", len(items), out)
    return manifest


def main(argv: list[str] | None = None) -> int:
    from latentcast.shared import shared_path

    p = argparse.ArgumentParser(prog="python -m latentcast.tools.crowded_devset", description=__doc__.split("\n")[0])
    p.add_argument("--video", default=None, help="source video (default: vtest.avi in the shared folder)")
    p.add_argument("--out", default="devset/crowded", help="output folder (default devset/crowded)")
    p.add_argument("--per-grid", type=int, default=PER_GRID, help=f"mosaics per grid size (default {PER_GRID})")
    a = p.parse_args(argv)
    video = Path(a.video) if a.video else shared_path("data", "video", "vtest.avi")
    m = build_devset(video, Path(a.out), per_grid=a.per_grid)
    print(f"{a.out}: {len(m['mosaics'])} mosaics ({', '.join(f'{k}x{k}' for k in GRIDS)} tiles of vtest frames)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
