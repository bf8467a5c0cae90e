"""The edge's bounded send queue and unacknowledged backlog (no gRPC; thread- and asyncio-safe).

"Live first" (DESIGN.md): a slow cloud must never make the edge fall behind the camera.

- :class:`SendQueue` holds encoded frames waiting for the stream. It is bounded: when full,
  ``policy="drop-oldest"`` drops the oldest waiting frame (the newest always gets in: lowest
  latency), ``"drop-newest"`` refuses the incoming frame (keeps a contiguous run). Producers call
  :meth:`SendQueue.put` from any thread or the event loop; the sender awaits :meth:`SendQueue.get`.
- :class:`Backlog` holds frames written to the stream but not yet acknowledged, bounded by a frame
  count and a byte total. When over a bound, the oldest unacknowledged frames are dropped and
  counted as ``lost_to_backlog`` (a long outage loses the oldest frames, never blocks the camera).
  ``ack(acked_seq)`` releases every frame <= acked_seq (acks are cumulative);
  ``resume(next_seq)`` releases frames below the cloud's ``next_seq`` and returns the rest, in
  order, to resend.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["OutFrame", "SendQueue", "Backlog", "QueueClosed", "POLICIES"]

POLICIES = ("drop-oldest", "drop-newest")


class QueueClosed(Exception):
    """Raised by :meth:`SendQueue.get` once the queue is closed and empty."""


@dataclass(frozen=True)
class OutFrame:
    """One encoded frame on its way to the cloud."""

    seq: int  # per-camera sequence number, strictly increasing
    capture_ts_us: int  # capture time, microseconds since the Unix epoch
    packet: bytes  # LCF v1 codec packet
    boxes: Sequence[Any] = ()  # wire Box messages (FramePacket.edge_boxes)

    @property
    def nbytes(self) -> int:
        return len(self.packet)


class SendQueue:
    """Bounded FIFO of :class:`OutFrame` with a drop policy; ``get`` is a coroutine."""

    def __init__(self, *, maxsize: int, policy: str = "drop-oldest"):
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize {maxsize!r} must be an integer >= 1")
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r} is not one of {', '.join(POLICIES)}")
        self.maxsize, self.policy = maxsize, policy
        self._items: deque[OutFrame] = deque()
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._closed = False
        self.enqueued = 0  # frames accepted into the queue
        self.dropped_by_policy = 0  # frames dropped because the queue was full
        self.sent = 0  # frames taken by the sender (handed to the stream)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: OutFrame) -> bool:
        """Add a frame; returns False when ``drop-newest`` refused it (the queue was full).
        Raises ``QueueClosed`` after :meth:`close`."""
        with self._lock:
            if self._closed:
                raise QueueClosed("put on a closed SendQueue")
            if len(self._items) >= self.maxsize:
                self.dropped_by_policy += 1
                if self.policy == "drop-newest":
                    log.debug("send queue full: dropped new frame seq %d", item.seq)
                    return False
                old = self._items.popleft()
                log.debug("send queue full: dropped oldest frame seq %d", old.seq)
            self._items.append(item)
            self.enqueued += 1
            self._wake()
            return True

    def _wake(self) -> None:  # with the lock held
        waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_resolve, fut)

    def _pop_locked(self) -> OutFrame | None:
        """With the lock held: the oldest frame, None when empty; ``QueueClosed`` when closed and empty."""
        if self._items:
            self.sent += 1
            return self._items.popleft()
        if self._closed:
            raise QueueClosed("SendQueue closed")
        return None

    def get_nowait(self) -> OutFrame | None:
        """The oldest frame, or None when empty (raises ``QueueClosed`` when closed and empty)."""
        with self._lock:
            return self._pop_locked()

    async def get(self) -> OutFrame:
        """Wait for the oldest frame; raises ``QueueClosed`` once closed and drained."""
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                f = self._pop_locked()
                if f is not None:
                    return f
                fut = loop.create_future()
                self._waiters.append((loop, fut))
            try:
                await fut
            finally:
                with self._lock:
                    self._waiters = [(lp, f) for lp, f in self._waiters if f is not fut]

    def close(self) -> None:
        """No more frames: waiting and future ``get`` calls raise ``QueueClosed`` once drained."""
        with self._lock:
            self._closed = True
            self._wake()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"queued": len(self._items), "enqueued": self.enqueued,
                    "dropped_by_policy": self.dropped_by_policy, "sent": self.sent}


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class Backlog:
    """Frames sent but not yet acknowledged, bounded by count and bytes (thread-safe)."""

    def __init__(self, *, max_frames: int, max_bytes: int):
        for name, v in (("max_frames", max_frames), ("max_bytes", max_bytes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} {v!r} must be an integer >= 1")
        self.max_frames, self.max_bytes = max_frames, max_bytes
        self._items: deque[OutFrame] = deque()
        self._bytes = 0
        self._lock = threading.Lock()
        self._last_seq: int | None = None
        self.added = 0  # frames put in the backlog
        self.acked = 0  # frames released by acks or by the cloud's next_seq
        self.lost_to_backlog = 0  # oldest unacked frames dropped because a bound was hit
        self.lost_bytes = 0
        self.acked_seq: int | None = None  # highest cumulative ack seen

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def oldest_seq(self) -> int | None:
        with self._lock:
            return self._items[0].seq if self._items else None

    def add(self, frame: OutFrame) -> list[OutFrame]:
        """Track a frame about to be written; returns the frames dropped to stay within the bounds
        (oldest first; possibly ``frame`` itself when it alone exceeds ``max_bytes``)."""
        with self._lock:
            if self._last_seq is not None and frame.seq <= self._last_seq:
                raise ValueError(f"seq {frame.seq} is not above the last backlog seq {self._last_seq} "
                                 "(sequence numbers must strictly increase)")
            self._last_seq = frame.seq
            self._items.append(frame)
            self._bytes += frame.nbytes
            self.added += 1
            lost = []
            while self._items and (len(self._items) > self.max_frames or self._bytes > self.max_bytes):
                old = self._items.popleft()
                self._bytes -= old.nbytes
                lost.append(old)
            if lost:
                self.lost_to_backlog += len(lost)
                self.lost_bytes += sum(f.nbytes for f in lost)
                log.warning("backlog full (%d frames / %d bytes max): dropped unacked frames seq %d..%d",
                            self.max_frames, self.max_bytes, lost[0].seq, lost[-1].seq)
            return lost

    def _release_below(self, bound: int) -> int:  # with the lock held; releases seq < bound
        n = 0
        while self._items and self._items[0].seq < bound:
            self._bytes -= self._items.popleft().nbytes
            n += 1
        self.acked += n
        return n

    def ack(self, acked_seq: int) -> int:
        """Release every frame with seq <= ``acked_seq``; returns how many."""
        with self._lock:
            if self.acked_seq is None or acked_seq > self.acked_seq:
                self.acked_seq = acked_seq
            return self._release_below(acked_seq + 1)

    def resume(self, next_seq: int) -> list[OutFrame]:
        """After a (re)connect: release frames below the cloud's ``next_seq`` and return the rest,
        in order, to resend (they stay in the backlog until acknowledged)."""
        with self._lock:
            if next_seq > 0 and (self.acked_seq is None or next_seq - 1 > self.acked_seq):
                self.acked_seq = next_seq - 1
            self._release_below(next_seq)
            return list(self._items)

    def stats(self) -> dict[str, int | None]:
        with self._lock:
            return {"pending": len(self._items), "pending_bytes": self._bytes, "added": self.added,
                    "acked": self.acked, "lost_to_backlog": self.lost_to_backlog, "lost_bytes": self.lost_bytes,
                    "acked_seq": self.acked_seq}
