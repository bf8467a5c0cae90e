"""Task-aware classical anchors for ``latentcast eval``: x264/x265 told where the objects are.

A user who runs a fixed camera with H.264/H.265 and knows what the analytics care about does not pick plain
CRF: the encoder can be told where the objects are (ROI QP offsets) and a static background can be frozen.
These anchors get the same ROIs latentcast codes, from the edge's :class:`~latentcast.edge.grounding.Grounder`
(detector every N frames, tracker in between) run on every frame of the clip, computed once per clip::

    clip frames, in order ─► Grounder ─► ROIs per frame (shared by every codec and setting here)
    x264-roi, x265-roi   frame ─► rgb24→yuv420p ─► addroi per ROI (qoffset roi_offset), then addroi over the
                         whole frame (qoffset = the level's background offset) ─► AV_FRAME_DATA_REGIONS_OF_INTEREST
                         ─► libx264 / libx265 (the first listed region wins where regions overlap, so ROIs win)
    x265-freeze          frame ─► yuv420p ─► per 16x16 block: under an ROI, or mean |luma - luma last sent|
                         > freeze_threshold grey levels → the new pixels, else the previous frame's
                         reconstruction (the decoder runs in the loop) ─► libx265

Everything else is the plain baselines' (``baselines.py``: ``tune=zerolatency``, CRF, yuv420p, one bitstream
for the whole clip, real bytes, one thread in ``latentcast eval``).

ROI QP (FFmpeg ``libx264.c`` setup_roi, ``libx265.c`` encode_set_roi): a region's qoffset q in [-1, 1] moves
the QP of the blocks it covers by q x 51 (8 bit), per 16x16 macroblock (x264) or per quantization group
(x265: ``qg-size=8`` here, 8x8); adaptive quantization must be on (both encoders' default). ``x264-roi`` /
``x265-roi`` levels are ``<crf>/<ROI offset>/<background offset>``, e.g. ``38/-0.2/0.4`` (ROIs about 10 QP
finer, the background 20 QP coarser); the default sweeps are :data:`ROI_CRFS` x :data:`ROI_OFFSETS`. At CRF 51
the QP is already the largest: only the ROIs change. x265 differs from x264 in one measured way: a positive
background offset also coarsens its ROIs (its rate control answers the offsets frame-wide), so its sweep keeps
the background at 0 and makes the ROIs finer instead.

Freezing (after the BLUE study of static cameras, which froze unchanged background before x264/x265): a
frozen block is replaced by the previous frame's *reconstruction*, so it equals the encoder's reference and its
residual is exactly zero (repeating the previous *source* instead made x265 spend more bytes, not fewer: on a
still scene CRF lowers the QP and refines the reference's quantization error frame after frame). The change
test compares against the luma last sent for the block, so slow drift adds up until it crosses the threshold.
A frozen block shows old content to the detector: the accuracy columns measure that.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from latentcast.tools.eval.baselines import (
    PIX_FMT,
    _check_crf,
    _check_frame,
    _code_video,
    _import_av,
    _number,
    _pad,
    _video_settings,
    open_encoder,
)
from latentcast.tools.eval.data import Clip, CodecRun
from latentcast.tools.eval.learned import GroundingSettings, grounding_rois

log = logging.getLogger(__name__)

__all__ = ["TASK_AWARE", "ROI_CRFS", "ROI_OFFSETS", "RoiVideoCodec", "FreezeVideoCodec", "parse_roi_level",
           "roi_levels", "make_task_aware"]

TASK_AWARE = ("x264-roi", "x265-roi", "x265-freeze")
ROI_CRFS = (51, 47, 44, 41, 38, 33, 28)  # the default CRF sweep of the ROI anchors (coarsest first)
# and their (ROI, background) qoffsets. x264: the ROIs 10 QP finer, the background 10 or 20 QP coarser. x265: a
# positive background offset makes its ROIs coarser too (measured: tests/test_eval_task_aware.py), so its sweep
# keeps the background at the CRF's QP and makes the ROIs 10 or 20 QP finer
ROI_OFFSETS = {"x264": ((-0.2, 0.2), (-0.2, 0.4)), "x265": ((-0.2, 0.0), (-0.4, 0.0))}
FREEZE_BLOCK = 16  # pixels: the freeze test's block (a macroblock)


def parse_roi_level(level: str) -> tuple[float, float, float]:
    """``<crf>/<ROI offset>/<background offset>`` -> (crf, roi, background): crf in 0..51, offsets in [-1, 1]."""
    try:
        crf, roi, bg = str(level).split("/")
        crf_v, roi_v, bg_v = float(crf), float(roi), float(bg)
    except ValueError:
        raise ValueError(f"ROI level {level!r} is not <crf>/<ROI qoffset>/<background qoffset>, e.g. 38/-0.2/0.4") \
            from None
    return (float(_check_crf(crf_v)), float(_number(roi_v, "ROI qoffset", -1.0, 1.0, integer=False)),
            float(_number(bg_v, "background qoffset", -1.0, 1.0, integer=False)))


def roi_levels(codec: str) -> tuple[str, ...]:
    """The default sweep of ``<codec>-roi``: :data:`ROI_CRFS` x its (ROI, background) offsets."""
    return tuple(f"{c:g}/{r:g}/{b:g}" for r, b in ROI_OFFSETS[codec] for c in ROI_CRFS)


class _Grounded:
    """The grounding's ROIs of every frame of a clip, shared by the task-aware codecs (one Grounder pass)."""

    def __init__(self, grounding: GroundingSettings, detector: Any, cache: dict | None = None) -> None:
        self.grounding = grounding
        self.detector = detector
        self._cache = {} if cache is None else cache

    def rois(self, clip: Clip) -> dict[int, list]:
        return grounding_rois(clip, self.grounding, self.detector, self._cache, every_frame=True)

    def describe(self) -> dict:
        g = self.grounding
        return {"labels": list(g.labels), "every": g.every, "score_threshold": g.score_threshold,
                "margin": g.margin, "max_missed": g.max_missed, "motion": g.motion,
                "source": "the edge's Grounder on every frame of the clip (as latentcast-roi)"}


class RoiVideoCodec:
    """x264/x265 with ROI QP offsets from the grounding: ``param`` is a level
    ``<crf>/<ROI offset>/<background offset>``."""

    param_name = "crf/roi/bg"

    def __init__(self, codec: str, grounded: _Grounded, *, params: Sequence[str] | None = None,
                 preset: str = "medium", gop: int | None = None, threads: int = 0) -> None:
        if codec not in ROI_OFFSETS:
            raise ValueError(f"ROI codec {codec!r} is not one of {', '.join(ROI_OFFSETS)}")
        self.name = f"{codec}-roi"
        self.grounded = grounded
        extra = ("qg-size=8",) if codec == "x265" else ()
        self._settings = _video_settings(codec, preset, gop, threads, False, extra)
        self.params = tuple(params) if params else roi_levels(codec)
        for p in self.params:
            parse_roi_level(p)
        av = _import_av()
        if self._settings.encoder not in av.codecs_available:
            raise RuntimeError(f"this PyAV build has no {self._settings.encoder} encoder (pip install av)")

    def _decorate(self, rois: dict[int, list], width: int, height: int, roi: float, bg: float):
        av = _import_av()

        def decorate(i: int, frame):
            graph = av.filter.Graph()
            prev = graph.add_buffer(template=frame)
            regions = [(r.x0, r.y0, r.x1 - r.x0, r.y1 - r.y0, roi) for r in rois.get(i, [])]
            regions.append((0, 0, width, height, bg))  # listed last: the ROIs win where they overlap it
            for x, y, w, h, q in regions:
                f = graph.add("addroi", f"x={x}:y={y}:w={w}:h={h}:qoffset={q:g}")
                prev.link_to(f)
                prev = f
            sink = graph.add("buffersink")
            prev.link_to(sink)
            graph.configure()
            graph.push(frame)
            return graph.pull()

        return decorate

    def run(self, clip: Clip, param: str) -> CodecRun:
        crf, roi, bg = parse_roi_level(param)
        rois = self.grounded.rois(clip)
        return _code_video(clip, self._settings, crf, decorate=self._decorate(rois, clip.width, clip.height, roi, bg))

    def describe(self) -> dict:
        return {**self._settings.describe(),
                "roi_qp": "qoffset x 51 per 16x16 macroblock (x264) / per qg-size 8x8 group (x265), AQ on",
                "side_data": "AV_FRAME_DATA_REGIONS_OF_INTEREST attached per frame by FFmpeg's addroi filter (PyAV)",
                "grounding": self.grounded.describe()}


class FreezeVideoCodec:
    """x265 on frames whose unchanged background blocks repeat the previous encoder input; ``param`` is a CRF."""

    param_name = "crf"
    name = "x265-freeze"
    _default = (51, 47, 44, 41, 38, 33, 28, 23)

    def __init__(self, grounded: _Grounded, *, params: Sequence[float] | None = None,
                 freeze_threshold: float = 6.0, preset: str = "medium", gop: int | None = None,
                 threads: int = 0) -> None:
        self.grounded = grounded
        self.threshold = float(_number(freeze_threshold, "freeze_threshold", 0.0, 255.0, integer=False))
        self._settings = _video_settings("x265", preset, gop, threads, False)
        self.params = tuple(params) if params else self._default
        for p in self.params:
            _check_crf(p)
        _import_av()

    def run(self, clip: Clip, param: float) -> CodecRun:
        """Encode the clip with the decoder in the loop: a frozen block repeats the previous frame's
        reconstruction, so its residual is exactly zero."""
        av = _import_av()
        s = self._settings
        crf = _check_crf(param)
        enc, (cw, ch), (ew, eh) = open_encoder(clip, s, crf)
        dec = av.CodecContext.create(s.decoder, "r")
        dec.thread_count = s.threads
        rois = self.grounded.rois(clip)
        keep = set(clip.scored)
        b = FREEZE_BLOCK
        rows, cols = -(-eh // b), -(-ew // b)
        canvas_y: np.ndarray | None = None  # the source luma last sent, per pixel (what the change test compares)
        ref: np.ndarray | None = None  # the previous reconstruction, I420 (what a frozen block repeats)
        packets: list[bytes] = []
        recon: dict[int, np.ndarray] = {}
        decoded = fresh = blocks = 0
        t_enc = t_dec = 0.0

        def decode(pkts) -> None:
            nonlocal ref, decoded, t_dec
            t0 = time.perf_counter()
            frames = [f for p in pkts for f in dec.decode(av.Packet(p))] if pkts is not None else dec.decode(None)
            for f in frames:
                ref = f.to_ndarray()
                if decoded in keep:
                    recon[decoded] = np.ascontiguousarray(f.to_ndarray(format="rgb24")[:ch, :cw])
                decoded += 1
            t_dec += time.perf_counter() - t0

        for i, rgb in clip.frames():
            _check_frame(clip, i, rgb)
            t0 = time.perf_counter()
            i420 = av.VideoFrame.from_ndarray(_pad(rgb, ew, eh), format="rgb24").reformat(format=PIX_FMT).to_ndarray()
            y = i420[:eh]
            if canvas_y is None or ref is None or ref.shape != i420.shape:
                canvas_y = y.copy()
            else:
                pad = np.zeros((rows * b, cols * b), np.float32)
                pad[:eh, :ew] = np.abs(y.astype(np.int16) - canvas_y.astype(np.int16))
                change = pad.reshape(rows, b, cols, b).mean(axis=(1, 3)) > self.threshold
                for r in rois.get(i, []):  # the task's objects are always sent as they are
                    change[r.y0 // b: -(-r.y1 // b), r.x0 // b: -(-r.x1 // b)] = True
                fresh += int(change.sum())
                blocks += change.size
                keep_y = np.repeat(np.repeat(change, b, 0), b, 1)[:eh, :ew]
                keep_c = np.repeat(np.repeat(change, b // 2, 0), b // 2, 1)[:eh // 2, :ew // 2]
                canvas_y = np.where(keep_y, y, canvas_y)
                out = ref.copy()
                src, dst = i420.reshape(-1), out.reshape(-1)  # I420: Y (eh x ew), then U and V (eh/2 x ew/2)
                n_y, n_c = eh * ew, (eh // 2) * (ew // 2)
                dst[:n_y].reshape(eh, ew)[keep_y] = src[:n_y].reshape(eh, ew)[keep_y]
                for lo in (n_y, n_y + n_c):
                    plane = (eh // 2, ew // 2)
                    dst[lo: lo + n_c].reshape(plane)[keep_c] = src[lo: lo + n_c].reshape(plane)[keep_c]
                i420 = out
            frame = av.VideoFrame.from_ndarray(i420, format=PIX_FMT)
            frame.pts, frame.time_base = i, enc.time_base
            new = [bytes(p) for p in enc.encode(frame)]
            t_enc += time.perf_counter() - t0
            packets += new
            decode(new)  # zerolatency: frame i comes out now, and is the next frame's reference
        t0 = time.perf_counter()
        tail = [bytes(p) for p in enc.encode(None)]
        t_enc += time.perf_counter() - t0
        packets += tail
        decode(tail)
        decode(None)
        if decoded != clip.n_frames:
            raise RuntimeError(f"{clip.name}: the {s.decoder} decoder returned {decoded} frames for {clip.n_frames}")
        log.debug("x265-freeze crf %s on %s: %.1f %% of the blocks refreshed", param, clip.name,
                  100.0 * fresh / max(blocks, 1))
        self.refreshed = fresh / max(blocks, 1)
        return CodecRun(bytes=sum(map(len, packets)), pixels=clip.n_frames * clip.width * clip.height,
                        frames_coded=clip.n_frames, recon=recon, encode_seconds=t_enc, decode_seconds=t_dec)

    def describe(self) -> dict:
        return {**self._settings.describe(), "freeze_threshold": self.threshold, "block": FREEZE_BLOCK,
                "freeze": "a block keeps the previous encoder input unless under an ROI or its mean |luma change| "
                          "against it exceeds freeze_threshold grey levels",
                "grounding": self.grounded.describe()}


def make_task_aware(names: Sequence[str], *, grounding: GroundingSettings, detector: Any, preset: str = "medium",
                    gop: int | None = None, threads: int = 1) -> list:
    """The task-aware anchors by name (:data:`TASK_AWARE`), sharing one grounding pass per clip."""
    grounded = _Grounded(grounding, detector)
    out: list = []
    for n in names:
        if n in ("x264-roi", "x265-roi"):
            out.append(RoiVideoCodec(n.split("-")[0], grounded, preset=preset, gop=gop, threads=threads))
        elif n == "x265-freeze":
            out.append(FreezeVideoCodec(grounded, preset=preset, gop=gop, threads=threads))
        else:
            raise ValueError(f"unknown task-aware codec {n!r}: valid names are {', '.join(TASK_AWARE)}")
    return out
