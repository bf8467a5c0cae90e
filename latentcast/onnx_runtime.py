"""The one place ONNX Runtime sessions are made (edge encoder, grounding, detectors, cloud analytics).

Every model latentcast runs through ONNX Runtime gets the same threading rule: ``threads`` > 0 caps the
intra-op pool (the gateway and the cloud share few cores with other work) and runs operators one at a
time (one inter-op thread); 0 keeps ONNX Runtime's default. The pool's threads never spin-wait for work
after a run (``session.intra_op.allow_spinning`` 0): on a machine where ONNX Runtime shares the cores with
torch and other sessions (the edge's encoder and grounding, the cloud's decode and analytics), spinning
threads take the cores the others need (measured in ``latentcast bench temporal``: the cloud's render took
195 ms a frame instead of 145 ms while the edge's encoder spun). Providers default to the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

__all__ = ["CPU", "ort_session"]

CPU = ("CPUExecutionProvider",)


def ort_session(model: str | os.PathLike | bytes, *, threads: int = 0,
                providers: Sequence[Any] = CPU) -> Any:
    """An ``onnxruntime.InferenceSession`` for a model file (or serialized bytes).

    ``threads``: intra-op threads (0 = ONNX Runtime's default); ``providers`` as ONNX Runtime takes them
    (names or ``(name, options)`` pairs)."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads {threads!r} must be an integer >= 0 (0 = ONNX Runtime's default)")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, opts, providers=list(providers))
