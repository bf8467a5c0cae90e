"""Hostile-packet benchmark: a good camera's latency while other streams send forged packets.

::

    latentcast bench hostile [--frames 20] [--good-fps 1] [--hostile-streams 2] [--out results/hostile_bench.json]

One :class:`~latentcast.cloud.server.CloudServer` on 127.0.0.1 in this process, with the cloud's
defaults (the shipped codec, YOLOX-nano analytics, one pipeline worker). A good stream sends
``--frames`` real frames of vtest.avi (768x576, coded once up front at ``--rate``) at ``--good-fps``
frames per second; its latency is the time from writing a frame to reading its FrameAnalytics.
Each phase runs it again while ``--hostile-streams`` other streams, each a session at the largest
frame the cloud accepts (``sessions.max_frame_pixels``, 1920x1088), send forged packets as fast as
the cloud takes them (its backpressure paces them):

=============  ===================================================================================
zeros          the probe's packet: a real header, Z and Y sections of 8 zero bytes, CRC recomputed
random         random Z and Y sections (2 KB and 51 KB, the probe's size)
truncated      a real 1920x1088 packet whose Y section is cut to its first quarter
escapes        a Y section of 200,000 escape-coded symbols (a forger's encoder without the escape
               budget and without the decoder's tables; the entropy tests cover the budget itself)
legit-max      real 1920x1088 frames, validly coded: not hostile bytes but the most a session may
               cost per frame; shows what fair scheduling alone gives (no budget check applies)
zeros-no-backoff  the zeros packet with ``pipeline.refused_backoff_max_s`` 0: streams of refused
               frames are read as fast as they come (that lever's effect)
zeros-no-guard the zeros packet with the entropy decoder's budget checks switched off in this
               process (what the decoder did before them): that lever's effect
=============  ===================================================================================

Reported per phase: the good stream's latency p50/p95/max and its ratio to the unloaded p50, the
cloud's answers to the hostile frames (codes, per second), this process's peak RSS (cloud and good
client). The hostile clients run in a separate process at nice 19, started ``--attack-lead-s``
before the good stream: on one machine an attacker competes for the cloud's two cores, and a real
one does not run on the cloud's machine at all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import resource
import statistics
import time
from collections import Counter

import numpy as np

from latentcast.tools import provenance

log = logging.getLogger(__name__)

__all__ = ["HOSTILE_KINDS", "add_arguments", "forge", "main", "markdown", "replace_sections", "run_bench"]

HOSTILE_KINDS = ("zeros", "random", "truncated", "escapes", "legit-max", "zeros-no-backoff", "zeros-no-guard")
MAX_W, MAX_H = 1920, 1088  # the default sessions.max_frame_pixels as a frame
LABELS = ["person", "car"]


def replace_sections(data: bytes, **sections: bytes) -> bytes:
    """``data`` with some sections replaced (by kind name: Z, Y, ...), the packet CRC recomputed: a forgery
    only the decoder can tell."""
    from latentcast.proto.bitstream import Packet, SectionKind

    p = Packet.from_bytes(data)
    secs = dict(p.sections)
    for name, payload in sections.items():
        secs[SectionKind[name]] = payload
    return Packet(header=p.header, sections=secs).to_bytes()


def _escape_section(codec, n_symbols: int) -> bytes:
    """A Y section escape-coding ``n_symbols`` symbols, written without the encoder's escape budget."""
    from latentcast.proto import entropy

    enc = entropy.SymbolEncoder()
    real = entropy.escape_budget
    entropy.escape_budget = lambda symbols: 1 << 62  # the forger's encoder
    try:
        enc.encode(np.full(n_symbols, 60_000, dtype=np.int64), np.zeros(n_symbols, dtype=np.int64), codec.y_tables)
    finally:
        entropy.escape_budget = real
    return enc.to_bytes()


def forge(codec, kind: str, legit_max: bytes, seed: int = 0) -> bytes:
    """One hostile packet of ``kind`` (see the module doc) from a real max-size packet."""
    from latentcast.proto.bitstream import Packet, SectionKind

    rng = np.random.default_rng(seed)
    if kind in ("zeros", "zeros-no-backoff", "zeros-no-guard"):
        return replace_sections(legit_max, Z=b"\0" * 8, Y=b"\0" * 8)
    if kind == "random":
        return replace_sections(legit_max, Z=rng.bytes(2048), Y=rng.bytes(51_200))
    if kind == "truncated":
        y = Packet.from_bytes(legit_max).sections[SectionKind.Y]
        return replace_sections(legit_max, Y=y[: len(y) // 4 // 4 * 4])
    if kind == "escapes":
        return replace_sections(legit_max, Y=_escape_section(codec, 200_000))
    if kind == "legit-max":
        return legit_max
    raise ValueError(f"hostile kind {kind!r} is not one of {', '.join(HOSTILE_KINDS)}")


def _header(codec, camera: str, w: int, h: int):
    from latentcast.proto import latentcast_v1_pb2 as pb

    return pb.EdgeMessage(header=pb.SessionHeader(camera_id=camera, task="bench", labels=LABELS,
                                                  codec_id=codec.codec_id, weights_hash=codec.weights_hash,
                                                  width=w, height=h, fps=0.0, edge_version="bench-hostile"))


def _frame(seq: int, packet: bytes):
    from latentcast.proto import latentcast_v1_pb2 as pb

    return pb.EdgeMessage(frame=pb.FramePacket(seq=seq, capture_ts_us=int(time.time() * 1e6), packet=packet))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


async def _good_stream(stub, codec, packets: list[bytes], w: int, h: int, pace: float,
                       camera: str) -> tuple[list[float], Counter]:
    """Latency (s) of each analysed good frame (write time to FrameAnalytics read time), and the codes
    of the good frames the cloud refused or dropped."""
    call = stub.Stream()
    await call.write(_header(codec, camera, w, h))
    first = await call.read()
    if first.WhichOneof("msg") != "accepted":
        raise RuntimeError(f"the good stream was not accepted: {first}")
    sent: dict[int, float] = {}
    lat: dict[int, float] = {}
    lost: Counter = Counter()

    async def reader():
        while len(lat) + sum(lost.values()) < len(packets):
            msg = await call.read()
            kind = msg.WhichOneof("msg")
            if kind == "result":
                lat[msg.result.seq] = time.monotonic() - sent[msg.result.seq]
            elif kind == "error":
                lost[msg.error.code] += 1

    task = asyncio.create_task(reader())
    t0 = time.monotonic()
    for seq, data in enumerate(packets):
        await asyncio.sleep(max(0.0, t0 + seq / pace - time.monotonic()))
        sent[seq] = time.monotonic()
        await call.write(_frame(seq, data))
    await asyncio.wait_for(task, 600)
    await call.done_writing()
    return [lat[s] for s in sorted(lat)], lost


async def _hostile_stream(stub, header: bytes, packet: bytes, stop: asyncio.Event, codes: Counter) -> int:
    """Send ``packet`` over and over until ``stop``; count the cloud's answers in ``codes``."""
    import grpc

    from latentcast.proto import latentcast_v1_pb2 as pb

    call = stub.Stream()
    await call.write(pb.EdgeMessage.FromString(header))
    sent = 0

    async def reader():
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for msg in call:
                kind = msg.WhichOneof("msg")
                if kind == "error":
                    codes[msg.error.code] += 1
                elif kind == "result":
                    codes["analysed"] += 1

    async def writer():
        nonlocal sent
        while True:
            await call.write(_frame(sent, packet))
            sent += 1

    task = asyncio.create_task(reader())
    wtask = asyncio.create_task(writer())
    await stop.wait()
    if wtask.done() and wtask.exception() is not None:  # the cloud ended the call
        codes[f"stream ended {type(wtask.exception()).__name__}"] += 1
    call.cancel()  # an attacker does not wait for answers: whatever the cloud still holds is dropped
    for t in (wtask, task):
        t.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await t
    return sent


def _attacker(port: int, headers: list[bytes], packet: bytes, stop, out) -> None:
    """The hostile clients, in their own process at the lowest priority (an attacker's CPU is not the
    cloud's: on one machine the attacker competes for its cores, so it yields them): stream until
    ``stop`` (a multiprocessing Event) is set, then put (frames written, answers by code) on ``out``."""
    import grpc

    from latentcast.proto import latentcast_v1_pb2_grpc as pb_grpc

    os.nice(19)

    async def run():
        codes: Counter = Counter()
        done = asyncio.Event()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.LatentcastStub(ch)
            tasks = [asyncio.create_task(_hostile_stream(stub, h, packet, done, codes)) for h in headers]
            await asyncio.to_thread(stop.wait)
            done.set()
            sent = sum(await asyncio.gather(*tasks))
        out.put((sent, dict(codes)))

    asyncio.run(run())


def _summary(lat: list[float], lost: Counter, base_p50: float | None) -> dict:
    p50 = statistics.median(lat) if lat else float("nan")
    return {
        "frames": len(lat),
        "good_lost": dict(lost),
        "p50_s": round(p50, 4),
        "p95_s": round(float(np.percentile(lat, 95)) if lat else float("nan"), 4),
        "max_s": round(max(lat, default=float("nan")), 4),
        "p50_vs_unloaded": None if base_p50 is None else round(p50 / base_p50, 2),
    }


async def run_bench(a: argparse.Namespace) -> dict:
    import cv2
    import grpc

    from latentcast.cloud.config import CloudConfig
    from latentcast.cloud.server import CloudServer
    from latentcast.models.codec import LatentCodec
    from latentcast.proto import entropy
    from latentcast.proto import latentcast_v1_pb2_grpc as pb_grpc
    from latentcast.shared import portable_path, shared_path

    codec = LatentCodec.load(a.weights)
    video = a.video or str(shared_path("data", "video", "vtest.avi"))
    cap = cv2.VideoCapture(video)
    frames = []
    while len(frames) < a.frames:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    if not frames:
        raise SystemExit(f"cannot read frames from {video}")
    h, w = frames[0].shape[:2]
    good = [codec.compress(f, [], rate_point=a.rate) for f in frames]
    big = cv2.resize(frames[0], (MAX_W, MAX_H), interpolation=cv2.INTER_LINEAR)
    legit_max = codec.compress(big, [], rate_point=a.rate)
    kinds = [k for k in a.kinds.split(",") if k]
    for k in kinds:
        if k not in HOSTILE_KINDS:
            raise SystemExit(f"--kinds: {k!r} is not one of {', '.join(HOSTILE_KINDS)}")
    forged = {k: forge(codec, k, legit_max) for k in kinds}

    cfg = CloudConfig()
    cfg.server = dataclasses.replace(cfg.server, host="127.0.0.1", port=0, maintenance_port=-1, metrics_port=-1)
    if a.threads:
        cfg.pipeline = dataclasses.replace(cfg.pipeline, torch_threads=a.threads)
        cfg.analytics = dataclasses.replace(cfg.analytics, threads=a.threads)
    srv = CloudServer(cfg, codec=codec)
    await srv.start()
    await srv.wait_ready(600)
    phases = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.ports[0]}") as ch:
            stub = pb_grpc.LatentcastStub(ch)
            # one warm-up pass (first-call costs of ONNX Runtime and torch), not reported
            await _good_stream(stub, codec, good[:2], w, h, a.good_fps, "warmup")
            t0 = time.monotonic()
            lat, lost = await _good_stream(stub, codec, good, w, h, a.good_fps, "good-unloaded")
            base = statistics.median(lat)
            phases.append({"phase": "unloaded", **_summary(lat, lost, None), "seconds": round(time.monotonic() - t0, 1),
                           "rss_peak_mb": round(_rss_mb(), 1)})
            log.info("unloaded: p50 %.3f s", base)
            ctx = multiprocessing.get_context("spawn")
            for i, kind in enumerate(kinds):
                headers = [_header(codec, f"hostile-{i}-{j}", MAX_W, MAX_H).SerializeToString()
                           for j in range(a.hostile_streams)]
                stop, out = ctx.Event(), ctx.Queue()
                guard = _budget_off(entropy) if kind == "zeros-no-guard" else contextlib.nullcontext()
                pipeline_cfg = srv.config.pipeline
                if kind == "zeros-no-backoff":  # read by the server at every frame: takes effect at once
                    srv.config.pipeline = dataclasses.replace(pipeline_cfg, refused_backoff_max_s=0.0)
                with guard:
                    proc = ctx.Process(target=_attacker, args=(srv.ports[0], headers, forged[kind], stop, out),
                                       daemon=True)
                    proc.start()
                    await asyncio.sleep(a.attack_lead_s)  # the attack is under way before the good stream starts
                    t0 = time.monotonic()
                    lat, lost = await _good_stream(stub, codec, good, w, h, a.good_fps, f"good-{kind}")
                    secs = time.monotonic() - t0
                    stop.set()
                    sent, codes = await asyncio.to_thread(out.get, True, 120)
                    await asyncio.to_thread(proc.join, 30)
                    await asyncio.sleep(1.0)  # let the cloud drop what the cancelled streams left queued
                srv.config.pipeline = pipeline_cfg
                s = _summary(lat, lost, base)
                answered = sum(codes.values())
                phases.append({"phase": kind, **s, "seconds": round(secs, 1), "hostile_streams": a.hostile_streams,
                               "hostile_packet_bytes": len(forged[kind]), "hostile_written": sent,
                               "hostile_outcomes": codes, "hostile_answered_per_s": round(answered / secs, 2),
                               "rss_peak_mb": round(_rss_mb(), 1)})
                log.info("%s: p50 %.3f s (x%.2f), %d hostile frames written, answers %s", kind, s["p50_s"],
                         s["p50_vs_unloaded"], sent, codes)
    finally:
        await srv.stop(1.0)
    return {
        "command": provenance.command(getattr(a, "prog", "latentcast")),
        "commit": provenance.commit(),
        "machine": provenance.machine(),
        "weights": portable_path(a.weights),
        "video": portable_path(video),
        "good_frame": f"{w}x{h}",
        "rate_point": a.rate,
        "pace_fps": a.good_fps,
        "hostile_frame": f"{MAX_W}x{MAX_H}",
        "legit_max_bytes": len(legit_max),
        "pipeline": dataclasses.asdict(cfg.pipeline),
        "phases": phases,
    }


@contextlib.contextmanager
def _budget_off(entropy):
    real = entropy.SymbolDecoder._check_budget
    entropy.SymbolDecoder._check_budget = lambda self: None
    try:
        yield
    finally:
        entropy.SymbolDecoder._check_budget = real


def markdown(r: dict) -> str:
    lines = [
        f"# Hostile packets vs a good stream ({r['good_frame']} at {r['pace_fps']} fps, rate point "
        f"{r['rate_point']}, hostile sessions {r['hostile_frame']})",
        "",
        f"`{r['command']}` at {r['commit']}, {r['machine'].get('cpu', '?')} x{r['machine'].get('cpus')}",
        "",
        "| phase | good p50 s | x unloaded | p95 s | max s | good frames lost | hostile answers/s | hostile answers "
        "| peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in r["phases"]:
        lines.append(
            f"| {p['phase']} | {p['p50_s']} | {p['p50_vs_unloaded'] or 1.0} | {p['p95_s']} | {p['max_s']} "
            f"| {p['good_lost'] or 0} "
            f"| {p.get('hostile_answered_per_s', '-')} | {p.get('hostile_outcomes', '-')} | {p['rss_peak_mb']} |"
        )
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """This benchmark's options (``latentcast bench hostile`` and ``python -m latentcast.tools.bench.hostile``)."""
    add = p.add_argument

    add("--hostile-streams", type=int, default=2, help="streams sending forged packets in each phase (default 2)")
    add("--kinds", default=",".join(HOSTILE_KINDS), help=f"hostile phases, comma-separated from "
                                                         f"{','.join(HOSTILE_KINDS)} (default all)")
    add("--attack-lead-s", type=float, default=3.0, help="seconds the attack runs before the good stream starts "
                                                         "(default 3)")
    add("--frames", type=int, default=20, help="good frames per phase (default 20)")
    add("--good-fps", type=float, default=1.0, help="the good stream's frames per second (default 1)")
    add("--video", default=None, help="the good stream's video (default vtest.avi in the shared folder)")
    add("--rate", type=int, default=1, help="rate point of the good and legit-max frames (default 1)")
    add("--weights", default="elic-lite", help="codec weights (default elic-lite)")
    add("--threads", type=int, default=0, help="torch and YOLOX threads of the cloud (default: the config's)")
    add("--out", default="results/hostile_bench.json", help="JSON result, .md beside it")
    return p


def main(a: argparse.Namespace) -> int:
    a.prog = getattr(a, "prog", "python -m latentcast.tools.bench.hostile")
    r = asyncio.run(run_bench(a))
    out = provenance.write_results(a.out, r, markdown(r))
    print(markdown(r))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="python -m latentcast.tools.bench.hostile", description=__doc__.split("\n")[0])
    add_arguments(ap)
    raise SystemExit(main(ap.parse_args()))
