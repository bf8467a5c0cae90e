"""latentcast itself as an evaluation codec: curves for full frames, ROI-only packets and ROIs with a coded background.

::

    clip frames, in order ─► Grounder (the edge's: detector every N frames, tracker in between)
                                  │ ROIs per frame (computed once per clip, shared by all rate points)
    scored frame ─► EdgeEncoder (ONNX Runtime, as on the gateway) ─► packet bytes (real, headers included)
                ─► LatentCodec.decompress (PyTorch, as in the cloud) ─► reconstruction

``mode="full"`` codes every latent cell (the ROI list still goes in the header); ``mode="roi"``
codes only the cells under the grounded ROIs plus the hyper-latent z, exactly as the streaming
edge does; ``mode="roibg"`` codes the ROI cells at one rate point and every other cell at a
coarser one (levels ``q<ROI rate point>/b<background rate point>``, LCF v2 packets). The grounding runs on every frame
of the clip (a camera at its full rate with no frames dropped), so the tracker sees what it would see live.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from latentcast.tools.eval.data import Clip, CodecRun

log = logging.getLogger(__name__)

__all__ = ["GroundingSettings", "LatentcastCodec", "TemporalLatentcastCodec", "MODES", "TEMPORAL_LEVELS",
           "roibg_levels", "parse_roibg_level"]

MODES = ("full", "roi", "roibg")
# temporal sweep: q<rate point of ROI cells>/t<nonzero symbols for a ROI cell to be re-coded>, coarsest first
TEMPORAL_LEVELS = ("q0/t32", "q0/t8", "q0/t1", "q1/t1", "q2/t1")


def roibg_levels(n_rates: int) -> tuple[str, ...]:
    """The default ``roibg`` sweep for a codec with ``n_rates`` rate points: each ROI rate point q >= 1
    with the background one and two rate points coarser (``q<q>/b<q-1>``, ``q<q>/b<q-2>``)."""
    return tuple(f"q{q}/b{b}" for q in range(1, n_rates) for b in sorted({max(q - 2, 0), q - 1}))


def parse_roibg_level(level: str, n_rates: int) -> tuple[int, int]:
    """``q<ROI rate point>/b<background rate point>`` -> (q, b) with 0 <= b <= q < n_rates."""
    try:
        q, b = level.split("/")
        if not (q.startswith("q") and b.startswith("b")):
            raise ValueError
        q, b = int(q[1:]), int(b[1:])
    except ValueError:
        raise ValueError(
            f"roibg level {level!r} is not q<ROI rate point>/b<background rate point>, e.g. q2/b0"
        ) from None
    if not 0 <= b <= q < n_rates:
        raise ValueError(f"roibg level {level!r}: need 0 <= background <= ROI rate point <= {n_rates - 1}")
    return q, b


@dataclass(frozen=True)
class GroundingSettings:
    """How the edge finds ROIs; the defaults are the edge service's (``edge/edge.yaml``)."""

    labels: tuple[str, ...]  # task labels (mapped to detector classes as on the edge)
    every: int = 5  # detector every N frames of a video, tracker in between (images: every image)
    score_threshold: float = 0.3  # detector confidence to keep a box
    margin: int = 8  # pixels added around each box
    max_missed: int = 2  # detector runs a track may go unmatched before it is dropped
    motion: str = "constant-velocity"  # box motion between detector runs


def grounding_rois(clip: Clip, g: GroundingSettings, detector, cache: dict, *, every_frame: bool) -> dict[int, list]:
    """The edge grounding's ROIs for the scored frames of ``clip`` (or every frame), cached in ``cache``."""
    key = (clip.name, clip.n_frames, clip.scored, every_frame)
    if key not in cache:
        from latentcast.edge.grounding import Grounder

        grounder = Grounder(labels=list(g.labels), detector=detector, every=g.every if clip.n_frames > 1 else 1,
                            max_missed=g.max_missed, margin=g.margin, motion=g.motion)
        keep, last = set(clip.scored), (clip.n_frames - 1 if every_frame else max(clip.scored))
        out = {}
        for i, frame in clip.frames():
            r = grounder.update(frame)
            if every_frame or i in keep:
                out[i] = list(r.rois)
            if i >= last:
                break
        cache[key] = out
    return cache[key]


@dataclass
class LatentcastCodec:
    """``run(clip, param)`` -> :class:`CodecRun`; ``mode`` is ``"full"``, ``"roi"`` (``param``: a rate point)
    or ``"roibg"`` (``param``: a level ``q<ROI rate point>/b<background rate point>``)."""

    mode: str
    grounding: GroundingSettings
    encoder: object  # latentcast.edge.encoder.EdgeEncoder (or any FrameCompressor)
    decoder: object  # latentcast.models.codec.LatentCodec
    detector: object  # latentcast.detector.YoloxDetector used for grounding
    param_name: str = "rate_point"
    levels: tuple[str, ...] = ()  # roibg: the levels to sweep (default: roibg_levels(n_rates))
    _rois: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.encoder.weights_hash != self.decoder.weights_hash:
            raise ValueError("the edge bundle was exported from other weights than the decoder's "
                             f"({self.encoder.weights_hash.hex()} vs {self.decoder.weights_hash.hex()}); "
                             "run `latentcast export edge`")
        from latentcast.proto.ids import label_set_hash

        self.name = f"latentcast-{self.mode}"
        self.params = tuple(range(self.decoder.n_rates))
        if self.mode == "roibg":
            self.param_name = "level"
            self.params = tuple(self.levels) or roibg_levels(self.decoder.n_rates)
            for p in self.params:
                parse_roibg_level(p, self.decoder.n_rates)
        self._label_hash = label_set_hash(list(self.grounding.labels))

    def describe(self) -> dict:
        return {"codec": self.decoder.codec_name, "weights_hash": self.decoder.weights_hash.hex(),
                "synthesis": self.decoder.synthesis_name or "the codec's own",
                "latent_space": self.decoder.latent_space_spec, "mode": self.mode,
                "encoder": "edge bundle (ONNX Runtime)", "decoder": "LatentCodec (PyTorch)",
                "rdoq": getattr(self.encoder, "rdoq", None),
                "grounding": {"labels": list(self.grounding.labels), "every": self.grounding.every,
                              "score_threshold": self.grounding.score_threshold, "margin": self.grounding.margin,
                              "max_missed": self.grounding.max_missed, "motion": self.grounding.motion}}

    def rois(self, clip: Clip) -> dict[int, list]:
        """The edge grounding's ROIs for the clip's scored frames (cached per clip)."""
        return grounding_rois(clip, self.grounding, self.detector, self._rois, every_frame=False)

    def run(self, clip: Clip, param: int | str) -> CodecRun:
        if self.mode == "roibg":
            rate_point, background = parse_roibg_level(str(param), self.decoder.n_rates)
        else:
            rate_point, background = int(param), None
        rois = self.rois(clip)
        n_bytes, n_frames, t_enc, t_dec, recon = 0, 0, 0.0, 0.0, {}
        for i, frame in clip.scored_frames():
            t0 = time.perf_counter()
            data = self.encoder.compress(frame, rois[i], rate_point=rate_point, roi_only=self.mode != "full",
                                         label_set_hash=self._label_hash, background=background)
            t1 = time.perf_counter()
            rec = self.decoder.decompress(data)
            t2 = time.perf_counter()
            n_bytes += len(data)
            n_frames += 1
            t_enc += t1 - t0
            t_dec += t2 - t1
            recon[i] = np.ascontiguousarray(rec.frame)
        return CodecRun(bytes=n_bytes, pixels=n_frames * clip.width * clip.height, frames_coded=n_frames, recon=recon,
                        encode_seconds=t_enc, decode_seconds=t_dec)


@dataclass
class TemporalLatentcastCodec:
    """latentcast's temporal mode: the edge's :class:`~latentcast.edge.temporal.TemporalEncoder` over the
    whole clip (keyframes, then ROI cells that changed), decoded in order by the cloud's
    :class:`~latentcast.models.temporal.TemporalDecoder`; every frame is coded and counted, the
    scored ones are rendered. ``param`` is a level ``q<rate point>/t<threshold>``."""

    grounding: GroundingSettings
    encoder: object  # a FrameCompressor with encode_symbols_y_hat (the edge bundle)
    decoder: object  # latentcast.models.codec.LatentCodec
    detector: object
    tables: object  # latentcast.proto.temporal.TemporalTables
    config: object = None  # latentcast.edge.temporal.TemporalConfig (None: the edge's defaults)
    params: tuple[str, ...] = TEMPORAL_LEVELS
    param_name: str = "level"
    name: str = "latentcast-temporal"
    _rois: dict = field(default_factory=dict, repr=False)
    _analysis: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        from latentcast.edge.temporal import TemporalConfig
        from latentcast.proto.ids import label_set_hash

        if self.encoder.weights_hash != self.decoder.weights_hash:
            raise ValueError(
                "the edge bundle was exported from other weights than the decoder's; run `latentcast export edge`"
            )
        self.config = self.config or TemporalConfig(mode="temporal")
        for p in self.params:
            self.level(p)
        self._label_hash = label_set_hash(list(self.grounding.labels))

    def level(self, param: str) -> tuple[int, int]:
        try:
            q, t = param.split("/")
            if not (q.startswith("q") and t.startswith("t")):
                raise ValueError
            return int(q[1:]), int(t[1:])
        except ValueError:
            raise ValueError(f"temporal level {param!r} is not q<rate point>/t<threshold>, e.g. q0/t1") from None

    def describe(self) -> dict:
        import dataclasses

        c = self.config
        return {"codec": self.decoder.codec_name, "weights_hash": self.decoder.weights_hash.hex(), "mode": "temporal",
                "synthesis": self.decoder.synthesis_name or "the codec's own",
                "levels": "q<rate point of ROI cells>/t<nonzero symbols for a ROI cell to be re-coded>",
                "temporal": {k: v for k, v in dataclasses.asdict(c).items() if k not in ("rate_point", "threshold")},
                "tables": dict(self.tables.meta),
                "encoder": "edge bundle (ONNX Runtime) + edge.temporal.TemporalEncoder",
                "rdoq": getattr(self.encoder, "rdoq", None),
                "decoder": "models.temporal.TemporalDecoder (PyTorch)",
                "grounding": {"labels": list(self.grounding.labels), "every": self.grounding.every}}

    def _analyze(self, clip: Clip, i: int, frame: np.ndarray):
        """(y, z) and the seconds g_a took: computed once per frame (the same at every level), timed every time."""
        key = (clip.name, i)
        if key not in self._analysis:
            t0 = time.perf_counter()
            y, z = self.encoder.analyze(frame)
            self._analysis[key] = ((y, z), time.perf_counter() - t0)
        return self._analysis[key]

    def run(self, clip: Clip, param: str) -> CodecRun:
        import dataclasses

        from latentcast.edge.temporal import TemporalEncoder
        from latentcast.models.temporal import TemporalDecoder

        q, t = self.level(param)
        cfg = dataclasses.replace(self.config, rate_point=q, threshold=t, target_kbps=0.0)
        enc = TemporalEncoder(compressor=self.encoder, tables=self.tables, config=cfg, fps=clip.fps)
        dec = TemporalDecoder(codec=self.decoder, tables=self.tables)
        rois = grounding_rois(clip, self.grounding, self.detector, self._rois, every_frame=True)
        keep = set(clip.scored)
        n_bytes, n_frames, t_enc, t_dec, recon = 0, 0, 0.0, 0.0, {}
        for i, frame in clip.frames():
            if i >= clip.n_frames:
                break
            ana, t_ana = self._analyze(clip, i, frame)
            t_enc += t_ana
            t0 = time.perf_counter()
            data = enc.encode(frame, rois[i], label_set_hash=self._label_hash, analysis=ana)
            t1 = time.perf_counter()
            if i in keep:
                recon[i] = np.ascontiguousarray(dec.decompress(data).frame)
            else:
                dec.decode_state(data)
            t2 = time.perf_counter()
            n_bytes += len(data)
            n_frames += 1
            t_enc += t1 - t0
            t_dec += t2 - t1
        log.info("%s %s: %s, decoder %s", self.name, param, enc.counts, dec.counts)
        return CodecRun(bytes=n_bytes, pixels=n_frames * clip.width * clip.height, frames_coded=n_frames, recon=recon,
                        encode_seconds=t_enc, decode_seconds=t_dec)
