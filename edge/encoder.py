"""The edge's frame encoder: exported ONNX graphs + the numpy entropy coder (no torch).

::

    frame (H,W,3 uint8 RGB) ─► pad to 64 (edge replicate) ─► g_a, h_a ─► y, z ─► z_sym = floor(z/Δz_q + ½)
        g_a, h_a: analysis_stage1..3.int8.onnx, analysis_stage4.onnx, hyper_analysis.onnx (analysis="int8",
        the default, where the bundle has them) or analysis.onnx (float32)
    ROIs ─► proto.grid.coded_cells ─► tx, rate map (ROI cells finer than a coded background) ─┐
    y, z_sym, tx, anchor, rate, rate map, rdoq ─► entropy.onnx (exact integer networks) ─► y_sym, y_table
    ─► proto.symbols.LatentEncoder (range coding, CRC) ─► packet bytes

The bundle is written by ``latentcast export edge`` (``models/export.py``);
its manifest names the codec and the weights hash the packets carry.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latentcast.edge.config import ANALYSIS_PRECISIONS
from latentcast.onnx_runtime import ort_session
from latentcast.proto.entropy import TableSet
from latentcast.proto.grid import anchor_mask, padded_size
from latentcast.proto.ids import EDGE_BUNDLE_FORMATS
from latentcast.proto.symbols import FrameCompressor, LatentEncoder, check_rdoq, codec_rdoq, quantize_z, rate_steps_of
from latentcast.weights import weights_path

log = logging.getLogger(__name__)

__all__ = ["EdgeEncoder", "AnalysisStage", "default_bundle_dir", "run_stages", "to_input"]


@dataclass(frozen=True)
class AnalysisStage:
    """One stage of g_a from the bundle (``models/elic.py: analysis_stages``)."""

    run: Callable[[np.ndarray], np.ndarray]  # (1, C, H, W) float32 -> (1, C', H/2, W/2)
    stride: int  # frame pixels per output position: 2, 4, 8, 16
    reach: int  # frame pixels around an output position's own that its value depends on


def run_stages(stages: tuple[AnalysisStage, ...], x: np.ndarray,
               linear: Callable[[np.ndarray], np.ndarray] | None = None) -> list[np.ndarray]:
    """g_a stage by stage on ``x`` (g_a's input): every stage's output, then y (the last stage's output, plus
    ``linear(x)`` for a codec with a linear path: the bundle's ``analysis_linear``)."""
    out = []
    frame = x
    for st in stages:
        x = st.run(x)
        out.append(x)
    if linear is not None:
        out.append(out[-1] + linear(frame))
    return out


def to_input(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> g_a's input (1, 3, H, W) float32 in [0, 1]."""
    return np.ascontiguousarray(pixels.astype(np.float32).transpose(2, 0, 1)[None] / np.float32(255.0))


def default_bundle_dir(codec: str = "elic-lite") -> Path:
    """The bundle exported from the codec weights shipped in the repository (``<weights>/<codec>.onnx``)."""
    return weights_path(codec, "edge-bundle")


def pad_frame(frame: np.ndarray, pad_to: int = 64) -> np.ndarray:
    """``frame`` padded (edge replicate) to a multiple of ``pad_to``; itself (contiguous) when it already is one."""
    h, w = frame.shape[:2]
    pw, ph = padded_size(w, h, pad_to=pad_to)
    if (pw, ph) == (w, h):
        return np.ascontiguousarray(frame)
    return np.pad(frame, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")


class EdgeEncoder(FrameCompressor):
    """Encodes frames with an edge bundle through ONNX Runtime.

    ``analysis``: ``int8`` runs g_a's stages quantized where the bundle has them (``analysis_int8``: about 2x
    faster, y within 0.04 rms of float32's, whose quantization steps are 1 or more), else float32; ``float32``
    always runs the float graphs. Only the edge runs g_a, so either way the cloud decodes the packets exactly.
    ``rdoq``: λ of the symbols' rate-distortion optimized choice (``proto.symbols.quantize_y``; 0: plain
    rounding; None: the codec's own, ``proto.symbols.codec_rdoq`` of the manifest); bundles exported before it
    round plainly."""

    def __init__(self, *, bundle: Path | str | None = None, threads: int = 0, analysis: str = "int8",
                 rdoq: float | None = None):
        if analysis not in ANALYSIS_PRECISIONS:
            raise ValueError(f"analysis {analysis!r} is not one of {', '.join(ANALYSIS_PRECISIONS)}")
        rdoq = None if rdoq is None else check_rdoq(rdoq)
        self.bundle = Path(bundle) if bundle else default_bundle_dir()
        mpath = self.bundle / "manifest.json"
        if not mpath.is_file():
            raise FileNotFoundError(f"edge bundle manifest {mpath} not found (create it with "
                                    "`latentcast export edge --weights <codec.safetensors> --out <dir>`)")
        self.manifest = json.loads(mpath.read_text())
        if self.manifest.get("format") not in EDGE_BUNDLE_FORMATS:
            raise ValueError(f"{mpath}: unknown bundle format {self.manifest.get('format')!r} (this edge reads "
                             f"{', '.join(EDGE_BUNDLE_FORMATS)}: update latentcast, or re-export the bundle)")
        missing = sorted(n for n in self.manifest.get("files", {}) if not (self.bundle / n).is_file())
        if missing:
            raise FileNotFoundError(f"edge bundle {self.bundle} lacks {', '.join(missing)}, which its manifest "
                                    "lists: re-export it with `latentcast export edge`")
        # every model file the manifest points to must be one it lists (and so was checked above)
        named = [("analysis_linear", self.manifest.get("analysis_linear"))]
        for i, st in enumerate(self.manifest.get("analysis_stages") or []):
            named += [(f"analysis_stages[{i}].{k}", st.get(k)) for k in ("file", "int8")]
        for what, name in named:
            if name and name not in self.manifest.get("files", {}):
                raise ValueError(f"{mpath}: {what} {name!r} is not one of the bundle's files "
                                 f"({', '.join(sorted(self.manifest.get('files', {})))}): re-export the bundle")
        try:
            self.rdoq = codec_rdoq(self.manifest) if rdoq is None else rdoq
        except ValueError as exc:
            raise ValueError(f"{mpath}: {exc}: re-export the bundle") from None
        self._ent = ort_session(self.bundle / "entropy.onnx", threads=threads)
        ent_inputs = {i.name for i in self._ent.get_inputs()}
        self._has_rate_map = "rate_map" in ent_inputs
        self._has_rdoq = "rdoq" in ent_inputs
        if not self._has_rdoq and self.rdoq > 0:
            log.warning("edge bundle %s predates rate-distortion optimized quantization (codec.rdoq %g): its "
                        "symbols are plainly rounded; re-export it with `latentcast export edge`", self.bundle,
                        self.rdoq)
        t = np.load(self.bundle / "tables.npz")
        y_tables = TableSet.from_packed(t["y_packed"], t["y_lengths"], t["y_offsets"])
        z_tables = TableSet.from_packed(t["z_packed"], t["z_lengths"], t["z_offsets"])
        self.weights_hash = bytes.fromhex(self.manifest["weights_hash"])
        self.y_tables = y_tables
        self.n_rates = int(self.manifest["n_rates"])
        self.M = int(self.manifest["M"])
        self.rate_deltas = rate_steps_of(self.manifest["rate_delta"])
        halo = self.manifest.get("analysis_halo")  # bundles exported before it say nothing
        self.analysis_halo: int | None = None if halo is None else int(halo)
        self.analysis_stages: tuple[AnalysisStage, ...] | None = None  # bundles exported before them: None
        self._hyper = None
        stages = self.manifest.get("analysis_stages") or []
        int8 = analysis == "int8" and any("int8" in st for st in stages)
        if analysis == "int8" and not int8:
            log.info("edge bundle %s has no int8 analysis stages (re-export it with `latentcast export edge`): "
                     "g_a runs in float32", self.bundle)
        self.analysis = "int8" if int8 else "float32"  # what g_a runs in
        # a codec with a linear path: y = the last stage's output + analysis_linear's, always through the stages,
        # so that a whole frame and the changed cells (edge/change.py) add the same two numbers
        self.analysis_linear: Callable[[np.ndarray], np.ndarray] | None = None
        if self.manifest.get("analysis_linear"):
            if not stages:
                raise ValueError(f"{mpath}: analysis_linear without analysis_stages: re-export the bundle")
            self.analysis_linear = self._runner(self.bundle / self.manifest["analysis_linear"], threads, "x")
        staged = int8 or self.analysis_linear is not None
        self._ana = None if staged else ort_session(self.bundle / "analysis.onnx", threads=threads)
        if stages:
            self.analysis_stages = tuple(
                AnalysisStage(run=self._runner(self.bundle / st["int8" if int8 and "int8" in st else "file"],
                                               threads, "x"),
                              stride=int(st["stride"]), reach=int(st["reach"])) for st in stages)
            self._hyper = self._runner(self.bundle / self.manifest["hyper_analysis"], threads, "y")
        self._enc = LatentEncoder(groups=self.manifest["groups"], y_tables=y_tables, z_tables=z_tables,
                                  codec_id=int(self.manifest["codec_id"]), weights_hash=self.weights_hash,
                                  latent_space_id=int(self.manifest["latent_space_id"]))

    @staticmethod
    def _runner(path: Path, threads: int, name: str) -> Callable[[np.ndarray], np.ndarray]:
        sess = ort_session(path, threads=threads)
        return lambda x: sess.run(None, {name: np.ascontiguousarray(x)})[0]

    def analyze(self, frame: np.ndarray, *, pad_to: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """g_a, h_a: y (M,h,w) and z (Nz,hz,wz), float32. ``pad_to``: the frame is padded (edge replicate)
        to a multiple of this; 16 for a crop of a padded frame whose y is all that is wanted."""
        x = to_input(pad_frame(frame, pad_to))
        if self._ana is None:
            y = run_stages(self.analysis_stages, x, self.analysis_linear)[-1]
            return y[0], self._hyper(y)[0]
        y, z = self._ana.run(None, {"image": x})
        return y[0], z[0]

    def hyper_analyze(self, y: np.ndarray) -> np.ndarray:
        """h_a alone: z (Nz,hz,wz) of y (M,h,w) (bundles with ``analysis_stages``)."""
        if self._hyper is None:
            raise ValueError(f"edge bundle {self.bundle} predates staged analysis: re-export it with "
                             "`latentcast export edge`")
        return self._hyper(y[None])[0]

    def z_symbols(self, z: np.ndarray, rate_point: int) -> np.ndarray:
        return quantize_z(z, float(self.manifest["rate_zdelta"][rate_point]))

    def _entropy(self, outputs: list[str], y: np.ndarray, z_sym: np.ndarray, rate_point: int,
                 tx_mask: np.ndarray, cell_rate: np.ndarray | None) -> list[np.ndarray]:
        h, w = y.shape[1:]
        feeds = {"y": y[None].astype(np.float32), "z_sym": z_sym[None].astype(np.float32),
                 "tx": tx_mask[None, None], "anchor": anchor_mask(h, w)[None, None],
                 "rate": np.array([rate_point], dtype=np.int64)}
        if self._has_rdoq:
            feeds["rdoq"] = np.array([self.rdoq], dtype=np.float64)
        if self._has_rate_map:
            rmap = np.full((h, w), rate_point, dtype=np.int64) if cell_rate is None else cell_rate.astype(np.int64)
            feeds["rate_map"] = rmap[None, None]
        elif cell_rate is not None and np.any(cell_rate[tx_mask] != rate_point):
            raise ValueError(f"edge bundle {self.bundle} predates coded backgrounds (entropy.onnx has no rate_map "
                             "input): re-export it with `latentcast export edge`")
        return [o[0] for o in self._ent.run(outputs, feeds)]

    def encode_symbols(self, y: np.ndarray, z_sym: np.ndarray, *, rate_point: int,
                       tx_mask: np.ndarray, cell_rate: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        sym, tab = self._entropy(["y_sym", "y_table"], y, z_sym, rate_point, tx_mask, cell_rate)
        return sym.astype(np.int64), tab.astype(np.int64)

    def encode_symbols_y_hat(self, y: np.ndarray, z_sym: np.ndarray, *, rate_point: int,
                             tx_mask: np.ndarray, cell_rate: np.ndarray | None = None
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if "y_hat" not in {o.name for o in self._ent.get_outputs()}:
            raise ValueError(f"edge bundle {self.bundle} predates temporal coding (entropy.onnx has no y_hat "
                             "output): re-export it with `latentcast export edge`")
        sym, tab, y_hat = self._entropy(["y_sym", "y_table", "y_hat"], y, z_sym, rate_point, tx_mask, cell_rate)
        return sym.astype(np.int64), tab.astype(np.int64), y_hat
