"""An ONNX graph run op by op in PyTorch, differentiable: a shipped detector as a training loss.

The cloud's detector is an ONNX file (YOLOX-nano, run by ONNX Runtime). A task-aware loss needs its features
with gradients, so this module executes the same graph with ``torch.nn.functional``: the initializers become
frozen parameters, each node becomes one torch call, in the file's (topological) order::

    ONNX file ─► initializers (frozen)    node 1 ─► node 2 ─► ... ─► the graph's outputs
                                            └──► any intermediate tensor named in ``outputs``

Only the operators the shipped detector uses are implemented (:data:`OPS`); a graph with any other is refused
when it is loaded, naming the operators. ``onnx2torch`` does this in general but requires torchvision, which
does not import beside this project's torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["OnnxGraph", "OPS"]

OPS = ("Conv", "Sigmoid", "Mul", "Add", "Concat", "Slice", "MaxPool", "Resize", "Reshape", "Transpose")


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class OnnxGraph(nn.Module):
    """``OnnxGraph(path)(x)`` -> the graph's first output, or ``{name: tensor}`` for ``outputs=`` names."""

    def __init__(self, path: str | Path):
        super().__init__()
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path))
        g = model.graph
        unknown = sorted({n.op_type for n in g.node} - set(OPS))
        if unknown:
            raise ValueError(f"{path}: operators {unknown} are not implemented (implemented: {', '.join(OPS)})")
        self.params = nn.ParameterList()
        self._index: dict[str, int] = {}
        for init in g.initializer:
            self._index[init.name] = len(self.params)
            t = torch.from_numpy(numpy_helper.to_array(init).copy())
            self.params.append(nn.Parameter(t, requires_grad=False))
        self.nodes = [(n.op_type, list(n.input), list(n.output), _attrs(n)) for n in g.node]
        self.input_name = g.input[0].name
        self.output_names = [o.name for o in g.output]
        self.produced = {o for _, _, outs, _ in self.nodes for o in outs}

    def forward(self, x: torch.Tensor, outputs: Sequence[str] | None = None):
        want = list(outputs) if outputs is not None else self.output_names[:1]
        missing = [n for n in want if n not in self.produced]
        if missing:
            raise KeyError(f"no tensor named {missing} in the graph")
        env: dict[str, torch.Tensor] = {self.input_name: x}
        left = set(want)
        for op, ins, outs, at in self.nodes:
            args = [self._get(env, n) if n else None for n in ins]
            env[outs[0]] = getattr(self, "_" + op)(args, at)
            left.discard(outs[0])
            if not left:
                break
        return env[want[0]] if outputs is None else {n: env[n] for n in want}

    def _get(self, env: dict, name: str) -> torch.Tensor:
        if name in env:
            return env[name]
        return self.params[self._index[name]]

    # one method per operator (ONNX opset 11 semantics, as the shipped file uses them)
    @staticmethod
    def _Conv(a, at):
        pads = at.get("pads", [0, 0, 0, 0])
        if pads[:2] != pads[2:]:
            raise ValueError(f"asymmetric Conv pads {pads}")
        return F.conv2d(a[0], a[1], a[2] if len(a) > 2 else None, stride=at.get("strides", 1), padding=pads[:2],
                        dilation=at.get("dilations", 1), groups=at.get("group", 1))

    @staticmethod
    def _Sigmoid(a, at):
        return torch.sigmoid(a[0])

    @staticmethod
    def _Mul(a, at):
        return a[0] * a[1]

    @staticmethod
    def _Add(a, at):
        return a[0] + a[1]

    @staticmethod
    def _Concat(a, at):
        return torch.cat(a, dim=at["axis"])

    @staticmethod
    def _Slice(a, at):
        x, starts, ends = a[0], a[1].tolist(), a[2].tolist()
        axes = a[3].tolist() if len(a) > 3 and a[3] is not None else list(range(len(starts)))
        steps = a[4].tolist() if len(a) > 4 and a[4] is not None else [1] * len(starts)
        index = [slice(None)] * x.dim()
        for s, e, ax, st in zip(starts, ends, axes, steps):
            index[ax] = slice(s, e, st)  # Python's clamping of out-of-range bounds is ONNX's for these
        return x[tuple(index)]

    @staticmethod
    def _MaxPool(a, at):
        pads = at.get("pads", [0, 0, 0, 0])
        return F.max_pool2d(a[0], at["kernel_shape"], stride=at.get("strides", 1), padding=pads[:2],
                            ceil_mode=bool(at.get("ceil_mode", 0)))

    @staticmethod
    def _Resize(a, at):
        if at.get("mode", b"nearest") != b"nearest":
            raise ValueError(f"Resize mode {at.get('mode')!r}: only nearest is implemented")
        scales = a[2].tolist()
        return F.interpolate(a[0], scale_factor=scales[2:], mode="nearest")

    @staticmethod
    def _Reshape(a, at):
        shape = [a[0].shape[i] if s == 0 else int(s) for i, s in enumerate(a[1].tolist())]
        if shape[0] == 1:  # the export's fixed batch of 1: keep the batch of the input instead
            shape[0] = a[0].shape[0]
        return a[0].reshape(shape)

    @staticmethod
    def _Transpose(a, at):
        return a[0].permute(*at["perm"])
