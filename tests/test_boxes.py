"""latentcast.boxes (the one IoU and greedy matcher) and latentcast.onnx_runtime (the one session factory)."""

import numpy as np
import pytest

from latentcast.boxes import greedy_match, iou_matrix
from latentcast.onnx_runtime import ort_session


def test_iou_matrix_values_and_degenerate_boxes():
    m = iou_matrix([[0, 0, 10, 10]], [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [5, 5, 5, 5], [10, 10, 0, 0]])
    np.testing.assert_allclose(m[0], [1.0, 50 / 150, 0.0, 0.0, 0.0])
    assert iou_matrix(np.zeros((0, 4)), [[0, 0, 1, 1]]).shape == (0, 1)


def test_greedy_match_best_score_first_and_one_to_one():
    a = [(0, 0, 10, 10), (1, 0, 11, 10)]
    b = [(0, 0, 10, 10)]
    # the higher-scoring second box takes the only partner although the first overlaps it more
    assert [(i, j) for i, j, _ in greedy_match(a, b, iou=0.5, scores=[0.1, 0.9])] == [(1, 0)]
    assert [(i, j) for i, j, _ in greedy_match(a, b, iou=0.5)] == [(0, 0)]
    assert greedy_match(a, b, iou=0.5, compatible=lambda i, j: False) == []
    assert greedy_match([(0, 0, 10, 10)], [(5, 0, 15, 10)], iou=0.5) == []  # IoU 1/3 under the threshold
    with pytest.raises(ValueError, match="iou threshold 1.5"):
        greedy_match(a, b, iou=1.5)


def test_demo_box_recall_uses_labels_and_the_threshold():
    from types import SimpleNamespace as Box

    from latentcast.tools.demo import box_recall

    edge = [
        Box(x0=0, y0=0, x1=10, y1=10, label="person", score=0.9),
        Box(x0=50, y0=50, x1=60, y1=60, label="car", score=0.8),
    ]
    cloud = [
        Box(x0=1, y0=0, x1=11, y1=10, label="person", label_id=0),
        Box(x0=50, y0=50, x1=60, y1=60, label="bus", label_id=5),
    ]
    assert box_recall(edge, cloud) == (1, 2)
    assert box_recall(edge, cloud, cloud_to_task={0: "person", 5: "car"}) == (2, 2)


def test_ort_session_rejects_bad_threads():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            ort_session(b"", threads=bad)


def test_ort_sessions_do_not_spin_and_cap_their_threads():
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    s = ort_session(model.SerializeToString(), threads=1)
    opts = s.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
