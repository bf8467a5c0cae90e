"""Where the cloud's temporal render runs g_s (``codec.render_runtime``): ONNX Runtime, torch, or torch in bfloat16.

``onnx`` (:class:`OnnxSynthesis`):

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

``bf16`` (:class:`Bf16Synthesis`): g_s in torch on a bfloat16 copy of g_s, its convolutions in channels_last
(the original stays float32). On a CPU with AVX-512 BF16 a whole 768x576 render of the fast
synthesis takes 31 ms against ONNX Runtime's 83 (one thread). Its latent differs from float32's in bfloat16's
8 bits of mantissa; ``latentcast bench temporal --render-runtime bf16`` measures what that does to the
frames and the detections. On a CPU without native bfloat16 it is many times slower (:func:`cpu_has_bf16`).
"""

from __future__ import annotations

import copy
import functools
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

__all__ = ["Bf16Synthesis", "OnnxSynthesis", "onnx_synthesis", "render_synthesis", "resolve_render_runtime",
           "cpu_has_bf16", "RENDER_RUNTIMES"]

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
        self.g_s = g_s  # its linear path (if any) runs in torch, float32
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
        with torch.no_grad():
            return self.g_s.add_linear(torch.from_numpy(np.ascontiguousarray(x)), y_hat, keep)


class Bf16Synthesis:
    """``g_s.from_global`` in torch on a bfloat16, channels_last copy of ``g_s`` (see the module docstring);
    returns float32. A bfloat16 copy rather than autocast: the same values (autocast ran every layer in
    bfloat16 too), without casting the weights at every call (whole frame 38 -> 31 ms at one thread)."""

    def __init__(self, g_s: SynthesisToLatent):
        self.g_s = copy.deepcopy(g_s).eval().to(memory_format=torch.channels_last).to(torch.bfloat16)
        if g_s.linear is not None:  # the linear path stays float32 (bfloat16 would round what it adds)
            self.g_s.linear = copy.deepcopy(g_s.linear).eval().float()
        self.steps = [(layer, reach * stride, stride) for layer, reach, stride in self.g_s.layers()]

    @torch.no_grad()
    def __call__(self, y_hat: torch.Tensor, mask: torch.Tensor, gz: torch.Tensor,
                 keep: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        x = SynthesisToLatent.inputs(y_hat, mask, gz).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        if keep is None:
            for layer, _, _ in self.steps:
                x = layer(x)
        else:
            x = crop_chain(self.steps, x, keep)
        return self.g_s.add_linear(x.float().contiguous(), y_hat, keep)


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX), read once from /proc/cpuinfo (Linux)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_render_runtime(runtime: str) -> str:
    """``runtime`` with ``auto`` resolved: ``bf16`` where the CPU computes bfloat16 natively, else ``onnx``."""
    if runtime not in RENDER_RUNTIMES:
        raise ValueError(f"render runtime {runtime!r} is not one of {', '.join(RENDER_RUNTIMES)}")
    if runtime == "auto":
        return "bf16" if cpu_has_bf16() else "onnx"
    return runtime


def render_synthesis(g_s: SynthesisToLatent, runtime: str, *, threads: int = 0) -> Callable[..., torch.Tensor]:
    """``g_s.from_global`` (same arguments, ``keep`` included) on ``runtime`` (one of ``RENDER_RUNTIMES``)."""
    runtime = resolve_render_runtime(runtime)
    if runtime == "onnx":
        return onnx_synthesis(g_s, threads=threads)
    if runtime == "bf16":
        with _LOCK:
            per = _CACHE.setdefault(g_s, {})
            if "bf16" not in per:
                per["bf16"] = Bf16Synthesis(g_s)
            return per["bf16"]
    return g_s.from_global


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # g_s -> {threads: OnnxSynthesis, "bf16": ...}
_LOCK = threading.Lock()


def onnx_synthesis(g_s: SynthesisToLatent, *, threads: int = 0) -> OnnxSynthesis:
    """The ONNX Runtime copy of ``g_s``, exported once per g_s and thread count and shared by the streams
    (ONNX Runtime sessions may run from several threads at once)."""
    with _LOCK:
        per = _CACHE.setdefault(g_s, {})
        if threads not in per:
            per[threads] = OnnxSynthesis(g_s, threads=threads)
        return per[threads]
