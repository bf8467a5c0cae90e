"""The dashboard's ``Subscribe`` call to the cloud: JPEG frames, boxes and counters into the state.

A normal client of the cloud: its own bearer token (a ``subscribe`` or ``admin`` role), the same TLS settings
as an edge. The cloud confirms a subscription with its initial metadata (``SUBSCRIBED_METADATA_KEY``); the
link is "up" from then until the call ends. It then resubscribes after a backoff (``backoff_initial_s`` doubling up to
``backoff_max_s``), whatever the status: a cloud that restarts, or a token fixed on the cloud side, is
picked up without restarting the dashboard. The page shows why the link is down (the gRPC status).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
import grpc.aio

from latentcast.channel import open_channel
from latentcast.proto import latentcast_v1_pb2 as pb
from latentcast.proto import latentcast_v1_pb2_grpc as pb_grpc
from latentcast.proto.ids import SUBSCRIBED_METADATA_KEY

from ..metrics import RateLimitedLog
from .config import CloudLinkConfig
from .state import CameraView, DashboardState

log = logging.getLogger(__name__)

__all__ = ["CloudSubscription"]

_STOPPED = object()  # what a read returns when the dashboard stopped first


class CloudSubscription:
    """Subscribes to the cloud until ``stop`` is set; every result goes into ``state`` and to ``on_frame``."""

    def __init__(self, config: CloudLinkConfig, state: DashboardState, *,
                 on_frame: Callable[[CameraView], None] | None = None) -> None:
        self.config = config
        self.state = state
        self.on_frame = on_frame
        self._token = config.resolved_token()  # a missing token file fails here, before anything runs
        self._tls = config.tls_config()
        # read once: a missing certificate fails here too, and resubscribing reads no file
        self._creds = self._tls.credentials() if self._tls is not None else None
        self._rl = RateLimitedLog(log, interval_s=30.0)

    def _request(self) -> pb.SubscribeRequest:
        c = self.config
        return pb.SubscribeRequest(camera_id=c.camera_id, task=c.task, format=pb.IMAGE_FORMAT_JPEG,
                                   jpeg_quality=c.jpeg_quality)

    async def run(self, stop: asyncio.Event) -> None:
        c = self.config
        delay = c.backoff_initial_s
        metadata = (("authorization", f"Bearer {self._token}"),) if self._token else ()
        while not stop.is_set():
            got_any = await self._subscribe_once(metadata, stop)
            if stop.is_set():
                break
            delay = c.backoff_initial_s if got_any else min(c.backoff_max_s, delay * 2)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                pass
        self.state.link.down("stopped")

    async def _subscribe_once(self, metadata: tuple, stop: asyncio.Event) -> bool:
        """One Subscribe call; True when it was accepted (the next attempt starts with the shortest delay)."""
        c = self.config
        accepted = False
        async with open_channel(c.target, tls=self._tls, keepalive_s=c.keepalive_s,
                                keepalive_timeout_s=c.keepalive_timeout_s,
                                max_message_bytes=c.max_message_bytes, credentials=self._creds) as channel:
            call = pb_grpc.LatentcastStub(channel).Subscribe(self._request(), metadata=metadata)
            stopper = asyncio.ensure_future(stop.wait())

            async def until_stop(aw):
                """``aw``'s result, or _STOPPED (the call cancelled) once ``stop`` is set first."""
                reading = asyncio.ensure_future(aw)
                done, _ = await asyncio.wait({reading, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if stopper in done:
                    reading.cancel()
                    call.cancel()
                    return _STOPPED
                return reading.result()

            try:
                metadata_in = await until_stop(call.initial_metadata())
                if metadata_in is _STOPPED:
                    return accepted
                if not any(k == SUBSCRIBED_METADATA_KEY for k, _ in metadata_in or ()):
                    # refused (or the connection failed): the call ended without the cloud's confirmation
                    code = await call.code()
                    why = f"{code.name}: {await call.details()}"
                    self.state.link.down(why)
                    self._rl(logging.WARNING, f"sub:{code.name}", "subscription to %s refused: %s", c.target, why)
                    return accepted
                accepted = True
                self.state.link.up()
                log.info("subscribed to the cloud at %s", c.target)
                while True:
                    msg = await until_stop(call.read())
                    if msg is _STOPPED:
                        return accepted
                    if msg is grpc.aio.EOF:
                        self.state.link.down("the cloud ended the subscription (shutting down?)")
                        return accepted
                    cam = self.state.add(msg)
                    if self.on_frame is not None:
                        self.on_frame(cam)
            except grpc.aio.AioRpcError as exc:
                why = f"{exc.code().name}: {exc.details()}"
                self.state.link.down(why)
                self._rl(logging.WARNING, f"sub:{exc.code().name}", "subscription to %s ended: %s", c.target, why)
                return accepted
            finally:
                stopper.cancel()
