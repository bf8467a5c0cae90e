"""edge.sender: drop policies, counters, backlog bounds, acks and resume."""

from __future__ import annotations

import asyncio
import threading

import pytest

from latentcast.edge.sender import Backlog, OutFrame, QueueClosed, SendQueue


def fr(seq: int, n: int = 10) -> OutFrame:
    return OutFrame(seq=seq, capture_ts_us=seq * 100, packet=bytes(n))


def test_drop_oldest():
    q = SendQueue(maxsize=3, policy="drop-oldest")
    assert all(q.put(fr(i)) for i in range(5))
    assert [q.get_nowait().seq for _ in range(3)] == [2, 3, 4]
    assert q.get_nowait() is None
    assert q.stats() == {"queued": 0, "enqueued": 5, "dropped_by_policy": 2, "sent": 3}


def test_drop_newest():
    q = SendQueue(maxsize=2, policy="drop-newest")
    assert [q.put(fr(i)) for i in range(4)] == [True, True, False, False]
    assert [q.get_nowait().seq for _ in range(2)] == [0, 1]
    assert (q.enqueued, q.dropped_by_policy, q.sent) == (2, 2, 2)


def test_queue_options_are_checked():
    with pytest.raises(ValueError, match="policy 'lifo' is not one of drop-oldest, drop-newest"):
        SendQueue(maxsize=1, policy="lifo")
    with pytest.raises(ValueError, match="maxsize 0 must be an integer >= 1"):
        SendQueue(maxsize=0)


async def test_async_get_waits_and_wakes_from_another_thread():
    q = SendQueue(maxsize=4)
    task = asyncio.create_task(q.get())
    await asyncio.sleep(0.01)
    assert not task.done()
    t = threading.Thread(target=q.put, args=(fr(7),))
    t.start()
    t.join(timeout=5)
    got = await asyncio.wait_for(task, 5)
    assert got.seq == 7


async def test_close_drains_then_raises():
    q = SendQueue(maxsize=4)
    q.put(fr(0))
    q.close()
    assert (await q.get()).seq == 0
    with pytest.raises(QueueClosed):
        await q.get()
    with pytest.raises(QueueClosed):
        q.put(fr(1))
    q2 = SendQueue(maxsize=4)
    waiter = asyncio.create_task(q2.get())
    await asyncio.sleep(0.01)
    q2.close()
    with pytest.raises(QueueClosed):
        await asyncio.wait_for(waiter, 5)


async def test_cancelled_get_leaves_no_waiter():
    q = SendQueue(maxsize=2)
    task = asyncio.create_task(q.get())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert q._waiters == []
    q.put(fr(1))
    assert (await asyncio.wait_for(q.get(), 5)).seq == 1


def test_backlog_count_bound():
    b = Backlog(max_frames=3, max_bytes=10**6)
    lost = [f.seq for i in range(5) for f in b.add(fr(i))]
    assert lost == [0, 1]
    assert len(b) == 3 and b.oldest_seq() == 2 and b.lost_to_backlog == 2 and b.lost_bytes == 20


def test_backlog_byte_bound():
    b = Backlog(max_frames=100, max_bytes=25)
    b.add(fr(0, 10)), b.add(fr(1, 10))
    assert [f.seq for f in b.add(fr(2, 10))] == [0]
    assert b.nbytes == 20
    assert [f.seq for f in b.add(fr(3, 30))] == [1, 2, 3]  # a frame larger than the bound cannot be kept
    assert len(b) == 0 and b.nbytes == 0 and b.lost_to_backlog == 4


def test_backlog_ack_and_resume():
    b = Backlog(max_frames=10, max_bytes=10**6)
    for i in range(6):
        b.add(fr(i))
    assert b.ack(1) == 2 and b.oldest_seq() == 2
    assert b.ack(0) == 0  # stale ack: nothing
    assert [f.seq for f in b.resume(4)] == [4, 5]  # 2, 3 were received by the cloud
    assert len(b) == 2 and b.acked == 4 and b.acked_seq == 3
    assert [f.seq for f in b.resume(0)] == [4, 5]  # cloud lost its state: resend all still held
    assert b.ack(5) == 2 and len(b) == 0 and b.nbytes == 0
    assert b.resume(6) == []


def test_backlog_rejects_non_increasing_seq():
    b = Backlog(max_frames=4, max_bytes=100)
    b.add(fr(3))
    with pytest.raises(ValueError, match="seq 3 is not above the last backlog seq 3"):
        b.add(fr(3))
    with pytest.raises(ValueError, match="max_bytes 0 must be an integer >= 1"):
        Backlog(max_frames=1, max_bytes=0)
