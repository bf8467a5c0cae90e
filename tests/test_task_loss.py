"""models.onnx_graph and models.task_loss: an ONNX graph run in PyTorch equals ONNX Runtime; the detector-feature
loss is zero for equal images, has gradients, and trains a synthesis.

The operators are checked on a small seeded graph built here (every implemented operator, against ONNX Runtime);
the shared YOLOX-nano, when present, also end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from latentcast.models import synthesis_training as st  # noqa: E402
from latentcast.models.onnx_graph import OPS, OnnxGraph  # noqa: E402
from latentcast.models.task_loss import DetectorFeatureLoss, yolox_neck_outputs  # noqa: E402


def _const(name: str, values, dtype=np.int64):
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def _every_op_graph(path, rng):
    """x (1,4,8,8) -> a chain through every operator of OPS (opset 11) -> (1, 16, N)."""
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3
    wg = rng.standard_normal((8, 2, 3, 3)).astype(np.float32) * 0.3
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c1"], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Sigmoid", ["c1"], ["s1"]),
        helper.make_node("Mul", ["c1", "s1"], ["m1"]),  # SiLU as YOLOX exports it
        helper.make_node("Conv", ["m1", "wg"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], group=4),
        helper.make_node("Resize", ["c2", "roi", "scales"], ["r1"], mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        helper.make_node("Add", ["r1", "m1"], ["a1"]),
        helper.make_node("MaxPool", ["a1"], ["p1"], kernel_shape=[5, 5], pads=[2, 2, 2, 2], strides=[1, 1]),
        helper.make_node("Slice", ["p1", "st", "en", "ax", "sp"], ["sl"]),
        helper.make_node("Concat", ["sl", "sl"], ["cc"], axis=1),
        helper.make_node("Reshape", ["cc", "shape"], ["rs"]),
        helper.make_node("Transpose", ["rs"], ["y"], perm=[0, 2, 1]),
    ]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
             numpy_helper.from_array(wg, "wg"), numpy_helper.from_array(np.zeros(0, np.float32), "roi"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             _const("st", [0, 1]), _const("en", [2**62, 2**62]), _const("ax", [2, 3]), _const("sp", [2, 1]),
             _const("shape", [1, 8, -1])]
    graph = helper.make_graph(nodes, "every-op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    onnx.save(model, str(path))
    assert {n.op_type for n in nodes} == set(OPS)


def test_every_operator_matches_onnx_runtime(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "every-op.onnx"
    _every_op_graph(path, rng)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = OnnxGraph(path)(torch.from_numpy(x)).numpy()
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-5)
    env = OnnxGraph(path)(torch.from_numpy(x), outputs=["c2", "y"])  # an intermediate tensor by name
    assert set(env) == {"c2", "y"} and tuple(env["c2"].shape) == (1, 8, 4, 4)
    with pytest.raises(KeyError, match="no tensor named"):
        OnnxGraph(path)(torch.from_numpy(x), outputs=["nope"])


def test_unknown_operators_are_refused_by_name(tmp_path):
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "relu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), str(tmp_path / "r.onnx"))
    with pytest.raises(ValueError, match=r"operators \['Relu'\] are not implemented"):
        OnnxGraph(tmp_path / "r.onnx")


@pytest.fixture
def yolox_path():
    from latentcast.detector import detector_model_path

    try:
        return detector_model_path()
    except FileNotFoundError:
        pytest.skip("the shared YOLOX-nano is not here")


def test_yolox_in_torch_matches_onnx_runtime_and_batches(yolox_path):
    torch.set_num_threads(1)
    x = np.random.default_rng(1).random((2, 3, 416, 416), dtype=np.float32) * 255
    sess = ort.InferenceSession(str(yolox_path), providers=["CPUExecutionProvider"])
    ref = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 1]})[0] for i in range(2)])
    graph = OnnxGraph(yolox_path)
    with torch.no_grad():
        got = graph(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-3)
    with torch.no_grad():
        neck = graph(torch.from_numpy(x[:1]), outputs=yolox_neck_outputs(graph))
    assert [tuple(t.shape[2:]) for t in neck.values()] == [(52, 52), (26, 26), (13, 13)]  # strides 8, 16, 32


def test_feature_loss_is_zero_for_equal_images_and_has_gradients(yolox_path):
    torch.set_num_threads(1)
    loss = DetectorFeatureLoss(yolox_path, scale=0.5)
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-9)
    render = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    render.requires_grad_(True)
    value = loss(render, x)
    value.backward()
    assert value.item() > 0 and render.grad.abs().sum().item() > 0
    assert all(not p.requires_grad for p in loss.parameters())  # the detector stays frozen
    with pytest.raises(ValueError, match="scale 0 must be in"):
        DetectorFeatureLoss(yolox_path, scale=0)


def test_synthesis_trains_with_the_task_loss(tmp_path, tiny_data, tiny_codec_path, yolox_path):
    cfg = st.SynthesisTrainConfig(codec=str(tiny_codec_path), out=str(tmp_path / "run"), up_widths="16,8",
                                  steps=2, batch=2, crop=64, eval_every=50, task_weight=0.05, task_scale=1.0)
    st.train_synthesis(cfg)
    hist = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert hist[-1]["step"] == 2 and np.isfinite(hist[-1]["loss"])
    with pytest.raises(ValueError, match="task_weight -1"):
        st.train_synthesis(dataclasses.replace(cfg, task_weight=-1.0))
    with pytest.raises(FileNotFoundError, match="detector model"):
        st.train_synthesis(dataclasses.replace(cfg, out=str(tmp_path / "other"), task_detector="no-such.onnx"))
