"""ONNX export: PyTorch-vs-ONNX parity, and edge (ONNX Runtime) -> cloud (PyTorch) bit-exactness."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from latentcast.edge.encoder import EdgeEncoder, default_bundle_dir  # noqa: E402
from latentcast.models.codec import WEIGHTS_DIR, LatentCodec  # noqa: E402
from latentcast.proto.bitstream import Packet, Roi  # noqa: E402
from latentcast.proto.grid import anchor_mask  # noqa: E402
from latentcast.proto.symbols import RDOQ_LAMBDA  # noqa: E402

from .conftest import _export_bundle, shared_or_skip  # noqa: E402


def _kodak(n: int | None = None) -> list[np.ndarray]:
    import cv2

    d = shared_or_skip() / "data" / "images" / "kodak"
    files = sorted(d.glob("kodim*.png"))[:n]
    return [np.ascontiguousarray(cv2.imread(str(p))[:, :, ::-1]) for p in files]


def test_bundle_carries_the_weights_hash(tiny_codec, tiny_bundle):
    man = json.loads((tiny_bundle / "manifest.json").read_text())
    assert man["weights_hash"] == tiny_codec.weights_hash.hex()
    for name in ("analysis.onnx", "entropy.onnx"):
        meta = {p.key: p.value for p in onnx.load(str(tiny_bundle / name)).metadata_props}
        assert meta["latentcast.weights_hash"] == tiny_codec.weights_hash.hex()
    from latentcast.models.export import float32_conv_is_exact
    from latentcast.models.quant import QConv

    ops = [n.op_type for n in onnx.load(str(tiny_bundle / "entropy.onnx")).graph.node]
    layers = [m for m in tiny_codec.model.modules() if isinstance(m, QConv)]
    exact = [float32_conv_is_exact(m) for m in layers]
    # each integer layer is a float32 Conv where that is provably exact, ConvInteger elsewhere (the
    # spatial-context and parameter networks run twice per group: anchors, then non-anchors)
    assert ops.count("Conv") >= sum(exact) and (ops.count("ConvInteger") > 0) == (not all(exact))
    assert ops.count("Conv") + ops.count("ConvInteger") > len(layers)


@pytest.mark.parametrize("weight", [1, 127])
def test_integer_layer_export_is_exact_on_either_path(weight, rng):
    """A layer whose accumulator stays below 2**24 becomes a float32 Conv, a wider one ConvInteger; both
    equal PyTorch's exact integer convolution on codes at the extremes (0, 255 and random)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from latentcast.models.export import IR_VERSION, OPSET, _Graph, float32_conv_is_exact
    from latentcast.models.quant import QConv

    layer = QConv(64, 8, 5, in_scale=1.0, in_zero=128, out_scale=1.0, relu=False)
    w = rng.integers(-weight, weight + 1, layer.w_int.shape)
    w[0] = weight  # one output channel at the bound: 64 * 25 * weight * 128
    layer.w_int.copy_(torch.from_numpy(w).to(torch.int8))
    layer.mult.fill_(3.0)
    layer.bias_int.copy_(torch.from_numpy(rng.integers(-1000, 1000, 8)).double())
    layer.shift.fill_(2)
    layer.frozen.fill_(True)
    assert float32_conv_is_exact(layer) == (weight == 1)
    g = _Graph()
    out = g.qconv(layer, "codes")
    g.nodes.append(helper.make_node("Identity", [out], ["out"]))
    graph = helper.make_graph(g.nodes, "one_layer", [helper.make_tensor_value_info("codes", TensorProto.DOUBLE, None)],
                              [helper.make_tensor_value_info("out", TensorProto.DOUBLE, None)], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    assert {n.op_type for n in model.graph.node} >= ({"Conv"} if weight == 1 else {"ConvInteger"})
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for codes in (np.zeros((1, 64, 9, 11)), np.full((1, 64, 9, 11), 255.0), rng.integers(0, 256, (1, 64, 9, 11))):
        codes = codes.astype(np.float64)
        ref = layer.forward_exact(torch.from_numpy(codes)).numpy()
        np.testing.assert_array_equal(sess.run(None, {"codes": codes})[0], ref)


def test_analysis_parity(tiny_codec, tiny_bundle, rng):
    """float32: the bundle's g_a and h_a are PyTorch's within float rounding; int8 (the default, where the
    bundle has the quantized stages): close to them, the staged graphs run, analysis.onnx is not loaded."""
    img = rng.integers(0, 256, (130, 190, 3)).astype(np.uint8)
    y_pt, z_pt = tiny_codec.analyze(img)
    enc = EdgeEncoder(bundle=tiny_bundle, analysis="float32")
    assert enc.analysis == "float32"
    y_onnx, z_onnx = enc.analyze(img)
    np.testing.assert_allclose(y_onnx, y_pt, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(z_onnx, z_pt, rtol=1e-4, atol=1e-4)
    q8 = EdgeEncoder(bundle=tiny_bundle)
    assert q8.analysis == "int8" and q8._ana is None
    y8, z8 = q8.analyze(img)
    assert y8.shape == y_pt.shape and z8.shape == z_pt.shape
    assert not np.array_equal(y8, y_pt)  # the int8 graphs did run
    assert np.sqrt(np.mean((y8 - y_pt) ** 2)) < 0.1 * y_pt.std()
    assert np.sqrt(np.mean((z8 - z_pt) ** 2)) < 0.1 * z_pt.std()


def test_int8_analysis_stages_in_the_manifest_and_fallbacks(tiny_codec, tiny_bundle, tmp_path, caplog, monkeypatch):
    """Every stage but the last (which writes y) has an int8 file; a bundle without them (``--no-int8``) runs
    float32 and says so; a bad precision or calibration frame is a precise error."""
    import logging

    stages = json.loads((tiny_bundle / "manifest.json").read_text())["analysis_stages"]
    assert ["int8" in st for st in stages] == [True] * (len(stages) - 1) + [False]
    assert all((tiny_bundle / st["int8"]).is_file() for st in stages[:-1])
    plain = _export_bundle(tiny_codec, tmp_path / "plain", int8=False)
    assert not any("int8" in st for st in json.loads((plain / "manifest.json").read_text())["analysis_stages"])
    with caplog.at_level(logging.INFO, logger="latentcast.edge.encoder"):
        assert EdgeEncoder(bundle=plain).analysis == "float32"
    assert "no int8 analysis stages" in caplog.text
    with pytest.raises(ValueError, match="'int4' is not one of int8, float32"):
        EdgeEncoder(bundle=tiny_bundle, analysis="int4")
    with pytest.raises(ValueError, match="multiples of 64"):
        _export_bundle(tiny_codec, tmp_path / "bad", calibration=[np.zeros((100, 64, 3), np.uint8)])
    broken = _export_bundle(tiny_codec, tmp_path / "broken")
    (broken / stages[1]["int8"]).unlink()  # a bundle copied without one of its files
    with pytest.raises(FileNotFoundError, match=r"lacks analysis_stage2\.int8\.onnx, which its manifest lists"):
        EdgeEncoder(bundle=broken)
    from latentcast.models import training

    monkeypatch.setattr(training, "training_sources", lambda **_: [])  # no shared data folder
    with pytest.raises(ValueError, match=r"no training images were found .* \(--no-int8\)"):
        _export_bundle(tiny_codec, tmp_path / "none", calibration=None)


@pytest.mark.parametrize("rdoq", [0.0, RDOQ_LAMBDA, 2.0])
def test_entropy_graph_equals_pytorch_exactly(tiny_codec, tiny_bundle, rng, rdoq, monkeypatch):
    """Same inputs -> identical symbols and table indices, for every rate point and a ROI mask, whatever the
    encoder's choice of symbols (plain rounding, the default RDOQ, a strong one)."""
    enc = EdgeEncoder(bundle=tiny_bundle, rdoq=rdoq)
    monkeypatch.setattr(tiny_codec, "rdoq", rdoq)
    img = rng.integers(0, 256, (128, 192, 3)).astype(np.uint8)
    y, z_float = tiny_codec.analyze(img)
    y = y * 40  # exercise large symbols and many tables
    masks = [np.ones(y.shape[1:], bool), anchor_mask(*y.shape[1:]) | (rng.random(y.shape[1:]) < 0.3)]
    for q in range(tiny_codec.n_rates):
        z = tiny_codec.z_symbols(z_float * 40, q)
        for tx in masks:
            s1, t1 = enc.encode_symbols(y, z, rate_point=q, tx_mask=tx)
            s2, t2 = tiny_codec.encode_symbols(y, z, rate_point=q, tx_mask=tx)
            assert np.array_equal(s1, s2) and np.array_equal(t1, t2)
            assert len(np.unique(t1)) > 3


def test_entropy_graph_equals_pytorch_with_per_cell_rates(tiny_codec, tiny_bundle, rng):
    """A coded background: each cell its own rate point; ONNX Runtime and PyTorch agree exactly."""
    enc = EdgeEncoder(bundle=tiny_bundle)
    img = rng.integers(0, 256, (128, 192, 3)).astype(np.uint8)
    y, z_float = tiny_codec.analyze(img)
    y = y * 40
    tx = np.ones(y.shape[1:], bool)
    for q in range(1, tiny_codec.n_rates):
        z = tiny_codec.z_symbols(z_float * 40, q)
        cell_rate = np.where(rng.random(y.shape[1:]) < 0.4, q, rng.integers(0, q, y.shape[1:])).astype(np.int64)
        s1, t1, y1 = enc.encode_symbols_y_hat(y, z, rate_point=q, tx_mask=tx, cell_rate=cell_rate)
        s2, t2, y2 = tiny_codec.encode_symbols_y_hat(y, z, rate_point=q, tx_mask=tx, cell_rate=cell_rate)
        assert np.array_equal(s1, s2) and np.array_equal(t1, t2) and np.array_equal(y1, y2)


def test_a_bundle_without_rdoq_rounds_plainly_and_says_so(tiny_codec, tiny_bundle, tmp_path, rng, caplog,
                                                          monkeypatch):
    """A bundle exported before RDOQ (its entropy graph has no rdoq input) still encodes, with plain rounding,
    and the edge warns once that a re-export would choose its symbols."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    graph = onnx.load(str(old / "entropy.onnx"))
    kept = [i for i in graph.graph.input if i.name != "rdoq"]
    del graph.graph.input[:]
    graph.graph.input.extend(kept)
    graph.graph.initializer.append(onnx.numpy_helper.from_array(np.array([0.0]), "rdoq"))
    onnx.save(graph, str(old / "entropy.onnx"))
    man = json.loads((old / "manifest.json").read_text())
    man["format"] = "latentcast-edge-bundle-2"
    man["files"].pop("entropy.onnx")
    (old / "manifest.json").write_text(json.dumps(man))
    with caplog.at_level("WARNING", logger="latentcast.edge.encoder"):
        enc = EdgeEncoder(bundle=old)
    assert "predates rate-distortion optimized quantization" in caplog.text
    y, z_float = tiny_codec.analyze(rng.integers(0, 256, (128, 192, 3)).astype(np.uint8))
    z = tiny_codec.z_symbols(z_float * 40, 1)
    tx = np.ones(y.shape[1:], bool)
    monkeypatch.setattr(tiny_codec, "rdoq", 0.0)
    s1, _ = enc.encode_symbols(y * 40, z, rate_point=1, tx_mask=tx)
    s2, _ = tiny_codec.encode_symbols(y * 40, z, rate_point=1, tx_mask=tx)
    assert np.array_equal(s1, s2)


def test_an_edge_refuses_a_bad_rdoq(tiny_bundle):
    with pytest.raises(ValueError, match=r"rdoq -1 out of range: a number >= 0"):
        EdgeEncoder(bundle=tiny_bundle, rdoq=-1)


def test_a_codec_released_for_a_lambda_is_coded_with_it(tiny_codec, tiny_bundle, tmp_path, rng):
    """A codec whose release recorded its RDOQ λ (`release codec --rdoq`) is coded with it wherever the user sets
    none: the PyTorch encoder, the exported bundle's manifest and its edge, an edge config with codec.rdoq unset;
    a λ the user sets wins; a codec that records none is coded with the default 0.05."""
    from latentcast.edge.config import CodecConfig
    from latentcast.proto.symbols import codec_rdoq

    path = tmp_path / "w.safetensors"
    LatentCodec.save(tiny_codec.model, path, latent_space=tiny_codec.latent_space_spec, meta={"rdoq": 2.0})
    codec = LatentCodec.from_file(path)
    assert codec.rdoq == 2.0 and tiny_codec.rdoq == RDOQ_LAMBDA
    bundle = _export_bundle(codec, tmp_path / "bundle", int8=False)
    assert json.loads((bundle / "manifest.json").read_text())["rdoq"] == 2.0
    assert json.loads((tiny_bundle / "manifest.json").read_text())["rdoq"] == RDOQ_LAMBDA
    own, told = EdgeEncoder(bundle=bundle, rdoq=CodecConfig().rdoq), EdgeEncoder(bundle=bundle, rdoq=0.0)
    assert (own.rdoq, told.rdoq, EdgeEncoder(bundle=tiny_bundle).rdoq) == (2.0, 0.0, RDOQ_LAMBDA)
    y, z_float = codec.analyze(rng.integers(0, 256, (128, 192, 3)).astype(np.uint8))
    z = codec.z_symbols(z_float * 40, 1)
    tx = np.ones(y.shape[1:], bool)
    s_own, _ = own.encode_symbols(y * 40, z, rate_point=1, tx_mask=tx)
    s_ref, _ = codec.encode_symbols(y * 40, z, rate_point=1, tx_mask=tx)
    s_told, _ = told.encode_symbols(y * 40, z, rate_point=1, tx_mask=tx)
    assert np.array_equal(s_own, s_ref) and not np.array_equal(s_own, s_told)
    assert np.abs(s_own).sum() < np.abs(s_told).sum()  # λ 2 keeps smaller symbols than plain rounding
    with pytest.raises(ValueError, match=r"codec.rdoq -1.0 out of range: a number >= 0 .*unset, the codec's own"):
        CodecConfig(rdoq=-1.0)
    with pytest.raises(ValueError, match=r"rdoq 'x' out of range"):
        codec_rdoq({"rdoq": "x"})
    man = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps(man | {"rdoq": -2}))
    with pytest.raises(ValueError, match=r"manifest.json: rdoq -2 out of range.*re-export"):
        EdgeEncoder(bundle=bundle)
    assert EdgeEncoder(bundle=bundle, rdoq=0.1).rdoq == 0.1  # the user's λ does not read the manifest's
    LatentCodec.save(tiny_codec.model, path, latent_space=tiny_codec.latent_space_spec, meta={"rdoq": "high"})
    with pytest.raises(ValueError, match=r"w.safetensors: metadata rdoq 'high' out of range"):
        LatentCodec.from_file(path)


def test_edge_background_packets_decode_in_the_cloud(tiny_codec, tiny_bundle):
    enc = EdgeEncoder(bundle=tiny_bundle)
    img = _kodak(1)[0]
    roi = [Roi(x0=100, y0=50, x1=400, y1=300)]
    for bg in range(tiny_codec.n_rates - 1):
        data = enc.compress(img, roi, rate_point=tiny_codec.n_rates - 1, background=bg)
        assert Packet.from_bytes(data).header.bg_rate_point == bg
        assert tiny_codec.decompress(data, decode_frame=False).mask.all()


def test_edge_encode_cloud_decode_bit_exact_tiny(tiny_codec, tiny_bundle):
    enc = EdgeEncoder(bundle=tiny_bundle)
    for img in _kodak(3):
        for q in (0, tiny_codec.n_rates - 1):
            data = enc.compress(img, rate_point=q)
            rec = tiny_codec.decompress(data, decode_frame=False)  # raises on any symbol mismatch
            assert rec.latent.shape == (48, 128, 192)
        data = enc.compress(img, [Roi(x0=100, y0=50, x1=400, y1=300)], rate_point=1)
        assert tiny_codec.decompress(data, decode_frame=False).mask.sum() > 0


def test_channel_gains_edge_and_cloud_agree_exactly(tiny_gain_codec, tiny_gain_bundle, rng):
    """Per-rate-point channel gains: every channel its own step and table offset, on the ONNX path and in
    PyTorch, for one rate point per frame and one per cell; edge packets decode in the cloud."""
    m = tiny_gain_codec.model
    assert m.rate_k.shape == (m.n_rates, tiny_gain_codec.M) and len(np.unique(m.rate_k[1].numpy())) > 5
    enc = EdgeEncoder(bundle=tiny_gain_bundle)
    assert enc.rate_deltas[1].shape == (tiny_gain_codec.M, 1, 1)
    img = rng.integers(0, 256, (128, 192, 3)).astype(np.uint8)
    y, z_float = tiny_gain_codec.analyze(img)
    y = y * 40
    tx = anchor_mask(*y.shape[1:]) | (rng.random(y.shape[1:]) < 0.3)
    for q in range(tiny_gain_codec.n_rates):
        z = tiny_gain_codec.z_symbols(z_float * 40, q)
        cell_rate = np.where(rng.random(y.shape[1:]) < 0.4, q, rng.integers(0, q + 1, y.shape[1:])).astype(np.int64)
        for cr in (None, cell_rate):
            s1, t1, y1 = enc.encode_symbols_y_hat(y, z, rate_point=q, tx_mask=tx, cell_rate=cr)
            s2, t2, y2 = tiny_gain_codec.encode_symbols_y_hat(y, z, rate_point=q, tx_mask=tx, cell_rate=cr)
            assert np.array_equal(s1, s2) and np.array_equal(t1, t2) and np.array_equal(y1, y2)
    img = _kodak(1)[0]
    for q, bg in ((0, None), (tiny_gain_codec.n_rates - 1, 0)):
        data = enc.compress(img, [Roi(x0=100, y0=50, x1=400, y1=300)], rate_point=q, background=bg)
        rec = tiny_gain_codec.decompress(data, decode_frame=False)  # raises on any symbol mismatch
        assert rec.latent.shape == (48, 128, 192)


def _shipped():
    w = WEIGHTS_DIR / "elic-lite.safetensors"
    b = default_bundle_dir()
    if not w.is_file() or not (b / "manifest.json").is_file():
        pytest.fail(f"shipped codec weights {w} or edge bundle {b} missing")
    return LatentCodec.from_file(w), EdgeEncoder(bundle=b)


def test_shipped_bundle_matches_shipped_weights():
    codec, enc = _shipped()
    assert enc.weights_hash == codec.weights_hash, "re-run `latentcast export edge` after changing the weights"


def test_shipped_int8_analysis_is_close_to_float32():
    """The shipped bundle's int8 stages (calibrated on training images) on a Kodak image: y within 4 % rms of
    y's spread (measured 2.3 % on vtest), far below the finest quantization step (1.0)."""
    _, q8 = _shipped()
    assert q8.analysis == "int8"
    f32 = EdgeEncoder(bundle=default_bundle_dir(), analysis="float32")
    img = _kodak(1)[0]
    y8, y = q8.analyze(img)[0], f32.analyze(img)[0]
    rms = float(np.sqrt(np.mean((y8 - y) ** 2)))
    assert rms < 0.04 * float(y.std()) and rms < 0.1, rms


def _check_bit_exact_on_kodak(codec: LatentCodec, enc: EdgeEncoder, images: list[np.ndarray], *,
                              whole: int) -> None:
    """The first ``whole`` images coded whole, one rate point after another, then ROIs with a coded background at
    every (ROI rate point, background rate point) pair on the images after them (as many as there are of either,
    both cycled): encoded by ONNX Runtime, decoded by PyTorch, where any symbol that differs fails the packet's
    symbol CRC."""
    for i, img in enumerate(images[:whole]):
        data = enc.compress(img, rate_point=i % codec.n_rates)
        rec = codec.decompress(data, decode_frame=False)
        assert Packet.from_bytes(data).header.symbol_crc != 0
        assert np.isfinite(rec.latent).all()
    pairs = [(q, b) for q in range(codec.n_rates) for b in range(q + 1)]
    rest = images[whole:]
    for i in range(max(len(rest), len(pairs))):
        img, (q, b) = rest[i % len(rest)], pairs[i % len(pairs)]
        h, w = img.shape[:2]
        roi = Roi(x0=w // 4, y0=h // 5, x1=w // 4 + w // 3, y1=h // 5 + h // 2)
        data = enc.compress(img, [roi], rate_point=q, background=b)
        assert Packet.from_bytes(data).header.bg_rate_point == b
        assert codec.decompress(data, decode_frame=False).mask.all()


def test_edge_encode_cloud_decode_bit_exact_kodak():
    """All 24 Kodak images, encoded by ONNX Runtime, decoded by PyTorch: every symbol CRC matches; then every
    (ROI, background) rate-point pair on real images."""
    codec, enc = _shipped()
    images = _kodak()
    assert len(images) == 24
    _check_bit_exact_on_kodak(codec, enc, images + images[:20], whole=24)  # each pair twice


def test_rdoq_spends_fewer_bytes_within_a_quality_band():
    """The shipped codec and bundle on Kodak: the default RDOQ writes fewer bytes than plain rounding at every
    rate point for a small PSNR cost, and its packets decode bit-exactly (results/rdoq measures the curves)."""
    from latentcast.tools.eval.metrics import psnr

    codec, enc = _shipped()
    plain = EdgeEncoder(bundle=enc.bundle, rdoq=0.0)
    images = _kodak(2)
    for q in range(codec.n_rates):
        sizes, quality = [], []
        for e in (plain, enc):
            data = [e.compress(img, rate_point=q) for img in images]
            sizes.append(sum(len(d) for d in data))
            quality.append(np.mean([psnr(img, codec.decompress(d).frame) for img, d in zip(images, data)]))
        assert sizes[1] < 0.97 * sizes[0], (q, sizes)
        assert quality[1] > quality[0] - 0.4, (q, quality)


def test_v3_snapshot_bit_exact_at_every_rate_point_and_background_level(tmp_path):
    """The committed elic-lite-v3 snapshot (linear path, per-channel steps), exported as the edge would run it:
    each of its rate points on Kodak images, and every (ROI, background) pair, decode bit-exactly."""
    from .conftest import _export_bundle

    w = WEIGHTS_DIR / "elic-lite-v3-snapshot.safetensors"
    if not w.is_file():
        pytest.fail(f"committed weights {w} missing")
    codec = LatentCodec.from_file(w)
    enc = EdgeEncoder(bundle=_export_bundle(codec, tmp_path / "bundle"))
    assert enc.weights_hash == codec.weights_hash and codec.model.cfg.linear_path
    _check_bit_exact_on_kodak(codec, enc, _kodak(12), whole=2 * codec.n_rates)
