"""The edge's open-vocabulary backend end to end: `latentcast export grounding` writes a bundle (tiny
random Grounding DINO, no hub), `grounding.backend: open-vocab` runs it in the edge app."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from latentcast.proto.ids import label_set_hash
from tests.test_tasks import _FakeEncoder, _FakeSource

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from latentcast.tools.cli import main

    out = tmp_path_factory.mktemp("grounding") / "tiny"
    rc = main(["export", "grounding", "--model", "tiny-random", "--labels", "person,car,traffic light",
               "--image-size", "96x128", "--out", str(out)])
    assert rc == 0
    return out


def test_export_grounding_command_writes_the_bundle(bundle, capsys):
    man = json.loads((bundle / "manifest.json").read_text())
    assert man["format"] == "latentcast-grounding-1" and man["image_size"] == [96, 128]
    assert man["labels"] == ["person", "car", "traffic light"]
    assert man["label_set_hash"] == label_set_hash(["person", "car", "traffic light"]).hex()
    assert (bundle / "image.onnx").stat().st_size > 100_000 and (bundle / "text.npz").is_file()


def test_export_grounding_without_weights_is_a_clear_error(tmp_path, capsys):
    from latentcast.tools.cli import main

    rc = main(["export", "grounding", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "b")])
    assert rc == 2
    assert "no-such-model" in capsys.readouterr().err
    try:
        import tensorrt  # noqa: F401
        return  # TensorRT is here: --tensorrt would build a real engine, not fail
    except ImportError:
        pass
    rc = main(["export", "grounding", "--model", "tiny-random", "--labels", "person", "--image-size", "96x128",
               "--tensorrt", "--out", str(tmp_path / "t")])
    assert rc == 2 and "TensorRT is not installed" in capsys.readouterr().err


def test_config_checks_the_backend():
    from latentcast.edge.config import EdgeConfig, GroundingConfig

    with pytest.raises(ValueError, match="grounding.bundle is empty"):
        GroundingConfig(backend="open-vocab")
    with pytest.raises(ValueError, match="grounding.backend 'dino'"):
        GroundingConfig(backend="dino")
    with pytest.raises(ValueError, match="grounding.provider"):
        GroundingConfig(backend="open-vocab", bundle="x", provider="npu")
    assert EdgeConfig().grounding.backend == "yolox"


async def test_edge_runs_the_open_vocab_backend(bundle):
    from latentcast.edge.app import EdgeApp
    from latentcast.edge.config import EdgeConfig
    from latentcast.edge.open_vocab import OpenVocabDetector
    from tests.test_edge_client import CameraState, FakeCloud, start_server

    cameras: dict[str, CameraState] = {}
    cloud = FakeCloud(cameras)
    server, port = await start_server(cloud)
    cfg = EdgeConfig(camera_id="ov-cam")
    g = cfg.grounding
    g.backend, g.bundle, g.labels, g.every = "open-vocab", str(bundle), ["person", "car", "traffic light"], 1
    g.box_threshold = g.text_threshold = 0.01  # a random model's scores are low: let some boxes through
    cfg.server.target = f"127.0.0.1:{port}"
    cfg.sender.queue_size = 16
    enc = _FakeEncoder()
    app = EdgeApp(cfg, source=_FakeSource(), encoder=enc)
    try:
        stats = await asyncio.wait_for(app.run(), 60)
    finally:
        await server.stop(None)
    assert isinstance(app._grounder.detector, OpenVocabDetector) and app._grounder.detector_runs == 3
    assert list(cloud.headers[0].labels) == ["person", "car", "traffic light"]
    assert [h for _, h in enc.calls] == [label_set_hash(g.labels)] * 3
    assert all(0 <= r.label_id < 3 for rois, _ in enc.calls for r in rois)
    assert cameras["ov-cam"].processed == [0, 1, 2] and stats["frames_encoded"] == 3


async def test_edge_refuses_a_bundle_for_other_labels(bundle):
    from latentcast.edge.app import EdgeApp
    from latentcast.edge.config import EdgeConfig

    cfg = EdgeConfig(camera_id="ov-cam")
    cfg.grounding.backend, cfg.grounding.bundle = "open-vocab", str(bundle)  # default labels: person, vehicle, ...
    app = EdgeApp(cfg, source=_FakeSource(), encoder=_FakeEncoder())
    with pytest.raises(ValueError, match="export it for these labels: latentcast export grounding"):
        app._build()


def test_open_vocab_detector_output_is_well_formed(bundle):
    from latentcast.edge.open_vocab import OpenVocabDetector

    det = OpenVocabDetector(bundle=bundle, box_threshold=0.01, text_threshold=0.01)
    rgb = np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8)
    dets = det.detect(rgb)
    from latentcast.detector import Detector, YoloxDetector

    assert det.labels == ["person", "car", "traffic light"]
    assert isinstance(det, Detector) and isinstance(YoloxDetector(), Detector)  # one interface, both backends
    for d in dets:
        assert 0 <= d.x0 < d.x1 <= 200 and 0 <= d.y0 < d.y1 <= 120 and d.label == det.labels[d.class_id]
