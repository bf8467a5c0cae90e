"""``latentcast encode``, ``decode`` and ``info``: one packet (.lcf) from an image, an image from a packet, a
packet's contents.

Encoding uses the edge bundle (ONNX Runtime, no torch) when it exists for the weights, else the PyTorch
reference encoder; both write the same packets. Decoding runs the PyTorch codec (the cloud's).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from latentcast.proto.symbols import check_rdoq

log = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "add_encode_arguments", "add_decode_arguments", "add_info_arguments",
           "cmd_encode", "cmd_decode", "cmd_info"]

#: what ``decode -o`` writes: the image formats cv2.imwrite picks by extension (any case)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def _read_image(path: str):
    import cv2
    import numpy as np

    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        cap = cv2.VideoCapture(path)  # a video: its first frame
        ok, img = cap.read()
        cap.release()
        if not ok:
            raise SystemExit(f"error: cannot read an image or video frame from {path!r}")
    return np.ascontiguousarray(img[:, :, ::-1])


def _check_decodable(path: str, w: int, h: int) -> None:
    """Refuse a frame the decoder would refuse before encoding it (the encoder's memory grows with it)."""
    from latentcast.proto import bitstream

    limit = bitstream.MAX_DECODE_PIXELS  # read at call time (one definition, no torch needed)
    if w * h > limit:
        raise SystemExit(f"error: {path!r} is {w}x{h} = {w * h} pixels, more than the decoder limit of "
                         f"{limit} pixels; resize it first")


def _read_packet(path: str) -> bytes:
    """A .lcf file's bytes; a file larger than any packet (MAX_PACKET_BYTES) is refused before it is read."""
    from latentcast.proto.bitstream import MAX_PACKET_BYTES

    too_big = f"more than a packet can be (MAX_PACKET_BYTES={MAX_PACKET_BYTES})"
    try:
        size = os.stat(path).st_size
        if size > MAX_PACKET_BYTES:
            raise SystemExit(f"error: {path!r} is {size} bytes, {too_big}")
        with open(path, "rb") as f:
            data = f.read(MAX_PACKET_BYTES + 1)  # a pipe or device has no size: read one byte past the limit
    except FileNotFoundError:
        raise SystemExit(f"error: {path!r} does not exist") from None
    except OSError as exc:
        raise SystemExit(f"error: cannot read {path!r}: {exc.strerror or exc}") from None
    if len(data) > MAX_PACKET_BYTES:
        raise SystemExit(f"error: {path!r} is {too_big}")
    return data


def _check_output_folder(option: str, path: str) -> None:
    folder = Path(path).parent
    if not folder.is_dir():
        raise SystemExit(f"error: {option} {path!r}: folder {str(folder)!r} "
                         f"{'is not a folder' if folder.exists() else 'does not exist'}")


def _check_image_output(option: str, path: str) -> None:
    ext = Path(path).suffix.lower()
    if ext not in IMAGE_EXTENSIONS:
        what = f"a {ext} file" if ext else "a file without an extension"
        raise SystemExit(f"error: {option} {path!r}: cannot write {what} as an image; "
                         f"use one of {', '.join(IMAGE_EXTENSIONS)}")
    _check_output_folder(option, path)


def _parse_roi(text: str):
    from latentcast.proto.bitstream import MAX_DIM, Roi

    def bad(reason: str) -> argparse.ArgumentTypeError:  # argparse prints "argument --roi: <reason>"
        return argparse.ArgumentTypeError(f"{text!r}: {reason}")

    parts = text.split(",")
    if len(parts) not in (4, 5):
        raise bad("expected x0,y0,x1,y1[,label_id]")
    try:
        v = [int(p) for p in parts]
    except ValueError:
        raise bad("values must be integers") from None
    x0, y0, x1, y1 = v[:4]
    label_id = v[4] if len(v) == 5 else 0
    if min(x0, y0, x1, y1) < 0:
        raise bad("coordinates must be >= 0")
    if max(x0, y0, x1, y1) > MAX_DIM:
        raise bad(f"coordinates must be <= {MAX_DIM}")
    if x1 <= x0:
        raise bad(f"x1 {x1} must be greater than x0 {x0}")
    if y1 <= y0:
        raise bad(f"y1 {y1} must be greater than y0 {y0}")
    if not 0 <= label_id <= 0xFFFF:
        raise bad(f"label_id {label_id} out of range 0..65535")
    try:
        return Roi(x0=x0, y0=y0, x1=x1, y1=y1, label_id=label_id)
    except ValueError as exc:  # anything else the bitstream refuses
        raise bad(str(exc)) from None


def _encoder(weights: str | None, bundle: str | None, analysis: str = "int8", rdoq: float | None = None):
    """The edge bundle if present (or given), g_a in ``analysis``, else the PyTorch reference encoder; both
    choose symbols with λ ``rdoq`` (None: the codec's own)."""
    from latentcast.edge.encoder import EdgeEncoder, default_bundle_dir

    if bundle or (weights is None and (default_bundle_dir() / "manifest.json").is_file()):
        return EdgeEncoder(bundle=bundle, analysis=analysis, rdoq=rdoq)
    from latentcast.models.codec import LatentCodec

    codec = LatentCodec.load(weights or "elic-lite")
    if rdoq is not None:
        codec.rdoq = check_rdoq(rdoq)
    return codec


def cmd_encode(a: argparse.Namespace) -> int:
    from latentcast.proto.bitstream import describe

    img = _read_image(a.image)  # an image, or a video's first frame
    h, w = img.shape[:2]
    _check_decodable(a.image, w, h)
    for r in a.roi:
        if not (0 <= r.x0 < r.x1 <= w and 0 <= r.y0 < r.y1 <= h):
            raise SystemExit(f"error: --roi {r.x0},{r.y0},{r.x1},{r.y1} is outside the {w}x{h} image")
    rois, label_hash = list(a.roi), b"\0\0\0\0"
    if a.labels:
        from latentcast.detector import YoloxDetector
        from latentcast.edge.grounding import Grounder
        from latentcast.proto.ids import label_set_hash

        labels = [t.strip() for t in a.labels.split(",") if t.strip()]
        grounding = Grounder(labels=labels, detector=YoloxDetector(), every=1).update(img)
        for b in grounding.boxes:
            print(f"  {b.label} {b.score:.2f} at {b.x0:.0f},{b.y0:.0f},{b.x1:.0f},{b.y1:.0f}")
        rois += grounding.rois
        label_hash = label_set_hash(labels)
        if not grounding.rois:
            print(f"no {', '.join(labels)} found: only the global prior is coded (use --full for the whole frame)")
    from latentcast.proto.symbols import parse_background

    try:
        background = parse_background(a.background)
    except ValueError as exc:
        raise SystemExit(f"error: --background: {exc}") from None
    roi_only = (bool(rois) or bool(a.labels)) and not a.full
    if background is not None and not roi_only:
        raise SystemExit("error: --background codes the cells outside the ROIs: give --roi or --labels, without --full")
    enc = _encoder(a.weights, a.bundle, a.analysis, a.rdoq)
    try:
        data = enc.compress(img, rois, rate_point=a.rate, roi_only=roi_only, label_set_hash=label_hash,
                            background=background)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    Path(a.output).write_bytes(data)
    d = describe(data)
    mode = "full frame" if not d["roi_only"] else (
        "ROI-only" if background is None else f"ROIs + background at rate point {background}")
    print(f"{a.output}: {len(data)} bytes, {d['bpp']:.4f} bpp, {w}x{h}, rate point {a.rate}, "
          f"{mode} ({len(rois)} ROIs)")
    return 0


def cmd_decode(a: argparse.Namespace) -> int:
    _check_image_output("-o", a.output)  # before the weights are loaded and the packet decoded
    if a.latent:
        _check_output_folder("--latent", a.latent)
    data = _read_packet(a.input)
    import cv2
    import numpy as np

    from latentcast.models.codec import LatentCodec

    codec = LatentCodec.load(a.weights or "elic-lite")
    codec.use_synthesis(a.synthesis)  # as the cloud renders it
    rec = codec.decompress(data, decode_frame=True)
    try:
        written = cv2.imwrite(a.output, rec.frame[:, :, ::-1])
    except cv2.error:
        written = False
    if not written:
        raise SystemExit(f"error: could not write {a.output!r} (cv2.imwrite failed)")
    if a.latent:
        np.save(a.latent, rec.latent)
    print(f"{a.output}: {rec.frame.shape[1]}x{rec.frame.shape[0]}, latent {tuple(rec.latent.shape)}, "
          f"{int(rec.mask.sum())}/{rec.mask.size} latent cells transmitted")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from latentcast.proto.bitstream import Packet, SectionKind, describe

    data = _read_packet(a.input)
    from latentcast.proto.symbols import describe_levels
    from latentcast.proto.temporal import MODES, TemporalInfo

    info = describe(data)
    if info.get("compact"):  # a compact P frame on its own: its stream's keyframe has the codec and frame size
        fid = info.pop("frame_id")
        info["temporal"] = {"kind": "P", "frame_id": fid, "ref_id": (fid - 1) % 2**32, "key_id": info.pop("key_id"),
                            "bg_rate_point": info["bg_rate_point"], "modes": list(MODES)}
        info["note"] = "a compact P frame (LCF v3): codec, weights and frame size are those of its stream's keyframe"
        print(json.dumps(info, indent=2))
        return 0
    packet = Packet.from_bytes(data)
    info["levels"] = describe_levels(packet.header)
    t = packet.sections.get(SectionKind.T)
    if t is not None:
        import dataclasses

        ti = TemporalInfo.from_bytes(t)
        info["temporal"] = {**dataclasses.asdict(ti), "kind": ti.kind_name, "modes": list(MODES)}
    print(json.dumps(info, indent=2))
    return 0


def add_encode_arguments(e: argparse.ArgumentParser) -> None:
    e.add_argument("image")
    e.add_argument("--roi", type=_parse_roi, action="append", default=[],
                   help="x0,y0,x1,y1[,label_id] in pixels; repeatable. With ROIs only their latents are coded")
    e.add_argument("--labels", help="task labels, e.g. person,car: ROIs from the edge grounding (YOLOX-nano "
                                    "in the shared folder); label ids index this list")
    e.add_argument("--full", action="store_true", help="code the whole frame even when ROIs are given")
    e.add_argument("--rate", type=int, default=1,
                   help="rate point, 0 (lowest rate) .. n-1 (elic-lite: 0..2; default 1)")
    e.add_argument("--background", default="none",
                   help="with ROIs: code the cells outside them too, at this coarser rate point 0..RATE "
                        "(ROI-QP; an LCF v2 packet); 'none' (default) sends only the ROIs and z")
    e.add_argument("--weights", help="codec weights (.safetensors); default: the shipped elic-lite")
    e.add_argument("--bundle", help="edge bundle folder (ONNX); default: the shipped one if present")
    from latentcast.tools.options import add_encoder_options

    add_encoder_options(e)
    e.add_argument("-o", "--output", required=True)
    e.set_defaults(func=cmd_encode)


def add_decode_arguments(d: argparse.ArgumentParser) -> None:
    from latentcast.cloud.config import CodecConfig
    from latentcast.tools.options import add_dataclass_options

    d.add_argument("input")
    d.add_argument("-o", "--output", required=True)
    d.add_argument("--latent", help="also save the decoded diffusion latent (.npy)")
    d.add_argument("--weights", help="codec weights (.safetensors); default: the shipped elic-lite")
    add_dataclass_options(d, CodecConfig, include=("synthesis",), help_extra={"synthesis": "(codec.synthesis)"})
    d.set_defaults(func=cmd_decode)


def add_info_arguments(i: argparse.ArgumentParser) -> None:
    i.add_argument("input")
    i.set_defaults(func=cmd_info)
