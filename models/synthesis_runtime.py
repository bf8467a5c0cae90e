"""g_s on ONNX Runtime: the cloud's temporal render in one runtime (``codec.render_runtime: onnx``).

::

    g_s.layers() ──cut before each PixelShuffle──► parts (1/16: head, trunk, first up conv;
                                                        1/8: shuffle, blocks, next up conv; 1/4: ... out)
    each part ──torch.onnx.export (in memory, once per g_s and thread count)──► an ORT session
    render: [ŷ, mask, M(ẑ)] crop ─► part 0 ─► cut to what the later parts need for the kept cells
                                 ─► part 1 ─► cut ─► ... ─► the kept cells' latent (models/elic.py: crop_chain)

The same computation as ``SynthesisToLatent.from_global`` (float32; the two runtimes differ in the last
bits, about 1e-6, not in what is computed). Why: on this CPU, ONNX Runtime runs g_s on the small crops of
a temporal render in 0.5-0.65 of torch's time, and a decode that uses one runtime leaves no second thread
pool to fight over the cores. Whole frames gain less (0.9). The entropy decoding stays in numpy and torch.
"""

from __future__ import annotations

import io
import threading
import warnings
import weakref
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn

from latentcast.onnx_runtime import ort_session
from latentcast.proto.regions import RENDER_RUNTIMES

from .elic import SynthesisToLatent, crop_chain

__all__ = ["OnnxSynthesis", "onnx_synthesis", "RENDER_RUNTIMES"]

OPSET = 17


def _parts(g_s: SynthesisToLatent) -> list[tuple[nn.Sequential, int, int]]:
    """g_s.layers() cut before each PixelShuffle: (part, reach in frame pixels, output stride)."""
    parts: list[list[tuple[nn.Module, int, int]]] = [[]]
    for layer, reach, stride in g_s.layers():
        if isinstance(layer, nn.PixelShuffle) and parts[-1]:
            parts.append([])
        parts[-1].append((layer, reach, stride))
    return [(nn.Sequential(*(m for m, _, _ in p)).eval(), sum(r * s for _, r, s in p), p[-1][2]) for p in parts]


class OnnxSynthesis:
    """``g_s.from_global`` on ONNX Runtime, cut at its upsamplings (see the module docstring)."""

    def __init__(self, g_s: SynthesisToLatent, *, threads: int = 0):
        self.steps: list[tuple[Callable[[np.ndarray], np.ndarray], int, int]] = []
        channels = g_s.head.in_channels
        with torch.no_grad():
            for part, reach, stride in _parts(g_s):
                x = torch.zeros(1, channels, 4, 4)
                channels = part(x).shape[1]
                buf = io.BytesIO()
                with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices
                    warnings.simplefilter("ignore")
                    torch.onnx.export(part, (x,), buf, dynamo=False, input_names=["x"], output_names=["f"],
                                      opset_version=OPSET,
                                      dynamic_axes={"x": {2: "h", 3: "w"}, "f": {2: "H", 3: "W"}})
                sess = ort_session(buf.getvalue(), threads=threads)
                self.steps.append((lambda a, s=sess: s.run(None, {"x": np.ascontiguousarray(a)})[0], reach, stride))

    def __call__(self, y_hat: torch.Tensor, mask: torch.Tensor, gz: torch.Tensor,
                 keep: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """As ``SynthesisToLatent.from_global`` (``keep``: the cells of the crop to return)."""
        x = SynthesisToLatent.inputs(y_hat, mask, gz).numpy()
        if keep is None:
            for step, _, _ in self.steps:
                x = step(x)
        else:
            x = crop_chain(self.steps, x, keep)
        return torch.from_numpy(np.ascontiguousarray(x))


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # g_s -> {threads: OnnxSynthesis}
_LOCK = threading.Lock()


def onnx_synthesis(g_s: SynthesisToLatent, *, threads: int = 0) -> OnnxSynthesis:
    """The ONNX Runtime copy of ``g_s``, exported once per g_s and thread count and shared by the streams
    (ONNX Runtime sessions may run from several threads at once)."""
    with _LOCK:
        per = _CACHE.setdefault(g_s, {})
        if threads not in per:
            per[threads] = OnnxSynthesis(g_s, threads=threads)
        return per[threads]
