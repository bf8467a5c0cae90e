"""Codec benchmark: rate, quality and speed on Kodak and a vtest frame, with JPEG/WebP in the same run.

Writes one JSON file with the command, machine and commit. Every rate is the
length of real packets (headers included). Quality:

- latent SNR: ``10 log10(var(z_c) / mse(z_c, ẑ_c))`` against the latent-space
  encoder's latent of the original image;
- pixel PSNR after the latent decoder (and the ceiling: the latent space's own
  round trip without compression);
- JPEG and WebP (OpenCV) over a quality sweep on the same images, and the bpp
  each needs to reach latentcast's pixel PSNR (log-linear interpolation).

Speed: edge encode (ONNX Runtime: analysis, entropy graph, range coding) and
cloud decode (PyTorch: entropy decoding + synthesis; latent decoder separately)
on a 768x576 vtest frame.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np

from latentcast.tools.eval.metrics import psnr

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """This benchmark's options (``latentcast bench codec`` and ``python -m latentcast.tools.bench.codec``)."""
    p.add_argument("--weights", help="codec weights (.safetensors); default: the shipped elic-lite")
    p.add_argument("--bundle", help="edge bundle folder; default: the shipped one")
    from latentcast.tools.options import add_encoder_options

    add_encoder_options(p)
    p.add_argument("--kodak", type=int, default=24, help="number of Kodak images (default all 24)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", default="results/codec_bench.json",
                   help="JSON result path, a .md table is written beside it (default results/codec_bench.json)")
    return p


def classical(img_rgb: np.ndarray, kind: str, quality: int) -> tuple[int, np.ndarray]:
    import cv2

    bgr = img_rgb[:, :, ::-1]
    flag = cv2.IMWRITE_JPEG_QUALITY if kind == "jpeg" else cv2.IMWRITE_WEBP_QUALITY
    ok, buf = cv2.imencode(".jpg" if kind == "jpeg" else ".webp", bgr, [flag, quality])
    if not ok:
        raise RuntimeError(f"OpenCV cannot encode {kind}")
    dec = cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]
    return len(buf), dec


def bpp_at_psnr(points: list[tuple[float, float]], target: float) -> float | None:
    """Interpolate bpp (log) at a PSNR from (bpp, psnr) points sorted by bpp; None if out of range."""
    pts = sorted(points)
    for (b0, p0), (b1, p1) in zip(pts, pts[1:]):
        if min(p0, p1) <= target <= max(p0, p1) and p1 != p0:
            t = (target - p0) / (p1 - p0)
            return float(np.exp(np.log(b0) + t * (np.log(b1) - np.log(b0))))
    return None


def center_roi(w: int, h: int, frac: float = 0.2):
    from latentcast.proto.bitstream import Roi

    s = frac**0.5
    bw, bh = int(w * s), int(h * s)
    x0, y0 = (w - bw) // 2, (h - bh) // 2
    return Roi(x0=x0, y0=y0, x1=x0 + bw, y1=y0 + bh, label_id=0)


def _f(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def markdown(result: dict) -> str:
    """The benchmark as markdown tables (for the model card and the README)."""
    lines = [
        f"Kodak ({result['kodak_images']} images), codec {result['codec']['name']} "
        f"({result['codec']['weights_hash']}), commit {result['commit'][:10]}",
        "",
        "| rate point | bpp | PSNR dB | JPEG bpp at same PSNR | WebP bpp at same PSNR | ROI-only bpp | ROI/full bytes "
        "| PSNR in ROI (ROI-only) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rate_points"]:
        lines.append(
            f"| {r['rate_point']} | {r['bpp']:.3f} | {r['psnr']:.2f} | {_f(r['jpeg_bpp_at_same_psnr'], '.3f')} | "
            f"{_f(r['webp_bpp_at_same_psnr'], '.3f')} | {r['bpp_roi']:.3f} | {r['roi_ratio']:.2f} | "
            f"{r['psnr_roi_inside']:.2f} |"
        )
    lines += ["", "| codec | quality | bpp | PSNR dB |", "|---|---|---|---|"]
    for kind, pts in result["classical"].items():
        for p in pts:
            lines.append(f"| {kind} | {p['quality']} | {p['bpp']:.3f} | {p['psnr']:.2f} |")
    lines += [
        "",
        "768x576 vtest frame, seconds (median of 5):",
        "",
        "| rate point | bpp | edge encode (ONNX Runtime) | of which analysis / entropy graph / range coding "
        "| cloud decode (PyTorch) |",
        "|---|---|---|---|---|",
    ]
    for k, t in result["timing_768x576_seconds_median_of_5"].items():
        lines.append(
            f"| {k.rsplit('_', 1)[-1]} | {t['bpp']:.3f} | {t['encode_total']:.3f} | {t['analysis']:.3f} / "
            f"{t['entropy_graph']:.3f} / {t['range_coding']:.3f} | {t['decode_latent'] + t['latent_decoder']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(args) -> int:
    import cv2
    import torch

    from latentcast.edge.encoder import EdgeEncoder
    from latentcast.models.codec import LatentCodec
    from latentcast.proto.bitstream import Packet, SectionKind
    from latentcast.shared import shared_path
    from latentcast.tools.provenance import command, commit, machine, write_results

    torch.set_num_threads(args.threads)
    codec = LatentCodec.load(args.weights or "elic-lite")
    enc = EdgeEncoder(bundle=args.bundle, analysis=args.analysis, rdoq=args.rdoq)
    if enc.weights_hash != codec.weights_hash:
        raise SystemExit("error: the edge bundle was exported from other weights; run `latentcast export edge`")
    space = codec.latent_space()
    kodak = sorted(shared_path("data", "images", "kodak").glob("kodim*.png"))[: args.kodak]
    nq = codec.n_rates
    per_rate = {q: {"bpp": [], "bpp_roi": [], "roi_ratio": [], "latent_snr": [], "psnr": [], "psnr_roi_inside": []}
                for q in range(nq)}
    ceiling, classical_pts = [], {"jpeg": {}, "webp": {}}
    qualities = [1, 2, 3, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90]
    from tqdm import tqdm

    for path in tqdm(kodak, desc="kodak", unit="img"):
        img = np.ascontiguousarray(cv2.imread(str(path))[:, :, ::-1])
        h, w = img.shape[:2]
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            z_c = space.encode(x)[0].numpy()
        if not codec.latent_space_spec.startswith("pixels"):  # pixel spaces round-trip exactly
            ceiling.append(psnr(codec.latent_to_frame(torch.from_numpy(z_c)[None], w, h), img))
        roi = center_roi(w, h)
        for q in range(nq):
            data = enc.compress(img, rate_point=q)
            rec = codec.decompress(data)
            d = per_rate[q]
            d["bpp"].append(len(data) * 8 / (w * h))
            d["latent_snr"].append(float(10 * np.log10(z_c.var() / np.mean((rec.latent - z_c) ** 2))))
            d["psnr"].append(psnr(rec.frame, img))
            part = enc.compress(img, [roi], rate_point=q)
            d["bpp_roi"].append(len(part) * 8 / (w * h))
            d["roi_ratio"].append(len(part) / len(data))
            rr = codec.decompress(part)
            d["psnr_roi_inside"].append(psnr(rr.frame[roi.y0:roi.y1, roi.x0:roi.x1], img[roi.y0:roi.y1, roi.x0:roi.x1]))
        for kind in classical_pts:
            for qual in qualities:
                n, dec = classical(img, kind, qual)
                classical_pts[kind].setdefault(qual, []).append((n * 8 / (w * h), psnr(dec, img)))

    rates = []
    for q in range(nq):
        d = per_rate[q]
        rates.append({"rate_point": q, **{k: float(np.mean(v)) for k, v in d.items()}})
    cls = {kind: [{"quality": qq, "bpp": float(np.mean([p[0] for p in v])), "psnr": float(np.mean([p[1] for p in v]))}
                  for qq, v in sorted(pts.items())] for kind, pts in classical_pts.items()}
    for r in rates:
        for kind, pts in cls.items():
            b = bpp_at_psnr([(p["bpp"], p["psnr"]) for p in pts], r["psnr"])
            r[f"{kind}_bpp_at_same_psnr"] = b
            r[f"{kind}_bpp_ratio"] = (b / r["bpp"]) if b else None

    # speed on a 768x576 vtest frame (index 0, an evaluation frame)
    cap = cv2.VideoCapture(str(shared_path("data", "video", "vtest.avi")))
    ok, frame = cap.read()
    cap.release()
    frame = np.ascontiguousarray(frame[:, :, ::-1])
    timing = {}
    for q in (0, nq - 1):
        enc.compress(frame, rate_point=q)  # warm-up
        t = {"analysis": [], "entropy_graph": [], "range_coding": [], "encode_total": [], "decode_latent": [],
             "latent_decoder": []}
        for _ in range(5):
            t0 = time.perf_counter()
            y, z = enc.analyze(frame)
            z = enc.z_symbols(z, q)
            t1 = time.perf_counter()
            tx = np.ones(y.shape[1:], bool)
            s, tab = enc.encode_symbols(y, z, rate_point=q, tx_mask=tx)
            t2 = time.perf_counter()
            data = enc._enc.packet(width=768, height=576, rois=(), roi_only=False, rate_point=q, z_sym=z,
                                   y_sym=s, y_table=tab, tx_mask=tx)
            t3 = time.perf_counter()
            lat, _ = codec.decode_latent(Packet.from_bytes(data))
            t4 = time.perf_counter()
            codec.latent_to_frame(lat, 768, 576)
            t5 = time.perf_counter()
            for k, v in zip(t, (t1 - t0, t2 - t1, t3 - t2, t3 - t0, t4 - t3, t5 - t4)):
                t[k].append(v)
        timing[f"rate_point_{q}"] = {k: float(np.median(v)) for k, v in t.items()} | {
            "bytes": len(data), "bpp": len(data) * 8 / (768 * 576),
            "z_bytes": len(Packet.from_bytes(data).sections[SectionKind.Z])}

    result = {
        "command": command(),
        "commit": commit(),
        "machine": machine(),
        "codec": {
            "name": codec.codec_name,
            "weights_hash": codec.weights_hash.hex(),
            "latent_space": codec.latent_space_spec,
        },
        "encoder": {"analysis": enc.analysis, "rdoq": enc.rdoq},
        "kodak_images": len(kodak),
        "latent_space_ceiling_psnr": float(np.mean(ceiling)) if ceiling else None,
        "rate_points": rates,
        "classical": cls,
        "roi": "centered box covering 20% of the frame; roi_ratio = ROI-only packet bytes / full-frame packet bytes",
        "timing_768x576_seconds_median_of_5": timing,
    }
    write_results(args.out, result, markdown(result))
    print(json.dumps({"rate_points": rates, "timing": timing}, indent=2))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise SystemExit(main(add_arguments(argparse.ArgumentParser(prog="python -m latentcast.tools.bench.codec",
                                                               description=__doc__.split("\n")[0])).parse_args()))
