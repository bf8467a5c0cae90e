"""Export the edge-side graphs of a codec to ONNX (an "edge bundle").

::

    bundle/
      analysis.onnx   image (1,3,H,W) float32, H,W multiples of 64 ─► y (1,M,H/16,W/16), z (1,Nz,H/64,W/64)
      analysis_stage1..4.onnx  the same g_a cut before each strided conv: x (1,C,H,W) ─► f (1,C',H/2,W/2);
                      hyper_analysis.onnx  y ─► z.  The edge re-runs each stage only where its input
                      changed (edge/change.py); manifest "analysis_stages" says each one's stride and reach
      analysis_stage1..3.int8.onnx  those stages quantized (QDQ: int8 per-channel weights, uint8
                      activations calibrated on training frames), the edge's default (codec.analysis);
                      the last stage, which writes y, stays float (manifest "analysis_int8")
      entropy.onnx    y, z_sym, tx (1,1,h,w) bool, anchor (1,1,h,w) bool, rate (1,) int64 (z's step),
                      rate_map (1,1,h,w) int64 (each cell's rate point: ROIs finer than the background),
                      rdoq (1,) float64 (λ of proto.symbols.quantize_y; 0 = plain rounding)
                        ─► y_sym, y_table (1,M,h,w) int32      exact integer networks (Conv / ConvInteger)
                           y_hat (1,M,h,w) float64               the decoded latent (temporal reference)
      tables.npz      integer probability tables (y: per scale, z: per channel), groups
      manifest.json   codec name and id, weights hash, latent space, rate points, file hashes

``analysis.onnx`` is the float g_a and h_a (torch.onnx export). ``entropy.onnx``
is written node by node from the frozen integer parameters, mirroring
``ElicCodec.entropy_params_loop`` operation for operation: a float32 ``Conv``
for each convolution whose accumulator provably stays below 2**24 (the sum of its
|weights| times the largest input code; all layers of ``elic-lite``), so float32
is exact, and ``ConvInteger`` for any other; float64 for the requantization (all
values are integers or dyadic rationals, so every operation is exact; see
``models/quant.py``). The edge runs this graph on ONNX Runtime's CPU provider only:
a GPU provider may convolve in TF32 or with Winograd, which is not exact. Each
ONNX file carries the codec's weights hash in its metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from latentcast.proto.ids import EDGE_BUNDLE_FORMATS as BUNDLE_FORMATS
from latentcast.proto.symbols import RDOQ_RADIUS, codec_rdoq

from .codec import LatentCodec
from .elic import MEAN_RES, Y_IN_RES, analysis_halo, analysis_stages
from .quant import ACT_MAX, QConv, QSequential

log = logging.getLogger(__name__)

__all__ = ["export_edge_bundle", "OPSET"]

OPSET = 17
IR_VERSION = 8


class _Analysis(torch.nn.Module):
    def __init__(self, codec: LatentCodec):
        super().__init__()
        self.model = codec.model

    def forward(self, x: torch.Tensor):
        y = self.model.analyze(x)  # g_a, plus the linear path of a codec that has one
        return y, self.model.h_a(y)


def float32_conv_is_exact(layer: QConv) -> bool:
    """True when no partial sum of the layer's accumulator can reach 2**24 for uint8 codes: then float32
    arithmetic (any summation order, FMA or not, no Winograd/FFT) gives the exact int32 result."""
    w = layer.w_int.numpy().astype(np.int64)
    max_in = max(int(layer.in_zero), ACT_MAX - int(layer.in_zero))
    return int(np.abs(w).sum(axis=(1, 2, 3)).max()) * max_in < 2**24


class _Graph:
    """A tiny builder over onnx.helper that names things for us."""

    def __init__(self):
        from onnx import TensorProto, helper, numpy_helper

        self.h, self.np_h, self.TP = helper, numpy_helper, TensorProto
        self.nodes: list = []
        self.inits: list = []
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, arr: np.ndarray, base: str = "c") -> str:
        n = self.name(base)
        self.inits.append(self.np_h.from_array(np.asarray(arr), n))
        return n

    def op(self, op_type: str, inputs: list[str], base: str | None = None, **attrs) -> str:
        out = self.name(base or op_type.lower())
        self.nodes.append(self.h.make_node(op_type, inputs, [out], **attrs))
        return out

    def d(self, v: float) -> str:
        return self.const(np.array(v, dtype=np.float64))

    # ---- layers mirroring models/quant.py
    def qconv(self, layer: QConv, codes: str) -> str:
        if not bool(layer.frozen):
            raise ValueError("export needs frozen integer parameters")
        p = layer.kernel // 2
        w_int = layer.w_int.numpy().astype(np.int64)
        if float32_conv_is_exact(layer):
            # every partial sum is an integer below 2**24: a float32 Conv (im2col + SGEMM) is exact, and
            # far faster than ConvInteger on CPU; zero padding of (codes - zp) = ConvInteger's zp padding
            x = self.op("Cast", [self.op("Sub", [codes, self.d(float(layer.in_zero))])], to=self.TP.FLOAT)
            w = self.op("Cast", [self.const(w_int.astype(np.int8), "w")], to=self.TP.FLOAT)  # int8 in the file
            acc = self.op("Conv", [x, w], pads=[p, p, p, p])
        else:
            x8 = self.op("Cast", [codes], to=self.TP.UINT8)
            zp = self.const(np.array(layer.in_zero, dtype=np.uint8), "zp")
            acc = self.op("ConvInteger", [x8, self.const(w_int.astype(np.int8), "w"), zp], pads=[p, p, p, p])
        acc = self.op("Cast", [acc], to=self.TP.DOUBLE)
        mult = self.const(layer.mult.numpy().reshape(1, -1, 1, 1).astype(np.float64), "mult")
        bias = self.const(layer.bias_int.numpy().reshape(1, -1, 1, 1).astype(np.float64), "bias")
        t = self.op("Add", [self.op("Mul", [acc, mult]), bias])
        out = self.op("Floor", [self.op("Mul", [t, self.d(2.0 ** (-int(layer.shift)))])])
        if layer.upsample > 1:
            out = self.op("DepthToSpace", [out], blocksize=layer.upsample, mode="CRD")
        if layer.relu:
            out = self.op("Clip", [out, self.d(0.0), self.d(255.0)])
        return out

    def qseq(self, seq: QSequential, codes: str) -> str:
        for layer in seq:
            codes = self.qconv(layer, codes)
        return codes

    def quantize_input(self, x: str, res: float) -> str:
        v = self.op("Floor", [self.op("Add", [self.op("Mul", [x, self.d(res)]), self.d(0.5)])])
        return self.op("Add", [self.op("Clip", [v, self.d(-128.0), self.d(127.0)]), self.d(128.0)])


def _entropy_graph(codec: LatentCodec):
    from onnx import TensorProto, helper

    m = codec.model
    cfg = m.cfg
    g = _Graph()
    y32 = "y"
    y = g.op("Cast", [y32], to=TensorProto.DOUBLE)
    rate = "rate"
    zdelta = g.op("Reshape", [g.op("Gather", [g.const(m.rate_zdelta.numpy().astype(np.float64)), rate], axis=0),
                              g.const(np.array([1, 1, 1, 1], dtype=np.int64))])
    z = g.op("Mul", [g.op("Cast", ["z_sym"], to=TensorProto.DOUBLE), zdelta])
    # each cell's step and table offset: Gather over the (1,1,h,w) rate map keeps its shape; with channel
    # gains the tables are (n, M): (1,1,h,w,M) -> (1,M,h,w), then each group takes its channels
    def per_cell(table: torch.Tensor) -> str:
        v = g.op("Gather", [g.const(table.numpy().astype(np.float64)), "rate_map"], axis=0)
        if table.dim() == 1:
            return v
        return g.op("Transpose", [g.op("Squeeze", [v, g.const(np.array([1], np.int64))])], perm=[0, 3, 1, 2])

    def group_part(v: str, table: torch.Tensor, start: int, c: int) -> str:
        if table.dim() == 1:
            return v
        return g.op("Slice", [v, g.const(np.array([start], np.int64)), g.const(np.array([start + c], np.int64)),
                              g.const(np.array([1], np.int64))])

    delta_all, kq_all = per_cell(m.rate_delta), per_cell(m.rate_k)
    # rate-distortion optimized quantization (proto.symbols.quantize_y) with the input λ "rdoq"
    lengths = codec.y_tables.code_lengths(RDOQ_RADIUS)
    width = lengths.shape[1]
    lam = "rdoq"
    rdoq_on = g.op("Greater", [lam, g.d(0.0)])
    bits_table = g.const(lengths.ravel(), "code_lengths")

    def rd_cost(sym: str, err: str, table: str) -> str:
        at = g.op("Add", [g.op("Mul", [table, g.d(float(width))]),
                          g.op("Add", [g.op("Clip", [sym, g.d(-float(RDOQ_RADIUS)), g.d(float(RDOQ_RADIUS))]),
                                       g.d(float(RDOQ_RADIUS))])])
        bits = g.op("Gather", [bits_table, g.op("Cast", [at], to=TensorProto.INT64)], axis=0)
        return g.op("Add", [g.op("Mul", [err, err]), g.op("Mul", [lam, bits])])

    def quantize_y(r: str, table: str) -> str:
        lo = g.op("Floor", [r])
        hi = g.op("Add", [lo, g.d(1.0)])
        rd = g.op("Where", [g.op("LessOrEqual", [rd_cost(hi, g.op("Sub", [hi, r]), table),
                                                 rd_cost(lo, g.op("Sub", [r, lo]), table)]), hi, lo])
        return g.op("Where", [rdoq_on, rd, g.op("Floor", [g.op("Add", [r, g.d(0.5)])])])

    H = g.qseq(m.h_s, g.quantize_input(z, 1.0))
    shape_hw = g.op("Slice", [g.op("Shape", [y]), g.const(np.array([2], np.int64)), g.const(np.array([4], np.int64))])
    codes_prev: list[str] = []
    syms, tabs, y_parts = [], [], []
    start = 0
    for k, c in enumerate(cfg.groups):
        yk = g.op("Slice", [y, g.const(np.array([start], np.int64)), g.const(np.array([start + c], np.int64)),
                            g.const(np.array([1], np.int64))])
        delta, kq = group_part(delta_all, m.rate_delta, start, c), group_part(kq_all, m.rate_k, start, c)
        start += c
        ctx = [H]
        if k > 0:
            prev = codes_prev[0] if len(codes_prev) == 1 else g.op("Concat", codes_prev, axis=1)
            ctx.append(g.qseq(m.ch_ctx[k - 1], prev))
        shape = g.op("Concat", [g.const(np.array([1, c], np.int64)), shape_hw], axis=0)
        zeros = g.op("Expand", [g.d(128.0), shape])
        res = {}
        for is_anchor in (True, False):
            sp_in = zeros if is_anchor else res["codes_a"]
            sp = g.qseq(m.sp_ctx[k], sp_in)
            out = g.qseq(m.ep[k], g.op("Concat", ctx + [sp], axis=1))
            mu = g.op("Div", [g.op("Slice", [out, g.const(np.array([0], np.int64)), g.const(np.array([c], np.int64)),
                                             g.const(np.array([1], np.int64))]), g.d(float(MEAN_RES))])
            idx = g.op("Slice", [out, g.const(np.array([c], np.int64)), g.const(np.array([2 * c], np.int64)),
                                 g.const(np.array([1], np.int64))])
            tab = g.op("Clip", [g.op("Sub", [idx, kq]), g.d(0.0), g.d(float(cfg.n_scales - 1))])
            s = quantize_y(g.op("Div", [g.op("Sub", [yk, mu]), delta]), tab)
            yh = g.op("Where", ["tx", g.op("Add", [mu, g.op("Mul", [delta, s])]), mu])
            res["s_a" if is_anchor else "s_n"] = s
            res["t_a" if is_anchor else "t_n"] = tab
            res["y_a" if is_anchor else "y_n"] = yh
            if is_anchor:
                res["codes_a"] = g.op("Where", ["anchor", g.quantize_input(yh, float(Y_IN_RES)), zeros])
        syms.append(g.op("Where", ["anchor", res["s_a"], res["s_n"]]))
        tabs.append(g.op("Where", ["anchor", res["t_a"], res["t_n"]]))
        y_k = g.op("Where", ["anchor", res["y_a"], res["y_n"]])
        y_parts.append(y_k)
        codes_prev.append(g.quantize_input(y_k, float(Y_IN_RES)))
    zero = g.d(0.0)
    sym = g.op("Where", ["tx", g.op("Concat", syms, axis=1) if len(syms) > 1 else syms[0], zero])
    tab = g.op("Where", ["tx", g.op("Concat", tabs, axis=1) if len(tabs) > 1 else tabs[0], zero])
    g.nodes.append(helper.make_node("Cast", [sym], ["y_sym"], to=TensorProto.INT32))
    g.nodes.append(helper.make_node("Cast", [tab], ["y_table"], to=TensorProto.INT32))
    # ŷ (exact dyadic float64): the temporal edge keeps it as its reference latent
    g.nodes.append(helper.make_node("Identity", [g.op("Concat", y_parts, axis=1) if len(y_parts) > 1 else y_parts[0]],
                                    ["y_hat"]))
    inputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cfg.M, "h", "w"]),
        helper.make_tensor_value_info("z_sym", TensorProto.FLOAT, [1, cfg.Nz, "hz", "wz"]),
        helper.make_tensor_value_info("tx", TensorProto.BOOL, [1, 1, "h", "w"]),
        helper.make_tensor_value_info("anchor", TensorProto.BOOL, [1, 1, "h", "w"]),
        helper.make_tensor_value_info("rate", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("rate_map", TensorProto.INT64, [1, 1, "h", "w"]),
        helper.make_tensor_value_info("rdoq", TensorProto.DOUBLE, [1]),  # λ of quantize_y (0: plain rounding)
    ]
    outputs = [
        helper.make_tensor_value_info("y_sym", TensorProto.INT32, [1, cfg.M, "h", "w"]),
        helper.make_tensor_value_info("y_table", TensorProto.INT32, [1, cfg.M, "h", "w"]),
        helper.make_tensor_value_info("y_hat", TensorProto.DOUBLE, [1, cfg.M, "h", "w"]),
    ]
    graph = helper.make_graph(g.nodes, "latentcast_entropy_encoder", inputs, outputs, g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def _int8_stages(codec: LatentCodec, out: Path, stages: list[dict], meta: dict[str, str],
                 calibration: list[np.ndarray] | None) -> list[Path]:
    """Quantize every stage of g_a but the last (which writes y: int8 there tripled y's error for a few ms);
    adds ``"int8"`` to those entries of ``stages``; returns the files written."""
    if calibration is None:
        from .training import calibration_images

        calibration = calibration_images(INT8_CALIBRATION_IMAGES, 512)
    if not calibration:
        raise ValueError("int8 analysis stages need calibration frames and no training images were found in the "
                         "shared data folder: pass calibration frames, or export without int8 (--no-int8)")
    for img in calibration:
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8 or img.shape[0] % 64 or img.shape[1] % 64:
            raise ValueError(f"calibration frames must be (H, W, 3) uint8 with sides multiples of 64, got "
                             f"{img.shape} {img.dtype}")
    written = []
    xs = [torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0 for img in calibration]
    with torch.no_grad():
        for k, (stage, _stride, _reach) in enumerate(analysis_stages(codec.model.g_a)[:-1]):
            src, dst = out / stages[k]["file"], out / stages[k]["file"].replace(".onnx", ".int8.onnx")
            _quantize_stage(src, dst, [x.numpy() for x in xs])
            _stamp(dst, meta)
            written.append(dst)
            stages[k]["int8"] = dst.name
            xs = [stage.eval()(x) for x in xs]  # the float stage's output calibrates the next one
    return written


def _stamp(path: Path, meta: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for k, v in meta.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(model, str(path))


INT8_CALIBRATION_IMAGES = 24  # training images (models.training.calibration_images, 512 px crops) for int8 ranges


def _quantize_stage(src: Path, dst: Path, inputs: list[np.ndarray]) -> None:
    """``src`` (one g_a stage, input ``x``) -> ``dst``: static QDQ quantization, int8 weights per output channel,
    uint8 activations with MinMax ranges over ``inputs`` (deterministic: the same inputs give the same file)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{"x": x} for x in inputs])

        def get_next(self):
            return next(self._it, None)

    def _no_preprocess_hint(record: logging.LogRecord) -> bool:  # the quantizer's advice for image classifiers
        return "pre-processing" not in record.getMessage()

    logging.root.addFilter(_no_preprocess_hint)
    try:
        quantize_static(str(src), str(dst), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    finally:
        logging.root.removeFilter(_no_preprocess_hint)


def export_edge_bundle(codec: LatentCodec, out_dir: Path | str, *, int8: bool = True,
                       calibration: list[np.ndarray] | None = None) -> Path:
    """Write the edge bundle for ``codec`` into ``out_dir``; returns the manifest path.

    ``int8``: also write g_a's stages but the last quantized to int8 (the edge's ``codec.analysis: int8``),
    their activation ranges calibrated on ``calibration`` ((H, W, 3) uint8 RGB frames, sides multiples of 64;
    None: ``INT8_CALIBRATION_IMAGES`` training images from the shared data)."""
    import onnx

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"latentcast.codec": codec.codec_name, "latentcast.codec_id": str(codec.codec_id),
            "latentcast.weights_hash": codec.weights_hash.hex(), "latentcast.latent_space": codec.latent_space_spec}
    ana = out / "analysis.onnx"
    with torch.no_grad():
        torch.onnx.export(_Analysis(codec).eval(), (torch.rand(1, 3, 128, 128),), str(ana), dynamo=False,
                          input_names=["image"], output_names=["y", "z"], opset_version=OPSET,
                          dynamic_axes={"image": {2: "H", 3: "W"}, "y": {2: "h", 3: "w"}, "z": {2: "hz", 3: "wz"}})
    _stamp(ana, meta)
    graphs = [ana]
    stages = []
    with torch.no_grad():
        channels = 3
        for k, (stage, stride, reach) in enumerate(analysis_stages(codec.model.g_a), start=1):
            path = out / f"analysis_stage{k}.onnx"
            x = torch.rand(1, channels, 64, 64)
            channels = stage(x).shape[1]
            torch.onnx.export(stage.eval(), (x,), str(path), dynamo=False, input_names=["x"], output_names=["f"],
                              opset_version=OPSET, dynamic_axes={"x": {2: "H", 3: "W"}, "f": {2: "h", 3: "w"}})
            _stamp(path, meta)
            graphs.append(path)
            stages.append({"file": path.name, "stride": stride, "reach": reach})
        linear = None
        if codec.model.a_lin is not None:  # float32 always: it writes y directly (as the last stage does)
            linear = out / "analysis_linear.onnx"
            torch.onnx.export(codec.model.a_lin.eval(), (torch.rand(1, 3, 64, 64),), str(linear), dynamo=False,
                              input_names=["x"], output_names=["f"], opset_version=OPSET,
                              dynamic_axes={"x": {2: "H", 3: "W"}, "f": {2: "h", 3: "w"}})
            _stamp(linear, meta)
            graphs.append(linear)
        if int8:
            graphs += _int8_stages(codec, out, stages, meta, calibration)
        hyper = out / "hyper_analysis.onnx"
        torch.onnx.export(codec.model.h_a.eval(), (torch.rand(1, channels, 8, 8),), str(hyper), dynamo=False,
                          input_names=["y"], output_names=["z"], opset_version=OPSET,
                          dynamic_axes={"y": {2: "h", 3: "w"}, "z": {2: "hz", 3: "wz"}})
        _stamp(hyper, meta)
        graphs.append(hyper)
    ent = out / "entropy.onnx"
    model = _entropy_graph(codec)
    onnx.checker.check_model(model)
    onnx.save(model, str(ent))
    _stamp(ent, meta)
    yp, yl, yo = codec.y_tables.packed()
    zp, zl, zo = codec.z_tables.packed()
    np.savez(out / "tables.npz", y_packed=yp, y_lengths=yl, y_offsets=yo, z_packed=zp, z_lengths=zl, z_offsets=zo)
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (*graphs, ent, out / "tables.npz")}
    cfg = codec.cfg
    manifest = {  # format 3: entropy.onnx takes rdoq (edges that predate it refuse the bundle)
        "format": BUNDLE_FORMATS[-1],
        "codec": codec.codec_name, "codec_id": codec.codec_id, "weights_hash": codec.weights_hash.hex(),
        "latent_space": codec.latent_space_spec, "latent_space_id": codec.latent_space_id,
        "groups": list(cfg.groups), "M": cfg.M, "Nz": cfg.Nz, "n_rates": codec.n_rates,
        "rate_delta": codec.model.rate_delta.tolist(),  # (n,) or, with channel gains, (n, M)
        "rate_zdelta": [float(v) for v in codec.model.rate_zdelta], "files": files,
        "analysis_halo": analysis_halo(cfg),  # cells around a crop for exact g_a on its inside (edge/change.py)
        "analysis_stages": stages,  # g_a stage by stage, each re-run only where its input changed (edge/change.py)
        "hyper_analysis": hyper.name,  # h_a alone: z of a whole frame analysed stage by stage
        "rdoq": codec_rdoq(codec.meta),  # the λ the edge codes with unless its codec.rdoq says otherwise
    }
    if linear is not None:
        manifest["analysis_linear"] = linear.name  # y = last stage + this, cell by cell (ElicConfig.linear_path)
    if int8:
        manifest["analysis_int8"] = {  # stages[k]["int8"]: the stage in int8 (edge codec.analysis: int8)
            "format": "QDQ, int8 weights per output channel, uint8 activations (MinMax)",
            "calibration": f"{len(calibration) if calibration else INT8_CALIBRATION_IMAGES} images"
                           + ("" if calibration else " (models.training.calibration_images, 512 px)")}
    mpath = out / "manifest.json"
    mpath.write_text(json.dumps(manifest, indent=2))
    log.info("edge bundle for %s (%s) written to %s", codec.codec_name, codec.weights_hash.hex(), out)
    return mpath
