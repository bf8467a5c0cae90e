"""The edge's temporal encoder: a keyframe, then per frame only the ROI cells that changed (no torch).

::

    frame, ROIs ─► analyze (g_a; P frames: only the cells that changed, edge/change.py) ─► y
                                       ┬─ keyframe due? (start, every refresh_s, scene change, refresh asked)
                                       │     yes ─► compress_key: full intra packet + T{KEY} ─► state = ŷ
                                       └─ no ─► motion: the camera's vector (camera_motion), then a vector
                                                per grounded box (choose_motion); rd: coded cells must pay
                                                for their bits (rd_prune)
                                                ─► proto.temporal.choose_modes(state, y, ROI cells, vectors)
                                                ─► encode_p ─► packet T{P, ref = last frame, key} + Y
                                                ─► state.apply (the same update the cloud makes)
    bytes sent ─► RateController (leaky bucket on target_kbps) ─► level = (rate point and threshold of ROI
                  cells, keyframe rate point, refresh period factor): coarser levels also make keyframes
                  cheaper and rarer

The refresh on request is how the stream recovers from loss: the cloud, missing
a frame's reference, asks over the session's back channel and the next packet is
a keyframe (:meth:`TemporalEncoder.request_refresh`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from latentcast.edge.change import ChangeAnalyzer
from latentcast.edge.config import TemporalConfig
from latentcast.edge.rate_control import TEMPORAL_LEVELS, RateController
from latentcast.proto.bitstream import Roi
from latentcast.proto.grid import transmit_mask
from latentcast.proto.symbols import FrameCompressor
from latentcast.proto.temporal import (
    CODE,
    KIND_KEY,
    KIND_P,
    KIND_P_MC,
    MAX_FRAME_ID,
    Motion,
    TemporalInfo,
    TemporalState,
    TemporalTables,
    box_cells,
    choose_modes,
    choose_motion,
    code_lengths,
    encode_p,
    interior_cells,
    quantize,
    rd_prune,
    search_camera,
)
from latentcast.weights import codec_name_of, weights_path

log = logging.getLogger(__name__)

__all__ = ["TemporalConfig", "RateController", "TemporalEncoder", "LEVELS", "tables_path"]

LEVELS = TEMPORAL_LEVELS  # the temporal rate-control ladder (edge.rate_control)


def tables_path(config: TemporalConfig, bundle: Path) -> Path:
    """``temporal.tables``, or the tables shipped next to the bundle's codec
    (``models/weights/<codec>-temporal.safetensors`` for ``models/weights/<codec>.onnx``)."""
    if config.tables:
        return Path(config.tables)
    return weights_path(codec_name_of(bundle), "temporal-tables", folder=bundle.parent)


class TemporalEncoder:
    """One stream's temporal encoder: ``encode(frame, rois)`` -> packet bytes (a keyframe or a P frame)."""

    def __init__(
        self,
        *,
        compressor: FrameCompressor,
        tables: TemporalTables,
        config: TemporalConfig | None = None,
        fps: float = 10.0,
    ):
        config = TemporalConfig() if config is None else config
        for name in ("key_rate_point", "rate_point", "bg_rate_point"):
            compressor.check_rate(getattr(config, name))
        if tables.M != compressor.M:
            raise ValueError(f"temporal tables are for M={tables.M} latent channels, the codec has {compressor.M}")
        self.compressor, self.tables, self.config, self.fps = compressor, tables, config, float(fps)
        self.steps = list(compressor.rate_deltas)  # floats, or (M,1,1) arrays with channel gains
        self.rate = RateController(target_kbps=config.target_kbps, fps=fps) if config.target_kbps > 0 else None
        self.state: TemporalState | None = None
        self._lengths: tuple[np.ndarray, int] | None = None  # code lengths of the y tables (temporal.rd)
        self.frame_id = 0
        self._since_key = 0
        self._refresh: str | None = "start"
        self.counts = {"key": 0, "p": 0, "p_mc": 0, "scene_change": 0, "refresh_requested": 0, "periodic": 0}
        halo = getattr(compressor, "analysis_halo", None)
        self.change: ChangeAnalyzer | None = None
        if config.change_threshold > 0 and halo is not None:
            stages = getattr(compressor, "analysis_stages", None)
            self.change = ChangeAnalyzer(compressor.analyze, halo=int(halo), threshold=config.change_threshold,
                                         stages=stages, hyper=compressor.hyper_analyze if stages else None,
                                         linear=getattr(compressor, "analysis_linear", None) if stages else None)
        elif config.change_threshold > 0:
            log.info("temporal: the edge bundle does not say its analysis_halo (re-export it with `latentcast "
                     "export edge`): g_a runs on the whole frame every frame")

    def request_refresh(self, reason: str = "requested") -> None:
        """The next packet is a keyframe (the cloud lost a reference, a new subscriber, ...)."""
        if self._refresh is None:
            self._refresh = reason

    def changed_fraction(self, y: np.ndarray, camera: tuple[int, int] = (0, 0)) -> float:
        """Fraction of all cells (ROI or not) whose change against the current latent (moved by the camera's
        vector), quantized with the background step, has at least ``bg_threshold`` nonzero symbols: a cut, or a
        camera move not followed, is near 1."""
        d = np.subtract(y, self.state.moved(camera).y, dtype=np.float64)
        nz = np.count_nonzero(quantize(d, self.steps[self.config.bg_rate_point], 0.0), axis=0)
        return float(np.mean(nz >= self.config.bg_threshold))

    @property
    def level(self) -> tuple[int, int]:
        """(rate point, threshold) of ROI cells in the next P frame."""
        return self._level()[:2]

    def _level(self) -> tuple[int, int, int, int]:
        c = self.config
        if self.rate is None:
            return c.rate_point, c.threshold, c.key_rate_point, 1
        q, t, kq, mult = self.rate.levels[self.rate.level]
        return min(q, self.compressor.n_rates - 1), t, min(kq, c.key_rate_point), mult

    def encode(self, frame: np.ndarray, rois: Sequence[Roi] = (), *, label_set_hash: bytes = b"\0\0\0\0",
               analysis: tuple[np.ndarray, np.ndarray] | None = None) -> bytes:
        """Code the next frame of the stream. ``analysis``: its whole-frame (y, z) if already computed."""
        c = self.config
        h, w = frame.shape[:2]
        fid = self.frame_id
        self.frame_id = (self.frame_id + 1) % (MAX_FRAME_ID + 1)
        rate_point, threshold, key_rate_point, refresh_mult = self._level()
        if self._refresh is None and c.refresh_s > 0 and self._since_key >= c.refresh_s * refresh_mult * self.fps:
            self._refresh = "periodic"
        if analysis is not None:
            y, z = analysis
        elif self.change is not None:
            y, z, _ = self.change.analyze(frame, full=self._refresh is not None)
        else:
            y, z = self.compressor.analyze(frame)
        camera = (0, 0)
        if self._refresh is None and c.camera_motion:
            camera = search_camera(self.state.y, y, step=self.steps[c.bg_rate_point])
        if self._refresh is None and c.scene_change < 1.0 and self.changed_fraction(y, camera) > c.scene_change:
            self._refresh = "scene_change"
            if analysis is None and self.change is not None and not self.change.last_whole:
                y, z, _ = self.change.analyze(frame, full=True)  # a keyframe sends the whole frame's y and z
        if self._refresh is not None:
            reason, self._refresh = self._refresh, None
            key = "refresh_requested" if reason == "requested" else reason
            if key in self.counts:
                self.counts[key] += 1
            info = TemporalInfo(kind=KIND_KEY, frame_id=fid, ref_id=fid, key_id=fid)
            background = None if c.key_background < 0 else min(c.key_background, key_rate_point)
            data, y_hat = self.compressor.compress_key(frame, rate_point=key_rate_point, temporal=info,
                                                       rois=tuple(rois), label_set_hash=label_set_hash,
                                                       analysis=(y, z), background=background)
            self.state = TemporalState.from_key(y_hat, fid)
            self._since_key = 1
            self.counts["key"] += 1
            log.debug("frame %d: keyframe (%s), %d bytes", fid, reason, len(data))
        else:
            boxes = [(r.x0, r.y0, r.x1, r.y1) for r in rois]
            roi = transmit_mask(w, h, boxes, True)
            st = self.state.moved(camera)
            mv = None
            if c.motion and boxes:
                mv = choose_motion(st, y, roi, box_cells(boxes, roi.shape), step=self.steps[rate_point])
            if c.interior_threshold > threshold:  # the task-aware rule: box outlines at the level's threshold
                threshold = np.where(interior_cells(boxes, roi.shape), c.interior_threshold, threshold)
            modes, sym = choose_modes(st, y, roi, step=self.steps[rate_point],
                                      bg_step=self.steps[c.bg_rate_point], threshold=threshold,
                                      bg_threshold=c.bg_threshold, deadzone=c.deadzone, mv=mv)
            if c.rd > 0:
                if self._lengths is None:
                    self._lengths = code_lengths(self.compressor.y_tables)
                modes, sym = rd_prune(st, y, modes, sym, step=self.steps[rate_point], weight=c.rd, tables=self.tables,
                                      lengths=self._lengths, rate_point=rate_point, mv=mv)
            motion = Motion(camera=camera, cells=None if mv is None else np.where((modes == CODE)[None], mv, 0))
            if not motion.moves:
                motion = None  # nothing moved: an ordinary P frame
            info = TemporalInfo(kind=KIND_P if motion is None else KIND_P_MC, frame_id=fid,
                                ref_id=self.state.frame_id, key_id=self.state.key_id, bg_rate_point=c.bg_rate_point)
            yb, crc = encode_p(st, modes, sym, tables=self.tables, y_tables=self.compressor.y_tables,
                               rate_point=rate_point, bg_rate_point=c.bg_rate_point, motion=motion)
            data = self.compressor.p_packet(width=w, height=h, rate_point=rate_point, y_bytes=yb, crc=crc,
                                            temporal=info, label_set_hash=label_set_hash, compact=c.compact_p)
            self.state.apply(modes, sym, step=self.steps[rate_point], bg_step=self.steps[c.bg_rate_point],
                             frame_id=fid, motion=motion)
            self.counts["p_mc"] += int(motion is not None)
            self._since_key += 1
            self.counts["p"] += 1
        if self.rate is not None:
            self.rate.update(len(data))
        return data
