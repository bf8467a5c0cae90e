"""Issue 15, items 1 and 2: an edge's identity across restarts, one publisher per camera, bounded seqs.

Against a loopback cloud (port 0, tiny seeded codec), reproducing the probe's findings:

- a restarted edge (a new process: a new instance id, seqs from 0 again) gets every frame analysed,
  where the cloud used to ack them as duplicates of the old process's frames;
- two live edges with one camera id: the second is refused with ALREADY_EXISTS and the first keeps
  streaming (they used to kick each other off); a holder silent past the takeover window is superseded
  (not one whose frames the cloud is still decoding), the same instance replaces its own stream at once,
  and an edge without an instance id resumes by camera_id as before;
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


async def finish(call) -> grpc.StatusCode:
    """Read the call to its end (the server's session is closed by then); its status code."""
    for _ in range(1000):
        if await asyncio.wait_for(call.read(), TIMEOUT) is grpc.aio.EOF:
            break
    return await call.code()


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
        assert await finish(first) == grpc.StatusCode.OK  # the process exits: its stream has ended
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


def test_registry_state_follows_the_instance(tiny_codec):
    """Another instance gets a fresh tracker and no temporal decoder; the same instance keeps both."""
    from latentcast.cloud.config import SessionsConfig
    from latentcast.cloud.sessions import SessionRegistry, validate_header

    reg = SessionRegistry(config=SessionsConfig())

    def spec(instance: str):
        return validate_header(edge_header(tiny_codec, "cam", instance).header, codec_id=tiny_codec.codec_id,
                               weights_hash=tiny_codec.weights_hash)

    st, sid, resumed = reg.open(spec("a"))
    st.seqs.accept(0)
    st.temporal = decoder = object()
    reg.close("cam", sid)
    st2, _, resumed = reg.open(spec("a"))
    assert resumed and st2.seqs.next_seq == 1 and st2.temporal is decoder
    reg.close("cam", _)
    st3, _, resumed = reg.open(spec("b"))
    assert not resumed and st3.seqs.next_seq == 0 and st3.temporal is None and st3.instance_id == "b"


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
        assert "restarted" in ei.value.details() and "sent nothing for" in ei.value.details()
        assert len(kinds(await send_frames(fresh, range(2), packets[0]), "result")) == 2
        await fresh.done_writing()


async def test_a_holder_paused_by_the_cloud_is_not_taken_over(make_server, tiny_codec, packets, monkeypatch):
    """Backpressure stops reading a stream while its frames are decoded: a slow decoder is not the edge's silence."""
    cfg: CloudConfig = make_config()
    cfg.sessions = dataclasses.replace(cfg.sessions, takeover_after_s=0.3)
    srv = await make_server(cfg)
    async with channel(srv.ports[0]) as ch:
        holder, _ = await open_stream(ch, tiny_codec, "slow", "edge-a")
        await asyncio.sleep(0.5)
        real = srv.pipeline.in_flight
        monkeypatch.setattr(srv.pipeline, "in_flight", lambda sid: 2)  # its frames still in the decoder
        err = await status_of(pb_grpc.LatentcastStub(ch).Stream(), edge_header(tiny_codec, "slow", "edge-b"))
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS, (err.code(), err.details())
        monkeypatch.setattr(srv.pipeline, "in_flight", real)
        assert len(kinds(await send_frames(holder, range(2), packets[0]), "result")) == 2
        await holder.done_writing()
        assert await finish(holder) == grpc.StatusCode.OK


async def test_the_same_instance_replaces_its_own_stream_at_once(make_server, tiny_codec, packets):
    """A network blip the cloud has not noticed yet: the edge's new stream must not wait for the old one."""
    srv = await make_server()
    async with channel(srv.ports[0]) as ch:
        old, _ = await open_stream(ch, tiny_codec, "ramp", "e1")
        assert len(kinds(await send_frames(old, range(4), packets[0]), "result")) == 4
        new, acc = await open_stream(ch, tiny_codec, "ramp", "e1")  # the old one still looks alive
        assert acc.WhichOneof("msg") == "accepted" and acc.accepted.resumed and acc.accepted.next_seq == 4
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await collect(old, until=lambda ms: False)
        assert ei.value.code() == grpc.StatusCode.ABORTED and "same edge instance" in ei.value.details()
        assert [r.seq for r in kinds(await send_frames(new, [4], packets[0]), "result")] == [4]
        await new.done_writing()


async def test_an_edge_without_instance_id_resumes_by_camera_id(make_server, tiny_codec, packets):
    """Older edges send no instance id: they keep the behaviour from before instance ids."""
    srv = await make_server()
    async with channel(srv.ports[0]) as ch:
        old, acc = await open_stream(ch, tiny_codec, "legacy", "")
        assert acc.accepted.next_seq == 0 and not acc.accepted.resumed
        await send_frames(old, range(5), packets[0])
        new, acc = await open_stream(ch, tiny_codec, "legacy", "")  # takes over at once, state kept
        assert acc.accepted.resumed and acc.accepted.next_seq == 5
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await collect(old, until=lambda ms: False)
        assert ei.value.code() == grpc.StatusCode.ABORTED
        await new.done_writing()
        assert await finish(new) == grpc.StatusCode.OK
        # a new-style edge for that camera is another process: fresh state
        newer, acc = await open_stream(ch, tiny_codec, "legacy", "process-3")
        assert acc.accepted.next_seq == 0 and not acc.accepted.resumed
        newer.cancel()


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


def test_the_largest_state_still_builds_its_replies():
    """At the top of the range the tracker refuses the next seq, and every reply field still fits uint64."""
    from latentcast.cloud.server import _u64
    from latentcast.cloud.sessions import MAX_SEQ, SeqTracker

    t = SeqTracker()
    assert t.refusal(MAX_SEQ - 1, 1 << 63) is None and t.accept(MAX_SEQ - 1)
    assert t.next_seq == MAX_SEQ and "9223372036854775808" in t.refusal(MAX_SEQ, 1 << 63)
    pb.SessionAccepted(next_seq=t.next_seq)
    pb.Ack(acked_seq=t.acked_seq, frames_received=_u64(2**70))
    assert _u64(2**64) == 2**64 - 1 and _u64(-1) == 0


@pytest.mark.parametrize("kw, needle", [
    (dict(max_seq_ahead=0), "max_seq_ahead"), (dict(max_seq_ahead=2**64), "max_seq_ahead"),
    (dict(takeover_after_s=-1.0), "takeover_after_s"), (dict(takeover_after_s=float("nan")), "takeover_after_s"),
])
def test_sessions_config_is_checked(kw, needle):
    from latentcast.cloud.config import SessionsConfig

    with pytest.raises(ValueError, match=needle):
        SessionsConfig(**kw)


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


class _Replay:
    """A Stream call that returns these cloud messages, then ends OK."""

    def __init__(self, msgs) -> None:
        self._msgs = list(msgs)

    async def read(self):
        return self._msgs.pop(0) if self._msgs else grpc.aio.EOF


async def test_edge_status_policy():
    S = grpc.StatusCode
    c = EdgeClient(target="127.0.0.1:1", session={"camera_id": "x"}, max_unknown_retries=2,
                   already_exists_retry_s=30.0)
    for code in (S.INVALID_ARGUMENT, S.PERMISSION_DENIED, S.UNAUTHENTICATED, S.FAILED_PRECONDITION, S.UNIMPLEMENTED):
        with pytest.raises(FatalStreamError) as ei:
            c._classify(code, "no")
        assert ei.value.code == code and code.name in str(ei.value)
    # UNKNOWN is bounded; other retryable endings in between do not reset the count, an acknowledged frame does
    assert c._classify(S.UNKNOWN, "bug").startswith("UNKNOWN")
    assert c._classify(S.UNAVAILABLE, "network").startswith("UNAVAILABLE")
    assert c._classify(S.UNKNOWN, "bug").startswith("UNKNOWN")
    with pytest.raises(FatalStreamError, match="3 streams ended with UNKNOWN without a frame acknowledged") as ei:
        c._classify(S.UNKNOWN, "bug")
    assert ei.value.code == S.UNKNOWN
    c._acked = asyncio.Event()
    await c._read_loop(_Replay([pb.CloudMessage(ack=pb.Ack(acked_seq=0))]))
    assert c._classify(S.UNKNOWN, "bug").startswith("UNKNOWN")
    # ALREADY_EXISTS: retried for already_exists_retry_s from the first refusal (other endings in between do not
    # restart the clock), then fatal, saying that another edge publishes the camera
    assert "retrying for up to 30 s more" in c._classify(S.ALREADY_EXISTS, "taken")
    c._classify(S.UNAVAILABLE, "network")
    c._already_exists_since -= 29.0
    assert "retrying for up to 1 s more" in c._classify(S.ALREADY_EXISTS, "taken")
    c._already_exists_since -= 1.0
    with pytest.raises(FatalStreamError, match="another edge publishes camera_id 'x'") as ei:
        c._classify(S.ALREADY_EXISTS, "taken")
    assert ei.value.code == S.ALREADY_EXISTS
    for kw in (dict(max_unknown_retries=-1), dict(already_exists_retry_s=-1.0)):
        with pytest.raises(ValueError, match=next(iter(kw))):
            EdgeClient(target="127.0.0.1:1", session={"camera_id": "x"}, **kw)


class _Refuser(pb_grpc.LatentcastServicer):
    """A cloud whose every Stream ends at once: with ``code``, or UNKNOWN from an exception while building the
    reply (what a seq of 2**64-1 used to cause on every reconnect)."""

    def __init__(self, code: grpc.StatusCode | None) -> None:
        self.code = code
        self.calls = 0

    async def Stream(self, request_iterator, context):
        self.calls += 1
        # the client's SessionHeader first: refusing while its first write is in flight can end the call with
        # gRPC core's INTERNAL instead (retryable, so one more attempt: seen once in CI)
        async for _ in request_iterator:
            break
        if self.code is None:
            pb.SessionAccepted(next_seq=2**64)  # ValueError: Value out of range
        await context.abort(self.code, "refused by the test")


@pytest.mark.parametrize("code, attempts", [(grpc.StatusCode.INVALID_ARGUMENT, 1), (grpc.StatusCode.UNIMPLEMENTED, 1),
                                            (None, 3)])
async def test_edge_client_stops_on_statuses_retrying_cannot_fix(code, attempts):
    servicer = _Refuser(code)
    server = grpc.aio.server()
    pb_grpc.add_LatentcastServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        c = EdgeClient(target=f"127.0.0.1:{port}", session={"camera_id": "x"}, backoff_initial_s=0.01,
                       backoff_max_s=0.02, max_unknown_retries=2)
        with pytest.raises(FatalStreamError) as ei:
            await asyncio.wait_for(c.run(), TIMEOUT)
    finally:
        await server.stop(None)
    assert ei.value.code == (code or grpc.StatusCode.UNKNOWN)
    assert servicer.calls == c.connect_attempts == attempts
