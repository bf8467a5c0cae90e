"""Issue 15, items 1 and 2: an edge's identity across restarts, one publisher per camera, bounded seqs.

Against a loopback cloud (port 0, tiny seeded codec), reproducing the probe's findings:

- a restarted edge (a new process: a new instance id, seqs from 0 again) gets every frame analysed,
  where the cloud used to ack them as duplicates of the old process's frames;
- two live edges with one camera id: the second is refused with ALREADY_EXISTS and the first keeps
  streaming (they used to kick each other off); a holder silent past the takeover window is superseded;
- a frame with seq 2**64-1 (or beyond the window) ends its stream with INVALID_ARGUMENT and changes
  nothing, where it used to brick the camera;
- the edge stops on non-retryable statuses, retries ALREADY_EXISTS and UNKNOWN only for a bounded time.
"""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from latentcast.cloud.config import CloudConfig  # noqa: E402
from latentcast.edge.client import EdgeClient, FatalStreamError  # noqa: E402
from latentcast.edge.sender import OutFrame, SendQueue  # noqa: E402
from latentcast.proto import latentcast_v1_pb2 as pb  # noqa: E402
from latentcast.proto import latentcast_v1_pb2_grpc as pb_grpc  # noqa: E402

from .test_cloud_hardening import (  # noqa: E402
    TIMEOUT,
    assert_no_traceback,
    channel,
    collect,
    frame,
    header,
    kinds,
    make_config,
    make_server,  # noqa: F401 - fixture
    packets,  # noqa: F401 - fixture
    status_of,
)


def edge_header(tiny_codec, camera: str, instance: str) -> pb.EdgeMessage:
    msg = header(tiny_codec, camera=camera)
    msg.header.instance_id = instance
    return msg


async def open_stream(ch, tiny_codec, camera: str, instance: str):
    call = pb_grpc.LatentcastStub(ch).Stream()
    await call.write(edge_header(tiny_codec, camera, instance))
    first = (await collect(call, until=lambda ms: True))[0]
    return call, first


async def send_frames(call, seqs, packet: bytes) -> list[pb.CloudMessage]:
    for seq in seqs:
        await call.write(frame(seq, packet, boxes=[]))
    return await collect(call, until=lambda ms: len(kinds(ms, "result")) + len(kinds(ms, "error")) >= len(seqs))


# ------------------------------------------------------------------------------- item 1: restarts

async def test_a_restarted_edge_gets_every_frame_analysed(make_server, tiny_codec, packets, caplog):
    srv = await make_server()
    async with channel(srv.ports[0]) as ch:
        first, acc = await open_stream(ch, tiny_codec, "gate", "process-1")
        assert acc.accepted.next_seq == 0 and not acc.accepted.resumed
        got = await send_frames(first, range(43), packets[0])
        assert len(kinds(got, "result")) == 43
        await first.done_writing()
        # the edge restarts: a new process numbers its frames from 0 again
        second, acc = await open_stream(ch, tiny_codec, "gate", "process-2")
        assert acc.accepted.next_seq == 0 and not acc.accepted.resumed
        got = await send_frames(second, range(49), packets[1])
        assert sorted(r.seq for r in kinds(got, "result")) == list(range(49))  # the probe: 6 of 49 analysed
        second.cancel()
        # the same process reconnecting (a network blip) resumes where it was
        again, acc = await open_stream(ch, tiny_codec, "gate", "process-2")
        assert acc.accepted.resumed and acc.accepted.next_seq == 49
        for seq in (48, 49):
            await again.write(frame(seq, packets[1], boxes=[]))
        got = await collect(again, until=lambda ms: len(kinds(ms, "result")) >= 1)
        assert [r.seq for r in kinds(got, "result")] == [49]  # 48 was already analysed: re-acked only
        await again.done_writing()
    assert srv.metrics.value("latentcast_cloud_frames_duplicate_total") == 1
    assert_no_traceback(caplog)


async def test_edge_clients_of_two_processes_in_turn_lose_nothing(make_server, tiny_codec, packets):
    """The user-level view of the restart: two EdgeClients (two processes) one after the other."""
    srv = await make_server()
    session = {f.name: getattr(edge_header(tiny_codec, "porch", "").header, f.name)
               for f in pb.SessionHeader.DESCRIPTOR.fields if f.name != "instance_id"}
    analysed = []
    for _process in range(2):
        c = EdgeClient(target=f"127.0.0.1:{srv.ports[0]}", session=session, queue=SendQueue(maxsize=100),
                       on_result=analysed.append, backoff_initial_s=0.05, backoff_max_s=0.2)
        assert len(c.session.instance_id) == 32  # made by the client: the header had none
        for seq in range(20):
            c.queue.put(OutFrame(seq=seq, capture_ts_us=1, packet=packets[seq % 2], boxes=()))
        c.queue.close()
        await asyncio.wait_for(c.run(), TIMEOUT * 3)
    assert len(analysed) == 40 and sorted(r.seq for r in analysed) == sorted(list(range(20)) * 2)


async def test_a_second_live_edge_is_refused_and_the_first_goes_on(make_server, tiny_codec, packets, caplog):
    srv = await make_server()
    async with channel(srv.ports[0]) as ch:
        holder, _ = await open_stream(ch, tiny_codec, "lobby", "edge-a")
        assert len(kinds(await send_frames(holder, range(3), packets[0]), "result")) == 3
        intruder = pb_grpc.LatentcastStub(ch).Stream()
        err = await status_of(intruder, edge_header(tiny_codec, "lobby", "edge-b"))
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS, (err.code(), err.details())
        assert "lobby" in err.details() and "edge-a" in err.details() and "another edge" in err.details()
        # the holder was not kicked off and its sequence state is untouched
        got = await send_frames(holder, range(3, 6), packets[0])
        assert [r.seq for r in kinds(got, "result")] == [3, 4, 5]
        await holder.done_writing()
    assert srv.sessions.get("lobby").seqs.next_seq == 6
    assert_no_traceback(caplog)


async def test_a_silent_holder_is_taken_over(make_server, tiny_codec, packets):
    cfg: CloudConfig = make_config()
    cfg.sessions = dataclasses.replace(cfg.sessions, takeover_after_s=0.3)
    srv = await make_server(cfg)
    async with channel(srv.ports[0]) as ch:
        dead, _ = await open_stream(ch, tiny_codec, "yard", "crashed")  # kill -9: the connection lingers
        await asyncio.sleep(0.5)
        fresh, acc = await open_stream(ch, tiny_codec, "yard", "restarted")
        assert acc.WhichOneof("msg") == "accepted" and acc.accepted.next_seq == 0
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await collect(dead, until=lambda ms: False)
        assert ei.value.code() == grpc.StatusCode.ABORTED and "superseded" in ei.value.details()
        assert len(kinds(await send_frames(fresh, range(2), packets[0]), "result")) == 2
        await fresh.done_writing()


# ------------------------------------------------------------------------------- item 2: sequence numbers

@pytest.mark.parametrize("seq", [2**64 - 1, 2**63, 3 + (1 << 24)])  # next_seq is 3: the last is the first refused
async def test_a_seq_out_of_the_window_changes_nothing(make_server, tiny_codec, packets, seq, caplog):
    srv = await make_server()
    async with channel(srv.ports[0]) as ch:
        call, _ = await open_stream(ch, tiny_codec, "dock", "e1")
        await send_frames(call, range(3), packets[0])
        err = await status_of(call, frame(seq, packets[0], boxes=[]))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
        assert str(seq) in err.details() and "max_seq_ahead" in err.details()
        # the camera is not bricked: a reconnect is accepted where it was and its frames are analysed
        again, acc = await open_stream(ch, tiny_codec, "dock", "e1")
        assert acc.WhichOneof("msg") == "accepted" and acc.accepted.next_seq == 3 and acc.accepted.resumed
        assert [r.seq for r in kinds(await send_frames(again, [3, 4], packets[0]), "result")] == [3, 4]
        await again.done_writing()
    assert_no_traceback(caplog)


async def test_the_window_follows_next_seq(make_server, tiny_codec, packets):
    cfg: CloudConfig = make_config()
    cfg.sessions = dataclasses.replace(cfg.sessions, max_seq_ahead=100)
    srv = await make_server(cfg)
    async with channel(srv.ports[0]) as ch:
        call, _ = await open_stream(ch, tiny_codec, "pier", "e1")
        got = await send_frames(call, [0, 99, 198], packets[0])  # each inside next_seq + 100
        assert [r.seq for r in kinds(got, "result")] == [0, 99, 198]
        err = await status_of(call, frame(299, packets[0], boxes=[]))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "299" in err.details()


# ------------------------------------------------------------------------------- the edge's retry policy

async def test_edge_retries_already_exists_for_a_bounded_time(make_server, tiny_codec, packets, caplog):
    srv = await make_server()
    async with channel(srv.ports[0]) as ch:
        holder, _ = await open_stream(ch, tiny_codec, "hall", "first-edge")
        session = {"camera_id": "hall", "task": "traffic", "labels": ["person", "car"],
                   "codec_id": tiny_codec.codec_id, "weights_hash": tiny_codec.weights_hash, "width": 96,
                   "height": 64, "fps": 10.0}

        async def keep_alive():  # the holder keeps streaming: it is alive
            for seq in range(100):
                await holder.write(frame(seq, packets[0], boxes=[]))
                await asyncio.sleep(0.05)

        ka = asyncio.create_task(keep_alive())
        c = EdgeClient(target=f"127.0.0.1:{srv.ports[0]}", session=session, queue=SendQueue(maxsize=10),
                       backoff_initial_s=0.05, backoff_max_s=0.1, already_exists_retry_s=0.5)
        with pytest.raises(FatalStreamError) as ei:
            await asyncio.wait_for(c.run(), TIMEOUT)
        ka.cancel()
        holder.cancel()
    assert ei.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert "another edge publishes camera_id 'hall'" in str(ei.value)
    assert c.connect_attempts >= 2  # retried before giving up


def test_edge_status_policy():
    c = EdgeClient(target="127.0.0.1:1", session={"camera_id": "x"}, max_unknown_retries=2)
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                 grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION):
        with pytest.raises(FatalStreamError):
            c._classify(code, "no")
    for _ in range(2):
        assert c._classify(grpc.StatusCode.UNKNOWN, "bug").startswith("UNKNOWN")
    with pytest.raises(FatalStreamError, match="3 streams in a row ended with UNKNOWN"):
        c._classify(grpc.StatusCode.UNKNOWN, "bug")
    c._classify(grpc.StatusCode.UNAVAILABLE, "network")  # retryable, and resets the UNKNOWN count
    assert c._classify(grpc.StatusCode.UNKNOWN, "bug").startswith("UNKNOWN")
    with pytest.raises(ValueError, match="max_unknown_retries"):
        EdgeClient(target="127.0.0.1:1", session={"camera_id": "x"}, max_unknown_retries=-1)
