"""Temporal coding in the cloud: the per-stream decoder, and fitting the P-frame entropy model.

::

    packet ─► T section? no  ─► LatentCodec.decompress (an independent frame)
                         yes ─► KEY: LatentCodec.decode_y ─► state = ŷ (background and current), ẑ kept
                                P:   ref == last decoded frame and key == held keyframe?
                                       no  ─► MissingReference (nothing rendered; the cloud asks the edge
                                              for a keyframe over the back channel)
                                       yes ─► proto.temporal.decode_p ─► CRC ─► state.apply
                         ─► g_s(ŷ_state, all cells, ẑ_key) ─► ẑ_c ─► latent decoder ─► frame

Fitting (``latentcast train temporal``): the edge's own decisions
(``proto.temporal.choose_modes`` with the ROIs the edge grounding finds) run
over a video at every rate point; the mode frequencies per context and, per rate
point, context and channel, the Gaussian table that codes the residuals in the
fewest bits are kept, from the training frames only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from latentcast.proto.bitstream import Packet, SectionKind
from latentcast.proto.entropy import TableSet
from latentcast.proto.grid import transmit_mask
from latentcast.proto.temporal import (
    BGCODE, CODE, N_CLASSES, N_GROUP_CTX, N_MODE_CTX, N_RES_CTX, TemporalError, TemporalInfo, TemporalState,
    TemporalTables, choose_modes, decode_p, group_context,
)

from .codec import WEIGHTS_DIR, CodecError, LatentCodec, Reconstruction

log = logging.getLogger(__name__)

__all__ = ["MissingReference", "TemporalDecoder", "fit_tables", "default_tables_path", "is_temporal"]


class MissingReference(TemporalError):
    """A P frame whose reference or keyframe this decoder does not hold: ask for a keyframe."""


def default_tables_path(codec: LatentCodec) -> Path:
    """``models/weights/<codec>-temporal.safetensors`` next to the shipped codec."""
    name = codec.path.stem if codec.path is not None else codec.codec_name
    return WEIGHTS_DIR / f"{name}-temporal.safetensors"


def is_temporal(packet: Packet) -> bool:
    return SectionKind.T in packet.sections


class TemporalDecoder:
    """One stream's decoder: keyframes and P frames in order; refuses what it cannot reconstruct exactly."""

    def __init__(self, *, codec: LatentCodec, tables: TemporalTables):
        if tables.M != codec.M:
            raise ValueError(f"temporal tables are for M={tables.M} channels, the codec has {codec.M}")
        self.codec, self.tables = codec, tables
        self.state: TemporalState | None = None
        self._z: torch.Tensor | None = None
        self._size: tuple[int, int] | None = None
        self.last_coded: np.ndarray | None = None  # (h, w) cells coded in the last packet
        self.counts = {"key": 0, "p": 0, "missing_reference": 0}

    def decode_state(self, packet: Packet | bytes) -> tuple[TemporalInfo, np.ndarray]:
        """Advance the stream's state by one packet; returns its T info and the cells coded in it."""
        packet = packet if isinstance(packet, Packet) else Packet.from_bytes(packet)
        info = TemporalInfo.from_bytes(packet.sections[SectionKind.T])
        hd = packet.header
        if info.is_key:
            y_hat, z_t, tx = self.codec.decode_y(packet)
            self.state = TemporalState.from_key(y_hat[0].numpy(), info.frame_id)
            self._z, self._size = z_t, (hd.width, hd.height)
            self.counts["key"] += 1
            return info, tx
        self.codec.check_packet(packet, sections=(SectionKind.Y,))
        try:
            if self.state is None:
                raise MissingReference(f"frame {info.frame_id} is a P frame and no keyframe has been decoded")
            if self._size != (hd.width, hd.height):
                raise MissingReference(f"frame {info.frame_id} is {hd.width}x{hd.height}, the keyframe "
                                       f"{self._size[0]}x{self._size[1]}")
            self.state.check_next(info)
        except TemporalError as exc:
            self.counts["missing_reference"] += 1
            raise MissingReference(str(exc)) from None
        for q in (hd.rate_point, info.bg_rate_point):
            if q >= self.codec.n_rates:
                raise CodecError(f"P frame rate point {q} out of range 0..{self.codec.n_rates - 1}")
        modes, sym, crc = decode_p(self.state, packet.sections[SectionKind.Y], tables=self.tables,
                                   y_tables=self.codec.y_tables, rate_point=hd.rate_point,
                                   bg_rate_point=info.bg_rate_point)
        if crc != hd.symbol_crc:
            raise CodecError(f"symbol checksum mismatch in P frame {info.frame_id} (decoded {crc:#010x}, packet "
                             f"{hd.symbol_crc:#010x}): frame not rendered")
        steps = self.codec.rate_deltas
        self.state.apply(modes, sym, step=steps[hd.rate_point], bg_step=steps[info.bg_rate_point],
                         frame_id=info.frame_id)
        self.counts["p"] += 1
        return info, (modes == CODE) | (modes == BGCODE)

    def decompress(self, data: bytes | Packet, *, decode_frame: bool = True) -> Reconstruction:
        """Bytes of the next packet -> :class:`Reconstruction` of the stream's current frame."""
        return self.prepare(data)(decode_frame)

    def prepare(self, data: bytes | Packet) -> Callable[[bool], Reconstruction]:
        """Decode the next packet into the state now (packets must come in order); returns
        ``render(decode_frame) -> Reconstruction`` of this frame, from a copy of the state, to run
        later and elsewhere (the cloud's worker threads). ``Reconstruction.mask`` is all cells: every
        cell of the state was transmitted at some point (:attr:`last_coded`: the cells of this packet)."""
        packet = data if isinstance(data, Packet) else Packet.from_bytes(data)
        _, self.last_coded = self.decode_state(packet)
        every = np.ones(self.last_coded.shape, dtype=bool)
        y, z, (w, h), codec = self.state.y.copy(), self._z, self._size, self.codec

        @torch.no_grad()
        def render(decode_frame: bool = True) -> Reconstruction:
            latent = codec.synthesize(torch.from_numpy(y)[None], every, z, width=w, height=h)
            frame = codec.latent_to_frame(latent, w, h) if decode_frame else None
            return Reconstruction(latent=latent[0].numpy(), frame=frame, packet=packet, mask=every)

        return render


# ----------------------------------------------------------------------------- fitting


def _code_lengths(y_tables: TableSet) -> tuple[np.ndarray, int]:
    """(n_tables, 2R+1) bits of each value -R..R under each table (escapes: escape entry + ~2 log2|v| + 1)."""
    R = max(len(f) for f in y_tables.freqs)
    vals = np.arange(-R, R + 1)
    out = np.empty((len(y_tables), vals.size))
    for t, (f, off) in enumerate(zip(y_tables.freqs, y_tables.offsets)):
        bits = -np.log2(f / 65536.0)
        idx = vals - off
        inside = (idx >= 0) & (idx < len(f) - 1)
        esc = bits[-1] + 2 * np.log2(np.abs(vals) + 1) + 1
        out[t] = np.where(inside, bits[np.clip(idx, 0, len(f) - 2)], esc)
    return out, R


def fit_tables(codec: LatentCodec, frames: Iterable[tuple[int, np.ndarray, list]], *, train: Callable[[int], bool],
               key_rate_point: int, bg_rate_point: int = 0, threshold: int = 1, bg_threshold: int = 8,
               progress=None) -> tuple[TemporalTables, dict]:
    """Fit :class:`TemporalTables` on a video: ``frames`` yields (index, RGB frame, ROI boxes in pixels).

    Every rate point runs its own closed loop over all frames (keyframe at the first frame); only
    frames with ``train(index)`` add to the statistics. The class edges are the quartiles of the coded
    cells' residual L1 norm at each rate point; then, per context, class and channel, the Gaussian
    table that codes the residuals in the fewest bits."""
    n_rates, M = codec.n_rates, codec.M
    steps = codec.rate_deltas
    lengths, R = _code_lengths(codec.y_tables)
    mode_counts = np.zeros((N_MODE_CTX, 4), dtype=np.int64)
    cells_by_rate: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(n_rates)]  # (group ctx, symbols)
    states: list[TemporalState | None] = [None] * n_rates
    n_train = 0
    for i, frame, boxes in frames:
        h, w = frame.shape[:2]
        y, z = codec.analyze(frame)
        roi = transmit_mask(w, h, boxes, True)
        use = bool(train(i))
        n_train += use
        for q in range(n_rates):
            if states[q] is None:
                info = TemporalInfo(kind=0, frame_id=i, ref_id=i, key_id=i)
                _, y_hat = codec.compress_key(frame, rate_point=key_rate_point, temporal=info, analysis=(y, z))
                states[q] = TemporalState.from_key(y_hat, i)
                continue
            st = states[q]
            modes, sym = choose_modes(st, y, roi, step=steps[q], bg_step=steps[bg_rate_point], threshold=threshold,
                                      bg_threshold=bg_threshold)
            if use:
                np.add.at(mode_counts, (st.mode_context().ravel(), modes.ravel()), 1)
                for kind, cells in enumerate((modes == CODE, modes == BGCODE)):
                    if cells.any():
                        rq = q if kind == 0 else bg_rate_point
                        cells_by_rate[rq].append((group_context(st, cells, kind, rq),
                                                  np.clip(sym[:, cells], -R, R).astype(np.int16)))
            st.apply(modes, sym, step=steps[q], bg_step=steps[bg_rate_point], frame_id=i)
        if progress is not None:
            progress.update(1)
    class_counts = np.zeros((n_rates * N_GROUP_CTX, N_CLASSES), dtype=np.int64)
    edges = np.zeros((n_rates, N_CLASSES - 1), dtype=np.int64)
    hist = np.zeros((n_rates * N_RES_CTX, M, 2 * R + 1), dtype=np.int64)
    for q, parts in enumerate(cells_by_rate):
        if not parts:
            edges[q] = np.arange(1, N_CLASSES)
            continue
        g = np.concatenate([p[0] for p in parts])
        v = np.concatenate([p[1] for p in parts], axis=1).astype(np.int64)  # (M, n)
        l1 = np.abs(v).sum(0)
        e = np.quantile(l1, np.arange(1, N_CLASSES) / N_CLASSES, method="lower").astype(np.int64) + 1
        edges[q] = np.maximum.accumulate(np.maximum(e, np.arange(1, N_CLASSES)))
        k = np.searchsorted(edges[q], l1, side="right")
        np.add.at(class_counts, (g, k), 1)
        ctx = q * N_RES_CTX + (g - q * N_GROUP_CTX) * N_CLASSES + k
        ch = np.broadcast_to(np.arange(M)[:, None], v.shape)
        np.add.at(hist, (np.broadcast_to(ctx[None], v.shape).ravel(), ch.ravel(), (v + R).ravel()), 1)
    # per (context, channel): the table with the fewest bits; unseen contexts: the channel's best overall
    cost = np.einsum("cmv,tv->cmt", hist.astype(np.float64), lengths)  # (ctx, M, tables)
    best = cost.argmin(-1)
    seen = hist.sum(-1) > 0
    pooled = np.einsum("mv,tv->mt", hist.sum(0).astype(np.float64), lengths).argmin(-1)
    res_scale = np.where(seen, best, pooled[None]).astype(np.int64)
    bits = float(np.take_along_axis(cost, best[..., None], -1).sum())
    stats = {"train_frames": n_train, "residual_symbols": int(hist.sum()), "residual_bits": round(bits),
             "class_edges": edges.tolist(), "mode_counts": mode_counts.tolist()}
    meta = {"key_rate_point": key_rate_point, "bg_rate_point": bg_rate_point, "threshold": threshold,
            "bg_threshold": bg_threshold}
    return TemporalTables.from_counts(mode_counts, class_counts, edges, res_scale, meta=meta), stats


# ----------------------------------------------------------------------------- CLI


def main(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from latentcast.detector import YoloxDetector
    from latentcast.edge.grounding import Grounder
    from latentcast.shared import portable_path, shared_path
    from latentcast.tools import provenance
    from latentcast.tools.eval.data import video_clip

    torch.set_num_threads(a.threads)
    if a.every < 2:
        raise SystemExit(f"error: --every {a.every} must be >= 2 (frames divisible by it are held out)")
    path = Path(a.data)
    if not path.is_file():
        path = shared_path(a.data)
    codec = LatentCodec.load(a.codec)
    clip = video_clip(path, every=a.every, max_frames=a.max_frames)
    grounder = Grounder(labels=[s.strip() for s in a.labels.split(",") if s.strip()],
                        detector=YoloxDetector(score_threshold=0.3), every=5)

    def frames():
        for i, f in clip.frames():
            if a.max_frames is not None and i >= a.max_frames:
                return
            yield i, f, [(r.x0, r.y0, r.x1, r.y1) for r in grounder.update(f).rois]

    t0 = time.time()
    with tqdm(total=clip.n_frames, unit="frame", desc="fit temporal tables") as bar:
        tables, stats = fit_tables(codec, frames(), train=lambda i: i % a.every != 0, key_rate_point=a.key_rate_point,
                                   bg_rate_point=a.bg_rate_point, progress=bar)
    meta = dict(tables.meta, data=portable_path(path), held_out=f"frames with index % {a.every} == 0",
                frames=clip.n_frames, command=provenance.command(), commit=provenance.commit(),
                seconds=round(time.time() - t0, 1), **{k: v for k, v in stats.items() if k != "mode_counts"})
    tables = dataclasses.replace(tables, meta=meta)
    out = Path(a.out) if a.out else default_tables_path(codec)
    tables.save(out, weights_hash=codec.weights_hash)
    print(json.dumps({"out": portable_path(out), **meta}, indent=2))
    return 0
