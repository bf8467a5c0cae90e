"""cloud.sessions (seq bookkeeping, header validation, registry), cloud.config, cloud.auth, cloud.analytics."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from latentcast.cloud import config as cloud_config
from latentcast.cloud.analytics import ClassFilter, Detection, NullDetector, OnnxBoxesDetector, make_detector
from latentcast.cloud.auth import BearerTokenInterceptor
from latentcast.cloud.config import AnalyticsConfig, CloudConfig, ConfigError, SessionsConfig, load_cloud_config
from latentcast.cloud.sessions import SeqTracker, SessionRegistry, SessionRejected, validate_header
from latentcast.config import describe_config
from latentcast.proto import latentcast_v1_pb2 as pb
from latentcast.proto.ids import label_set_hash

HASH = bytes(range(8))


# ------------------------------------------------------------------------------ seq bookkeeping
def test_seq_tracker_skip_gaps():
    t = SeqTracker()
    assert t.next_seq == 0 and t.acked_seq is None
    assert t.accept(0) and t.accept(1) and not t.accept(1) and not t.accept(0)
    assert t.next_seq == 2 and t.acked_seq == 1
    assert t.accept(5)  # 2, 3, 4 will not come on this stream: given up
    assert t.next_seq == 6 and t.missing == 3
    assert not t.accept(3) and not t.accept(5)
    with pytest.raises(ValueError):
        t.accept(-1)


def test_seq_tracker_waits_for_gaps_bounded():
    t = SeqTracker(max_out_of_order=3, skip_gaps=False)
    assert t.accept(0) and t.accept(2) and t.accept(3)
    assert t.next_seq == 1 and t.pending_out_of_order == 2 and t.acked_seq == 0
    assert not t.accept(3)  # duplicate above the watermark
    assert t.accept(1)
    assert t.next_seq == 4 and t.pending_out_of_order == 0
    for s in (6, 8, 9):
        assert t.accept(s)
    assert t.next_seq == 4 and t.pending_out_of_order == 3
    assert t.accept(11)  # 4 held above the watermark > 3: the oldest gap (4, 5) is given up
    assert t.next_seq == 7 and t.missing == 2 and t.pending_out_of_order == 3
    assert not t.accept(5) and t.accept(7)
    assert t.next_seq == 10


# ------------------------------------------------------------------------------ headers
def header(**kw) -> pb.SessionHeader:
    h = dict(camera_id="cam-1", task="traffic", labels=["person", "car"], codec_id=1, weights_hash=HASH, width=768,
             height=576, fps=10.0, edge_version="0.1.0")
    h.update(kw)
    return pb.SessionHeader(**h)


def test_validate_header_ok():
    spec = validate_header(header(), codec_id=1, weights_hash=HASH)
    assert spec.camera_id == "cam-1" and spec.labels == ("person", "car") and (spec.width, spec.height) == (768, 576)
    assert spec.label_set_hash == label_set_hash(["person", "car"])


@pytest.mark.parametrize("kw,code,needle", [
    (dict(camera_id=""), grpc.StatusCode.INVALID_ARGUMENT, "camera_id must not be empty"),
    (dict(camera_id="x" * 300), grpc.StatusCode.INVALID_ARGUMENT, "camera_id has 300 characters"),
    (dict(camera_id="a\nb"), grpc.StatusCode.INVALID_ARGUMENT, "control characters"),
    (dict(width=0), grpc.StatusCode.INVALID_ARGUMENT, "frame size 0x576"),
    (dict(width=20000), grpc.StatusCode.INVALID_ARGUMENT, "out of range 1..16384"),
    (dict(width=16000, height=16000), grpc.StatusCode.INVALID_ARGUMENT, "sessions.max_frame_pixels"),
    (dict(fps=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "fps"),
    (dict(labels=["l"] * 5000), grpc.StatusCode.INVALID_ARGUMENT, "5000 labels"),
    (dict(codec_id=3), grpc.StatusCode.FAILED_PRECONDITION,
     "session codec_id 3 (elic-lite-taef2) does not match the cloud's codec 1 (elic-lite)"),
    (dict(codec_id=99), grpc.StatusCode.FAILED_PRECONDITION, "codec_id 99 (unknown)"),
    (dict(weights_hash=b"\xff" * 8), grpc.StatusCode.FAILED_PRECONDITION,
     f"weights_hash ffffffffffffffff does not match the cloud's codec weights {HASH.hex()}"),
    (dict(weights_hash=b""), grpc.StatusCode.FAILED_PRECONDITION, "(empty)"),
])
def test_validate_header_rejects(kw, code, needle):
    with pytest.raises(SessionRejected) as ei:
        validate_header(header(**kw), codec_id=1, weights_hash=HASH)
    assert ei.value.code == code and needle in ei.value.message


def test_registry_keeps_state_and_evicts_idle():
    reg = SessionRegistry(config=SessionsConfig(max_cameras=2))
    spec = validate_header(header(camera_id="a"), codec_id=1, weights_hash=HASH)
    st, sid, resumed = reg.open(spec)
    assert not resumed
    st.seqs.accept(0)
    st2, sid2, resumed = reg.open(spec)  # reconnect: same state, new session id
    assert resumed and st2 is st and sid2 != sid and st.seqs.next_seq == 1 and st.active_stream == sid2
    reg.close("a", sid)  # the old stream's close does not release the new owner
    assert st.active_stream == sid2
    reg.open(validate_header(header(camera_id="b"), codec_id=1, weights_hash=HASH))
    reg.open(validate_header(header(camera_id="c"), codec_id=1, weights_hash=HASH))
    assert len(reg) == 3  # nobody idle to forget: "a", "b" and "c" all have streams
    reg.close("a", sid2)
    reg.open(validate_header(header(camera_id="d"), codec_id=1, weights_hash=HASH))
    assert reg.get("a") is None and reg.get("b") is not None and len(reg) == 3


# ------------------------------------------------------------------------------ config
def test_config_yaml_env_and_errors(tmp_path):
    p = tmp_path / "cloud.yaml"
    p.write_text("server:\n  port: 6000\n  tokens: [a, b]\npipeline:\n  drop_policy: drop_newest\n"
                 "analytics:\n  keep_classes: [person]\n")
    cfg = load_cloud_config(p, env={"LATENTCAST_CLOUD__SERVER__PORT": "7000",
                                    "LATENTCAST_CLOUD__SINKS__JSONL_PATH": "out.jsonl"})
    assert cfg.server.port == 7000 and cfg.server.tokens == ["a", "b"] and cfg.pipeline.drop_policy == "drop_newest"
    assert cfg.sinks.jsonl_path == "out.jsonl" and cfg.analytics.keep_classes == ["person"]
    assert load_cloud_config(None, env={}) == CloudConfig()
    p.write_text("pipeline:\n  drop_policy: random\n")
    with pytest.raises(ConfigError, match="drop_policy 'random'"):
        load_cloud_config(p, env={})
    p.write_text("server:\n  tls_cert_file: a.pem\n")
    with pytest.raises(ConfigError, match="tls_key_file"):
        load_cloud_config(p, env={})
    p.write_text("server:\n  prot: 1\n")
    with pytest.raises(ConfigError, match="unknown key.*'prot'"):
        load_cloud_config(p, env={})


def test_every_config_field_has_a_comment():
    rows = describe_config(CloudConfig, cloud_config.ENV_PREFIX)
    assert len(rows) > 40
    assert ("server.tokens", "LATENTCAST_CLOUD__SERVER__TOKENS", []) in [r[:3] for r in rows]
    assert all(comment for *_, comment in rows), [r[0] for r in rows if not r[3]]


# ------------------------------------------------------------------------------ auth
def test_token_check():
    icpt = BearerTokenInterceptor(tokens=["t1", "t2"])
    assert icpt._check([("authorization", "Bearer t2")]) is None
    assert icpt._check([("Authorization", "bearer t1")]) is None
    assert icpt._check([]) == "missing"
    assert icpt._check([("authorization", "Basic t1")]) == "malformed"
    assert icpt._check([("authorization", "Bearer t3")]) == "unknown"
    with pytest.raises(ValueError):
        BearerTokenInterceptor(tokens=[""])


# ------------------------------------------------------------------------------ analytics
class _Fake:
    labels = ["person", "car", "dog"]

    def detect(self, rgb):
        return [Detection(x0=0, y0=0, x1=1, y1=1, class_id=i, label=lab, score=0.5)
                for i, lab in enumerate(self.labels)]


def test_class_filter_and_none():
    f = ClassFilter(_Fake(), keep=["car", "dog"])
    assert [d.label for d in f.detect(np.zeros((4, 4, 3), np.uint8))] == ["car", "dog"]
    with pytest.raises(ValueError, match=r"\['cat'\] not among"):
        ClassFilter(_Fake(), keep=["cat"])
    assert make_detector(AnalyticsConfig(kind="none")).detect(np.zeros((4, 4, 3), np.uint8)) == []
    assert isinstance(make_detector(AnalyticsConfig(kind="none")), NullDetector)
    with pytest.raises(ValueError, match="model_path"):
        make_detector(AnalyticsConfig(kind="onnx"))


def _boxes_model(path: Path) -> None:
    """A 1x3x32x48 input -> fixed boxes (input pixels), scores and labels: the documented layout."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    boxes = np.array([[[4, 4, 20, 12], [0, 0, 8, 8], [40, 20, 48, 32]]], np.float32)
    scores = np.array([[0.9, 0.1, 0.6]], np.float32)
    labels = np.array([[1, 0, 0]], np.int64)
    nodes = [helper.make_node("Constant", [], [n], value=numpy_helper.from_array(v, n + "_v"))
             for n, v in (("boxes_c", boxes), ("scores", scores), ("labels", labels))]
    nodes.append(helper.make_node("ReduceMax", ["images"], ["mx"], keepdims=0))  # use the input
    nodes.append(helper.make_node("Mul", ["mx", "zero"], ["z"]))
    nodes.append(helper.make_node("Add", ["boxes_c", "z"], ["boxes"]))
    graph = helper.make_graph(
        nodes, "boxes", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 48])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 3]),
         helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 3, 4]),
         helper.make_tensor_value_info("labels", TensorProto.INT64, [1, 3])],
        initializer=[numpy_helper.from_array(np.zeros((), np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_onnx_boxes_detector(tmp_path):
    _boxes_model(tmp_path / "det.onnx")
    (tmp_path / "labels.txt").write_text("person\ncar\n")
    cfg = AnalyticsConfig(kind="onnx", model_path=str(tmp_path / "det.onnx"), labels_path=str(tmp_path / "labels.txt"),
                          score_threshold=0.5, threads=1)
    det = make_detector(cfg)
    assert isinstance(det, OnnxBoxesDetector) and det.input_size == (32, 48)
    out = det.detect(np.zeros((64, 96, 3), np.uint8))  # letterbox ratio 0.5: boxes scale by 2
    assert [(d.label, d.score) for d in out] == [("car", pytest.approx(0.9)), ("person", pytest.approx(0.6))]
    assert (out[0].x0, out[0].y0, out[0].x1, out[0].y1) == (8.0, 8.0, 40.0, 24.0)
    assert (out[1].x1, out[1].y1) == (96.0, 64.0)  # clipped to the frame
    only_person = make_detector(AnalyticsConfig(**{**cfg.__dict__, "keep_classes": ["person"]}))
    assert [d.label for d in only_person.detect(np.zeros((64, 96, 3), np.uint8))] == ["person"]


def test_yolox_detector_on_a_real_frame():
    """The default analytics (YOLOX-nano from the shared folder) finds pedestrians in vtest.avi."""
    from tests.conftest import shared_or_skip

    root = shared_or_skip()
    cv2 = pytest.importorskip("cv2")
    video = root / "data" / "video" / "vtest.avi"
    if not video.is_file() or not (root / "models" / "yolox_nano.onnx").is_file():
        pytest.skip("vtest.avi or yolox_nano.onnx not in the shared folder")
    cap = cv2.VideoCapture(str(video))
    ok, bgr = cap.read()
    cap.release()
    assert ok
    det = make_detector(AnalyticsConfig(kind="yolox", threads=1, keep_classes=["person"]))
    found = det.detect(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    assert len(found) >= 2 and all(d.label == "person" and 0.3 <= d.score <= 1 for d in found)
    h, w = bgr.shape[:2]
    assert all(0 <= d.x0 < d.x1 <= w and 0 <= d.y0 < d.y1 <= h for d in found)
