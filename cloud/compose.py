"""The compose stage: the only module that calls the composer (``latentcast.models.composer``).

- :func:`make_composer`: the composer ``composer.*`` asks for (``kind: none`` = no composer: the codec's latent
  decoder makes the frame when it is decoded).
- :class:`ComposeStage`: in the worker threads, the decoded latents of a batch (across streams) composed into
  frames by one composer call; frames that already have pixels (temporal streams, JPEG) are left as they are.
- :class:`Recomposer`: one thread that composes analysed frames again with other sampling steps, for the
  ``Subscribe`` clients that asked for their own ``compose_steps`` (e.g. 50 for people), with a bounded
  backlog (the oldest pending frame is dropped, counted): a 50-step recomposition never holds up a worker.

::

    worker:    [DecodedFrame(latent) ...] ─► ComposeRequest per frame ─► composer.compose(batch) ─► frames
    sinks:     Recomposer.submit(analysed frame, [steps ...], done) ─► backlog (drop oldest)
    recompose thread: ─► composer.compose(request with steps) ─► done({steps: frame})
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

import numpy as np

from .config import ComposerConfig
from .frames import AnalysedFrame, DecodedFrame, FrameFailure

log = logging.getLogger(__name__)

__all__ = ["make_composer", "ComposeStage", "Recomposer"]


def make_composer(c: ComposerConfig, codec) -> object | None:
    """The composer of ``composer.*`` (the codec's latent space conditions it); None for ``kind: none``."""
    if c.kind == "none":
        return None
    from latentcast.models.composer import make_composer as _make

    return _make(c.kind, codec=codec, sd=c.sd, controlnet=c.controlnet or None, local_files_only=c.local_files_only,
                 scheduler=c.scheduler, seed=c.seed, default_steps=c.steps, start_strength=c.start_strength,
                 keep_roi=c.keep_roi, guidance_scale=c.guidance_scale, use_caption=c.use_caption)


class ComposeStage:
    """Frames from decoded latents, a batch at a time (``composer`` None: nothing to do)."""

    def __init__(self, composer: object | None = None, *, steps: int = 8) -> None:
        """``steps``: the sampling steps of the analysed frames (their consumers are machines)."""
        self.composer = composer
        self.steps = steps

    def warm(self, rec) -> None:
        """One composition of a dummy reconstruction: the first frame must not pay for the sampler's set-up."""
        if self.composer is None:
            return
        from latentcast.models.composer import ComposeRequest

        self.composer.compose([ComposeRequest.from_reconstruction(rec, stream_id="warmup", steps=1)])

    def compose(self, decoded: list[DecodedFrame | FrameFailure]) -> list[DecodedFrame | FrameFailure]:
        """Compose the decoded frames that have no pixels yet together (one composer call across streams),
        in place; a composer error fails the whole batch (``compose_failed``)."""
        todo = [d for d in decoded if not isinstance(d, FrameFailure) and d.frame is None]
        if not todo or self.composer is None:
            return decoded
        from latentcast.models.composer import ComposeRequest

        t0 = time.monotonic()
        requests = [ComposeRequest.from_reconstruction(d.rec, labels=d.labels, stream_id=d.job.spec.camera_id,
                                                       steps=self.steps) for d in todo]
        try:
            frames = self.composer.compose(requests)
        except Exception as exc:  # noqa: BLE001 - the batch's frames fail, the worker goes on
            msg = f"{type(exc).__name__}: {exc}"
            return [d if isinstance(d, FrameFailure) else FrameFailure(job=d.job, code="compose_failed", message=msg)
                    for d in decoded]
        per_frame_ms = (time.monotonic() - t0) * 1000.0 / len(todo)
        for d, f, r in zip(todo, frames, requests):
            d.frame, d.compose_ms, d.request = f, per_frame_ms, r
        return decoded


Done = Callable[[dict[int, np.ndarray]], None]


class Recomposer:
    """One thread composing analysed frames again with other sampling steps; at most ``queue`` frames wait.

    ``on_drop()`` is called for every frame a step-subscriber misses: dropped from a full backlog (also counted
    in :attr:`dropped`) or whose recomposition failed."""

    def __init__(self, *, composer: object | None = None, queue: int = 4,
                 on_drop: Callable[[], None] | None = None) -> None:
        if isinstance(queue, bool) or not isinstance(queue, int) or queue < 1:
            raise ValueError(f"recompose_queue {queue!r} must be an integer >= 1")
        self.composer = composer
        self.queue = queue
        self.on_drop = on_drop
        self.dropped = 0  # frames dropped from the full backlog
        self.thread: threading.Thread | None = None  # started with the first frame
        self._pending: deque[tuple[AnalysedFrame, list[int], Done]] = deque()
        self._cv = threading.Condition()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, fr: AnalysedFrame, steps: Iterable[int], done: Done) -> None:
        """Queue ``fr`` (it must have a ``compose_request``) for recomposition with each of ``steps``;
        ``done({steps: frame})`` runs in the recompose thread with the frames that could be made."""
        with self._cv:
            if self._closed:
                return
            if len(self._pending) >= self.queue:
                self._pending.popleft()  # the oldest waiting frame: its step-subscribers miss it
                self.dropped += 1
                self._dropped()
            self._pending.append((fr, sorted(set(steps)), done))
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="fanout-recompose", daemon=True)
                self.thread.start()
            self._cv.notify()

    def close(self, timeout: float = 30.0) -> None:
        """Drop the backlog and end the thread (after the composition in progress, at most ``timeout`` s)."""
        self._closed = True
        with self._cv:
            self._pending.clear()
            self._cv.notify_all()
        t = self.thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=timeout)

    def _dropped(self) -> None:
        if self.on_drop is not None:
            self.on_drop()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                fr, steps_list, done = self._pending.popleft()
            frames: dict[int, np.ndarray] = {}
            for steps in steps_list:
                frame = self.recompose(fr, steps)
                if frame is not None:
                    frames[steps] = frame
            if frames and not self._closed:
                try:
                    done(frames)
                except Exception as exc:  # noqa: BLE001 - a broken callback must not end the thread
                    log.warning("publishing the recomposed frame %s/%d failed: %s", fr.job.spec.camera_id, fr.seq,
                                exc)

    def recompose(self, fr: AnalysedFrame, steps: int) -> np.ndarray | None:
        """``fr`` composed again with ``steps`` sampling steps (same seed and caption); None (that client
        misses the frame, counted) when the composer fails."""
        try:
            return self.composer.compose([dataclasses.replace(fr.compose_request, steps=steps)])[0]
        except Exception as exc:  # noqa: BLE001 - a subscriber's extra frame must not stop the thread
            log.warning("recomposing %s/%d with %d steps failed: %s", fr.job.spec.camera_id, fr.seq, steps, exc)
            self._dropped()
            return None
