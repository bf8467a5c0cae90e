"""The committed gRPC stubs are exactly what the .proto generates (no drift)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("grpc_tools")

from latentcast.proto import generate


def test_stubs_match_the_proto(tmp_path: Path):
    for path in generate.generate(tmp_path):
        committed = generate.HERE / path.name
        assert committed.is_file(), f"{committed.name} is missing: run python -m latentcast.proto.generate"
        assert path.read_bytes() == committed.read_bytes(), (
            f"{committed.name} drifted from latentcast_v1.proto: run python -m latentcast.proto.generate")


def test_stub_round_trip():
    from latentcast.proto import latentcast_v1_pb2 as pb

    msg = pb.EdgeMessage(frame=pb.FramePacket(seq=7, capture_ts_us=123, packet=b"LCF\0",
                                              edge_boxes=[pb.Box(x0=1, y0=2, x1=3, y1=4, label="person")]))
    again = pb.EdgeMessage.FromString(msg.SerializeToString())
    assert again.WhichOneof("msg") == "frame" and again.frame.seq == 7
    assert again.frame.edge_boxes[0].label == "person"
