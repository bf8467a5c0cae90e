"""Experiment behind ``proto.grid.ROI_MARGIN_PX``: ROI-only / full-frame packet bytes and the PSNR
inside a centred 20 % box, for three ways of growing the box before it is mapped to latent cells:
``cell`` (the cells it touches plus one cell on each side, the first rule), ``8`` and ``0`` pixels.

    python tools/experiments/roi_margin_experiment.py models/weights/elic-lite.safetensors 24

Results of the run quoted in the model card: ``results/roi_margin.txt``.
"""

import sys

import cv2
import numpy as np
import torch

from latentcast.models.codec import LatentCodec
from latentcast.proto import grid
from latentcast.proto.bitstream import Roi
from latentcast.shared import shared_path
from latentcast.tools.eval.metrics import psnr


def main() -> None:
    torch.set_num_threads(2)
    c = LatentCodec.from_file(sys.argv[1])
    n = int(sys.argv[2])
    files = sorted(str(p) for p in shared_path("data", "images", "kodak").glob("kodim*.png"))[:n]

    def make_tx(mode):
        def tx(width, height, boxes, roi_only):
            if not roi_only:
                return np.ones(grid.grid_shape(width, height), dtype=bool)
            if mode == "cell":  # the old rule: cells the box touches, plus one cell on each side
                m0 = grid.roi_mask(boxes, width, height, margin_px=0)
                p = np.pad(m0, 1)
                return (
                    p[:-2, 1:-1]
                    | p[2:, 1:-1]
                    | p[1:-1, :-2]
                    | p[1:-1, 2:]
                    | p[:-2, :-2]
                    | p[:-2, 2:]
                    | p[2:, :-2]
                    | p[2:, 2:]
                    | m0
                )
            return grid.roi_mask(boxes, width, height, margin_px=int(mode))

        return tx

    for q in range(c.n_rates):
        for mode in ("cell", "8", "0"):
            grid.transmit_mask = make_tx(mode)  # coded_cells (codec and edge) looks it up there
            r = []
            pin = []
            pfull = []
            for f in files:
                img = np.ascontiguousarray(cv2.imread(f)[:, :, ::-1])
                h, w = img.shape[:2]
                full = c.compress(img, rate_point=q)
                rw, rh = int(w * 0.447), int(h * 0.447)
                x0, y0 = (w - rw) // 2, (h - rh) // 2
                roi = Roi(x0=x0, y0=y0, x1=x0 + rw, y1=y0 + rh)
                part = c.compress(img, [roi], rate_point=q)
                r.append(len(part) / len(full))
                rr = c.decompress(part).frame
                rf = c.decompress(full).frame
                sl = (slice(y0, y0 + rh), slice(x0, x0 + rw))
                pin.append(psnr(rr[sl], img[sl]))
                pfull.append(psnr(rf[sl], img[sl]))
            print(
                q,
                mode,
                f"roi ratio {np.mean(r):.3f}  PSNR in box: roi-only {np.mean(pin):.2f} full {np.mean(pfull):.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
