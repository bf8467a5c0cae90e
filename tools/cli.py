"""The ``latentcast`` command.

::

    latentcast encode IMAGE [--roi x0,y0,x1,y1 ...] [--labels person,car] [--rate 1] [--full] -o OUT.lcf
    latentcast decode IN.lcf -o OUT.png [--latent OUT.npy]
    latentcast info IN.lcf
    latentcast export edge [--weights W.safetensors] --out DIR
    latentcast train codec [--steps N ...]        (stage I + II, resumable; see models/training.py)
    latentcast train temporal [--data V --every 8]  (fit the P-frame entropy model; models/temporal.py)
    latentcast train composer --sd DIR [--steps-1 N --steps-2 M --batch B --crop C --out DIR --resume]
                                                  (ControlNet + adapter, DISCOVER sec. 3.4; models/composer_training.py)
    latentcast release codec CHECKPOINT --out W.safetensors
    latentcast bench codec [--out results/codec_bench.json]
    latentcast bench stream [--streams 1,4,16] [--seconds 20] [--out results/stream_bench.json]
    latentcast bench grounding [--full-random] [--grounding-model DIR]   (seconds per frame, YOLOX vs Grounding DINO)
    latentcast bench temporal [--targets 60,100,200] [--loss 0.01]      (rate control and loss recovery on a video)
    latentcast bench composer [--steps 8,50] [--sd DIR --controlnet DIR] (seconds per frame of each composer)
    latentcast bench hostile [--frames 20] [--hostile-streams 2]        (a good stream's latency beside forged packets)
    latentcast export grounding --model grounding-dino-tiny --labels traffic [--tensorrt] [--out DIR]
    latentcast task new NAME --description TEXT    (task label list from an LLM, once; cached)
    latentcast task show NAME | task list          (label lists: shipped ones and the cache)
    latentcast edge --config edge.yaml [--task NAME]  (edge service; --describe lists every option)
    latentcast cloud --config cloud.yaml           (cloud service; --describe lists every option)
    latentcast token new --name N --role publish --cameras 'gate-*'   (a fresh token and its tokens_file entry)
    latentcast token hash < TOKEN                  (the sha256 line of a token you already have)
    latentcast demo [VIDEO]                        (both on loopback: live line, side-by-side video, summary)
    latentcast eval --data VIDEO|DIR|COCO.json --out DIR   (rate vs mAP/top-1/PSNR/MS-SSIM, BD-rates, plots)

Encoding uses the edge bundle (ONNX Runtime, no torch) when it exists for the
weights, else the PyTorch reference encoder; both write the same packets.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("latentcast")

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


def _encoder(weights: str | None, bundle: str | None):
    """The edge bundle if present (or given), else the PyTorch reference encoder."""
    from latentcast.edge.encoder import EdgeEncoder, default_bundle_dir

    if bundle or (weights is None and (default_bundle_dir() / "manifest.json").is_file()):
        return EdgeEncoder(bundle=bundle)
    from latentcast.models.codec import LatentCodec

    return LatentCodec.load(weights or "elic-lite")


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
    enc = _encoder(a.weights, a.bundle)
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

    info = describe(data)
    packet = Packet.from_bytes(data)
    info["levels"] = describe_levels(packet.header)
    t = packet.sections.get(SectionKind.T)
    if t is not None:
        import dataclasses

        from latentcast.proto.temporal import MODES, TemporalInfo

        ti = TemporalInfo.from_bytes(t)
        info["temporal"] = {**dataclasses.asdict(ti), "kind": "KEY" if ti.is_key else "P", "modes": list(MODES)}
    print(json.dumps(info, indent=2))
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    if a.what == "grounding":
        from latentcast.tools.export_grounding import main as export_grounding_main

        return export_grounding_main(a)
    from latentcast.edge.encoder import default_bundle_dir
    from latentcast.models.codec import LatentCodec
    from latentcast.models.export import export_edge_bundle

    codec = LatentCodec.load(a.weights or "elic-lite")
    out = Path(a.out) if a.out else default_bundle_dir(codec.codec_name)
    print(export_edge_bundle(codec, out))
    return 0


def _pick(value, default):
    return default if value is None else value


def cmd_train(a: argparse.Namespace) -> int:
    if a.what == "composer":
        return _train_composer(a)
    if a.what == "temporal":
        from latentcast.models.temporal import main as train_temporal

        return train_temporal(a)
    from latentcast.models.training import TrainConfig, train

    cfg = TrainConfig(model=a.model, latent_space=a.latent_space, out=_pick(a.out, "checkpoints/elic-lite"),
                      stage1_steps=_pick(a.stage1_steps, 6000), stage2_steps=_pick(a.stage2_steps, 1000),
                      batch=_pick(a.batch, 8), crop=_pick(a.crop, 192), lr=_pick(a.lr, 2e-4), lam=a.lam,
                      threads=a.threads, cache=a.cache or "", init=a.init or "",
                      checkpoint_every=a.checkpoint_every, seed=a.seed, mask_fraction=a.mask_fraction)
    if a.rate_steps:
        try:
            cfg.overrides["rate_steps"] = tuple(int(v) for v in a.rate_steps.split(","))
        except ValueError:
            raise SystemExit(f"error: --rate-steps {a.rate_steps!r}: expected integers, e.g. 14,7,0,-7") from None
    print(train(cfg))
    return 0


def _train_composer(a: argparse.Namespace) -> int:
    from latentcast.models.composer_training import ComposerTrainConfig, train_composer

    d = ComposerTrainConfig()
    lo, hi = d.mask_min, d.mask_max
    if a.mask_range:
        try:
            lo, hi = (float(v) for v in a.mask_range.split(","))
        except ValueError:
            raise SystemExit(f"error: --mask-range {a.mask_range!r}: expected MIN,MAX, e.g. 0,0.5") from None
    cfg = ComposerTrainConfig(
        sd=a.sd, controlnet=a.controlnet or "", codec=a.codec, out=_pick(a.out, d.out), resume=a.resume,
        cache=a.cache or "", stage1_steps=_pick(a.stage1_steps, d.stage1_steps),
        stage2_steps=_pick(a.stage2_steps, d.stage2_steps), batch=_pick(a.batch, d.batch), crop=_pick(a.crop, d.crop),
        lr=_pick(a.lr, d.lr), adapter_lr=_pick(a.adapter_lr, d.adapter_lr), lam_diff=a.lam_diff,
        lam_latent=a.lam_latent, train_gs=a.train_gs, mask_min=lo, mask_max=hi, caption=a.caption, seed=a.seed,
        checkpoint_every=a.checkpoint_every, log_every=a.log_every, device=a.device, precision=a.precision,
        gradient_checkpointing=a.gradient_checkpointing, local_files_only=not a.allow_download, threads=a.threads)
    print(train_composer(cfg))
    return 0


def cmd_release(a: argparse.Namespace) -> int:
    import torch

    from latentcast.models.codec import LatentCodec
    from latentcast.models.elic import ElicCodec, ElicConfig

    state = torch.load(a.checkpoint, map_location="cpu", weights_only=False)
    c = dict(state["codec"])
    c["groups"], c["rate_steps"] = tuple(c["groups"]), tuple(c["rate_steps"])
    model = ElicCodec(ElicConfig(**c))
    model.load_state_dict(state["model"])
    # machine-specific paths (checkpoint folder, cache) stay out of the released file
    train_cfg = {k: v for k, v in (state.get("train") or {}).items() if k not in ("out", "cache", "init")}
    meta = {"train": train_cfg, "step": state.get("step"), "latent_var": state.get("latent_var")}
    if a.rate_points:
        keep = [int(v) for v in a.rate_points.split(",")]
        meta["trained_rate_steps"] = list(model.cfg.rate_steps)
        model.select_rate_points(keep)
        meta["released_rate_points"] = keep
    space = state["train"]["latent_space"]
    LatentCodec.save(model, a.out, latent_space=space, meta=meta)
    if not a.no_calibrate:
        from latentcast.models.training import calibrate_table_offsets, calibration_images

        codec = LatentCodec.from_file(a.out)
        meta["table_offsets_calibrated"] = calibrate_table_offsets(codec, calibration_images())
        LatentCodec.save(codec.model, a.out, latent_space=space, meta=meta)
    print(f"{a.out}: weights hash {LatentCodec.from_file(a.out).weights_hash.hex()}")
    return 0


def _print_config(cls, prefix: str) -> int:
    from latentcast.config import describe_config

    for key, var, default, comment in describe_config(cls, prefix):
        print(f"{key} = {default!r}   [{var}]\n    {comment}")
    return 0


def cmd_edge(a: argparse.Namespace) -> int:
    import asyncio
    import signal

    from latentcast.edge.app import EdgeApp
    from latentcast.edge.client import FatalStreamError, GaveUpError
    from latentcast.edge.config import ENV_PREFIX, EdgeConfig, load_edge_config

    if a.describe:
        return _print_config(EdgeConfig, ENV_PREFIX)
    cfg = load_edge_config(a.config)
    if a.source:
        cfg.source.uri = a.source
    if a.task:  # the task's label list (user cache, then shipped) replaces grounding.labels
        cfg.grounding.use_task(a.task)
    if not cfg.source.uri:
        raise SystemExit("error: no source: set source.uri in the config, LATENTCAST_EDGE__SOURCE__URI, or --source")
    app = EdgeApp(cfg)  # resolves the task list: an unknown task is an error before anything starts

    async def run() -> dict:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await app.run(max_frames=a.max_frames, stop=stop)

    try:
        stats = asyncio.run(run())
    except (FatalStreamError, GaveUpError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(stats, indent=2))
    return 0


def cmd_cloud(a: argparse.Namespace) -> int:
    import asyncio

    from latentcast.cloud.config import ENV_PREFIX, CloudConfig, ConfigError, load_cloud_config
    from latentcast.cloud.server import CloudServer

    if a.describe:
        return _print_config(CloudConfig, ENV_PREFIX)
    try:
        asyncio.run(CloudServer(load_cloud_config(a.config)).serve_forever())
    except (ConfigError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_token(a: argparse.Namespace) -> int:
    import yaml

    from latentcast.cloud.auth import ROLES, hash_token, new_token

    if a.action == "hash":
        token = sys.stdin.readline().strip()
        if not token or any(c.isspace() for c in token):
            print("error: give the token on stdin, one line without spaces", file=sys.stderr)
            return 2
        print(hash_token(token).hex())
        return 0
    cams = [c.strip() for c in (a.cameras or "").split(",") if c.strip()]
    if not a.name or not cams or a.role not in ROLES:
        print(f"error: token new needs --name, --role ({', '.join(ROLES)}) and --cameras (comma-separated globs, "
              f"e.g. 'gate-*'); got name={a.name!r} role={a.role!r} cameras={a.cameras!r}", file=sys.stderr)
        return 2
    token = new_token()
    entry = yaml.safe_dump([{"name": a.name, "sha256": hash_token(token).hex(), "role": a.role, "cameras": cams}],
                           sort_keys=False).rstrip()
    print(f"# token for {a.name!r}: give it to the client (edge: server.token_file), keep it secret\n{token}\n"
          f"# add under 'tokens:' in the cloud's server.tokens_file (only the hash is stored there)")
    print("\n".join("  " + line for line in entry.splitlines()))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from latentcast.tools.demo import main as demo_main

    return demo_main(a)


def cmd_bench(a: argparse.Namespace) -> int:
    if a.what == "grounding":
        from latentcast.tools.bench_grounding import main as bench_grounding_main

        a.out = a.out or "results/grounding_bench.json"
        a.threads = 2 if a.threads is None else a.threads
        a.model = a.grounding_model
        return bench_grounding_main(a)
    if a.what == "temporal":
        from latentcast.tools.bench_temporal import main as bench_temporal_main

        a.out = a.out or "results/temporal_bench.json"
        a.threads = 2 if a.threads is None else a.threads
        a.labels = a.labels or "person,vehicle,bicycle"
        return bench_temporal_main(a)
    if a.what == "composer":
        from latentcast.tools.bench_composer import main as bench_composer_main

        a.out = a.out or "results/composer_bench.json"
        a.threads = 2 if a.threads is None else a.threads
        a.weights = a.weights or "elic-lite"
        a.rate = 1 if a.rate is None else a.rate
        a.prog = "latentcast"
        return bench_composer_main(a)
    if a.what == "hostile":
        from latentcast.tools.bench_hostile import main as bench_hostile_main

        a.out = a.out or "results/hostile_bench.json"
        a.weights = a.weights or "elic-lite"
        a.rate = 1 if a.rate is None else a.rate
        a.threads = a.threads or 0
        a.prog = "latentcast"
        return bench_hostile_main(a)
    if a.what == "stream":
        from latentcast.tools.bench_stream import main as bench_stream_main

        if a.out is None:
            a.out = "results/stream_bench.json"
        return bench_stream_main(a)
    from latentcast.tools.bench_codec import main as bench_main

    if a.out is None:
        a.out = "results/codec_bench.json"
    if a.threads is None:
        a.threads = 2
    return bench_main(a)


def cmd_eval(a: argparse.Namespace) -> int:
    from latentcast.tools.eval.runner import main as eval_main

    return eval_main(a)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentcast", description="task-aware latent streaming, edge to cloud")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    e = sub.add_parser("encode", help="encode an image (or a video's first frame) into a .lcf packet")
    e.add_argument("image")
    e.add_argument("--roi", type=_parse_roi, action="append", default=[],
                   help="x0,y0,x1,y1[,label_id] in pixels; repeatable. With ROIs only their latents are coded")
    e.add_argument("--labels", help="task labels, e.g. person,car: ROIs from the edge grounding (YOLOX-nano "
                                    "in the shared folder); label ids index this list")
    e.add_argument("--full", action="store_true", help="code the whole frame even when ROIs are given")
    e.add_argument("--rate", type=int, default=1, help="rate point, 0 (lowest rate) .. n-1 (elic-lite: 0..2; default 1)")
    e.add_argument("--background", default="none",
                   help="with ROIs: code the cells outside them too, at this coarser rate point 0..RATE "
                        "(ROI-QP; an LCF v2 packet); 'none' (default) sends only the ROIs and z")
    e.add_argument("--weights", help="codec weights (.safetensors); default: the shipped elic-lite")
    e.add_argument("--bundle", help="edge bundle folder (ONNX); default: the shipped one if present")
    e.add_argument("-o", "--output", required=True)
    e.set_defaults(func=cmd_encode)

    d = sub.add_parser("decode", help="decode a .lcf packet into an image")
    d.add_argument("input")
    d.add_argument("-o", "--output", required=True)
    d.add_argument("--latent", help="also save the decoded diffusion latent (.npy)")
    d.add_argument("--weights", help="codec weights (.safetensors); default: the shipped elic-lite")
    d.set_defaults(func=cmd_decode)

    i = sub.add_parser("info", help="print a packet's header, ROI list, bytes per section and bpp")
    i.add_argument("input")
    i.set_defaults(func=cmd_info)

    x = sub.add_parser("export", help="export ONNX graphs: edge (the codec's encoder bundle) or grounding "
                                      "(Grounding DINO for the open-vocabulary edge backend)")
    x.add_argument("what", choices=["edge", "grounding"])
    x.add_argument("--weights", help="edge: codec weights (.safetensors); default: the shipped elic-lite")
    x.add_argument("--out", help="bundle folder; default: models/weights/<codec>.onnx (edge), "
                                 "grounding/<model>-<task> (grounding)")
    from latentcast.tools.export_grounding import add_arguments as export_grounding_arguments

    export_grounding_arguments(x)
    x.set_defaults(func=cmd_export)

    t = sub.add_parser("train", help="train the codec or the ControlNet composer (stage I then II; resumable), "
                                     "or fit the temporal P-frame entropy model on a video")
    t.add_argument("what", choices=["codec", "composer", "temporal"])
    t.add_argument("--model", default="lite", help="codec: configuration lite, lite-taef2 or paper (default lite)")
    t.add_argument("--out", default=None,
                   help="checkpoint folder (default checkpoints/elic-lite; composer: checkpoints/composer)")
    t.add_argument("--stage1-steps", "--steps-1", dest="stage1_steps", type=int, default=None,
                   help="stage I steps (default: codec 6000, composer 2000)")
    t.add_argument("--stage2-steps", "--steps-2", dest="stage2_steps", type=int, default=None,
                   help="stage II steps (default: codec 1000, composer 500)")
    t.add_argument("--batch", type=int, default=None, help="crops per step (default: codec 8, composer 1)")
    t.add_argument("--crop", type=int, default=None,
                   help="crop size, multiple of 64 (default: codec 192, composer 128; the paper: 512)")
    t.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: codec 2e-4 Adam, composer 1e-5 AdamW for the ControlNet)")
    t.add_argument("--lam", type=float, default=64.0,
                   help="codec: weight of the normalized MSE at quantization step 1 (default 64)")
    t.add_argument("--latent-space", default="pixels:4",
                   help="codec: target space: pixels:4 for lite, taef2 for lite-taef2, sd-vae:<path> for paper")
    t.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    t.add_argument("--cache", help="training-data cache folder (default ~/.cache/latentcast/train-<space>; "
                                   "composer: .../train-images)")
    t.add_argument("--init", help="codec: start from a released codec weight file (e.g. to train the shipped weights longer)")
    t.add_argument("--rate-steps", help="codec: table offsets k_q of the trained rate points, lowest rate first "
                                        "(Δ_q = exp(δ k_q); default 22,14,7,0)")
    t.add_argument("--mask-fraction", type=float, default=0.0,
                   help="codec: share of stage I crops with 0-50 %% of y masked (ROI-only decoding; default 0)")
    t.add_argument("--sd", default="stabilityai/stable-diffusion-2-1-base",
                   help="composer: Stable Diffusion 2.1-base folder or hub id (local cache only unless "
                        "--allow-download), or 'tiny' (random test model)")
    t.add_argument("--controlnet", help="composer: start from a trained ControlNet + adapter folder")
    t.add_argument("--codec", default="elic-lite",
                   help="composer: the codec whose latent conditions it; temporal: the codec it is fitted for "
                        "(shipped name or .safetensors; default elic-lite)")
    t.add_argument("--resume", action="store_true", help="composer: continue from OUT/last.pt if it exists "
                                                         "(without it an existing checkpoint is an error)")
    t.add_argument("--adapter-lr", type=float, default=None, help="composer: adapter learning rate (default 1e-4)")
    t.add_argument("--lam-diff", type=float, default=2.0, help="composer: λ_diff of eq. 4 (default 2)")
    t.add_argument("--lam-latent", type=float, default=1.0,
                   help="composer: weight of ||z_c - ẑ_c||² / var(z_c) when g_s trains (default 1)")
    t.add_argument("--train-gs", action="store_true",
                   help="composer: also train the codec's g_s in stage II (writes OUT/codec.safetensors, new hash)")
    t.add_argument("--mask-range", help="composer: stage II fraction of y cells dropped, MIN,MAX (default 0,0.5)")
    t.add_argument("--caption", default="a photo", help="composer: caption of every training crop (default 'a photo')")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    t.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints (default 200)")
    t.add_argument("--log-every", type=int, default=10,
                   help="composer: steps between history.jsonl lines and progress updates (default 10)")
    t.add_argument("--device", default="auto", help="composer: auto, cpu, cuda, cuda:N (default auto)")
    t.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="composer: mixed precision on CUDA (auto: bf16 if supported, else fp16); the CPU uses fp32")
    t.add_argument("--gradient-checkpointing", action="store_true",
                   help="composer: recompute UNet/ControlNet activations in backward (less GPU memory)")
    t.add_argument("--allow-download", action="store_true", help="composer: let hub ids download (default: cache only)")
    t.add_argument("--data", default="data/video/vtest.avi",
                   help="temporal: video to fit on (relative paths resolve against $LATENTCAST_SHARED, "
                        "default ../shared; default data/video/vtest.avi)")
    t.add_argument("--every", type=int, default=8, help="temporal: frames whose index is divisible by this are held out")
    t.add_argument("--max-frames", type=int, default=None, help="temporal: stop after this many frames")
    t.add_argument("--labels", default="person,vehicle,bicycle", help="temporal: task labels the edge grounds (ROIs)")
    t.add_argument("--key-rate-point", type=int, default=2, help="temporal: rate point of the keyframe (default 2)")
    t.add_argument("--bg-rate-point", type=int, default=0,
                   help="temporal: rate point of background updates (default 0)")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("release", help="freeze a training checkpoint into a codec weight file")
    r.add_argument("what", choices=["codec"])
    r.add_argument("checkpoint")
    r.add_argument("--out", required=True)
    r.add_argument("--rate-points", help="ship only these trained rate points, e.g. 1,2,3 (default: all)")
    r.add_argument("--no-calibrate", action="store_true",
                   help="keep the trained table offsets (default: calibrate them on training images for real bytes)")
    r.set_defaults(func=cmd_release)

    g = sub.add_parser("edge", help="run the edge service: capture, grounding, encoding, stream to the cloud")
    g.add_argument("--config", help="edge YAML config (see edge/edge.yaml); LATENTCAST_EDGE__* variables override it")
    g.add_argument("--source", help="override source.uri (video file, image folder, rtsp:// URL, /dev/videoN)")
    g.add_argument("--task", help="ground this task's label list (latentcast task list: the user cache, then the "
                                  "shipped lists); sets grounding.task and grounding.labels_from_task")
    g.add_argument("--max-frames", type=int, help="stop after this many captured frames")
    g.add_argument("--describe", action="store_true", help="list every config key, its variable and default")
    g.set_defaults(func=cmd_edge)

    from latentcast.tools.task import add_parser as task_parser

    task_parser(sub)

    c = sub.add_parser("cloud", help="run the cloud service: gRPC Stream/Subscribe, health+reflection, /metrics")
    c.add_argument("--config", help="cloud YAML config (see cloud/cloud.yaml); LATENTCAST_CLOUD__* variables override it")
    c.add_argument("--describe", action="store_true", help="list every config key, its variable and default")
    c.set_defaults(func=cmd_cloud)

    k = sub.add_parser("token", help="bearer tokens for the cloud's server.tokens_file: new (random token + its "
                                     "entry) or hash (the sha256 of a token read from stdin)")
    k.add_argument("action", choices=["new", "hash"])
    k.add_argument("--name", help="new: the entry's name (for logs and errors)")
    k.add_argument("--role", default="publish", help="new: publish, subscribe or admin (default publish)")
    k.add_argument("--cameras", help="new: camera id globs it may use, comma-separated (e.g. 'gate-*,lobby')")
    k.set_defaults(func=cmd_token)

    m = sub.add_parser("demo", help="edge + cloud on loopback over a video: live stats, side-by-side video, summary")
    m.add_argument("video", nargs="?", help="video file or URL (default: vtest.avi in the shared folder)")
    m.add_argument("--out", default="demo_out", help="output folder for side_by_side.mp4 and summary.json")
    m.add_argument("--frames", type=int, help="stop after this many captured frames (default: the whole video)")
    m.add_argument("--labels", help="task labels, e.g. person,car (default: the edge config's)")
    m.add_argument("--task", help="ground this task's label list instead of --labels (latentcast task list), as "
                                  "`latentcast edge --task` does")
    m.add_argument("--rate", type=int, help="codec rate point (default: the edge config's, 1)")
    m.add_argument("--pace", choices=["realtime", "none"],
                   help="realtime: frames arrive at the video's fps and a busy edge drops (default); none: every frame")
    m.add_argument("--every", type=int, help="run the detector every N frames, track in between (default 5)")
    m.add_argument("--temporal", action="store_true",
                   help="temporal coding: a keyframe, then only the ROI cells that changed (temporal.enabled)")
    m.add_argument("--target-kbps", type=float, help="temporal coding with rate control at this bitrate")
    m.add_argument("--edge-config", help="edge YAML config (addresses and token are set by the demo)")
    m.add_argument("--cloud-config", help="cloud YAML config (addresses and token are set by the demo)")
    m.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="benchmarks: codec (bpp, PSNR, speed vs JPEG/WebP) or stream (N concurrent "
                                     "streams, edge + cloud on loopback, vs JPEG over gRPC)")
    b.add_argument("what", choices=["codec", "stream", "grounding", "temporal", "composer", "hostile"])
    b.add_argument("--weights", help="codec weights; default: the shipped elic-lite")
    b.add_argument("--kodak", type=int, default=24, help="codec: number of Kodak images (default all 24)")
    b.add_argument("--bundle", help="edge bundle folder; default: the shipped one")
    b.add_argument("--threads", type=int, default=None,
                   help="codec: torch threads (default 2). stream: torch, ONNX Runtime encoder and YOLOX threads on "
                        "edge and cloud (default: leave the libraries' and configs' defaults)")
    b.add_argument("--out", default=None,
                   help="JSON result path, a .md table is written beside it (default results/codec_bench.json, "
                        "results/stream_bench.json)")
    b.add_argument("--streams", default="1,4,16",
                   help="stream: concurrent camera streams per configuration, comma-separated (default 1,4,16)")
    b.add_argument("--seconds", type=float, default=20.0,
                   help="stream: duration of each (system, streams) configuration in seconds (default 20)")
    b.add_argument("--warmup", type=float, default=2.0,
                   help="stream: first seconds of each configuration not counted in rates and latency (default 2)")
    b.add_argument("--pace", type=float, default=10.0,
                   help="stream: frames per second per camera, realtime pacing (default 10)")
    b.add_argument("--jpeg-quality", type=int, default=75,
                   help="stream: JPEG quality of the JPEG-over-gRPC baseline (default 75)")
    b.add_argument("--systems", default="latentcast,jpeg",
                   help="stream: systems to run, comma-separated from latentcast,jpeg (default both)")
    b.add_argument("--video", help="stream: video every camera reads (default vtest.avi in the shared folder)")
    b.add_argument("--rate", type=int, help="stream: codec rate point of the edges (default: the edge config's, 1)")
    b.add_argument("--labels", help="stream: task labels of the edges, e.g. person,car (default: the edge config's)")
    b.add_argument("--task", help="stream: ground this task's label list instead of --labels (latentcast task list)")
    b.add_argument("--frames", type=int, default=20, help="grounding: timed frames per detector (default 20)")
    b.add_argument("--grounding-model", default=None,
                   help="grounding: a local Grounding DINO folder to time too (default: none on this machine)")
    b.add_argument("--full-random", action="store_true",
                   help="grounding: also time the released architecture (Swin-T + BERT-base) with random weights")
    b.add_argument("--full-frames", type=int, default=5, help="grounding: timed frames for full-size models")
    b.add_argument("--image-size", default="576x768", help="grounding: exported graph input HxW (default 576x768)")
    b.add_argument("--provider", default="cpu", choices=("cpu", "cuda", "tensorrt"),
                   help="grounding: ONNX Runtime execution provider for the Grounding DINO graphs")
    b.add_argument("--targets", default="60,100,200",
                   help="temporal: rate-control targets in kbit/s, comma-separated (default 60,100,200)")
    b.add_argument("--loss", type=float, default=0.01, help="temporal: packet loss of the lossy runs (default 0.01)")
    b.add_argument("--rtt-frames", type=int, default=2,
                   help="temporal: frames until a refresh request reaches the edge (default 2)")
    b.add_argument("--max-frames", type=int, default=None, help="temporal: code only the first N frames")
    b.add_argument("--tables", default=None,
                   help="temporal: P-frame tables (default models/weights/<codec>-temporal.safetensors)")
    from latentcast.tools import bench_composer

    bench_composer.add_arguments(b, prefix="composer: ", skip=bench_composer.COMMON)
    from latentcast.tools import bench_hostile

    bench_hostile.add_arguments(b, prefix="hostile: ", skip=bench_hostile.COMMON)
    b.set_defaults(func=cmd_bench)

    from latentcast.tools.eval.runner import add_arguments as eval_arguments

    v = sub.add_parser("eval", help="rate vs task accuracy (mAP, top-1, PSNR, MS-SSIM, BD-rate) of latentcast and "
                                    "JPEG/WebP/x264/x265/downscaling on a video, image folder or COCO file")
    eval_arguments(v)
    v.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, RuntimeError) as exc:  # bad input, missing files/weights, absent backends
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
