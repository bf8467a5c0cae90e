"""A task-aware distortion: the cloud detector's features of a render against those of the original.

Renders trained on pixel error alone can score more PSNR and fewer detections (``results/temporal_levers``:
+0.67 dB and 0.006-0.018 less mAP@0.5:0.95). This loss looks through the detector the cloud runs, YOLOX-nano
(its ONNX file run in PyTorch, :class:`~latentcast.models.onnx_graph.OnnxGraph`), at the neck outputs its head
reads at strides 8, 16 and 32::

    RGB in [0,1] ─► BGR x 255 ─► resize by ``scale`` (the cloud's letterbox: 416/768 = 0.54 for 768x576)
                 ─► YOLOX backbone + neck (frozen) ─► F_8, F_16, F_32
    loss = mean over the three of ||F(render) - F(original)||² / mean(F(original)²)

Each level's error is relative to its own energy, so the three scales weigh alike whatever their widths.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .onnx_graph import OnnxGraph

__all__ = ["DetectorFeatureLoss", "yolox_neck_outputs"]


def yolox_neck_outputs(graph: OnnxGraph) -> list[str]:
    """The tensors a YOLOX head reads (one per stride), found by walking back from each per-scale output:
    the regression branch forks once (box and objectness convs), the stem's output forks into the
    classification and regression branches; the stem convolution's input is the neck's output."""
    producer = {outs[0]: (op, ins) for op, ins, outs, _ in graph.nodes}
    conv_consumers: dict[str, int] = {}
    for op, ins, _, _ in graph.nodes:
        if op == "Conv":
            conv_consumers[ins[0]] = conv_consumers.get(ins[0], 0) + 1
    found = []
    for op, ins, _, _ in graph.nodes:
        if op != "Reshape":
            continue
        t, forks = producer[ins[0]][1][0], 0  # the per-scale Concat's first input: the box regression
        while t in producer:
            kind, args = producer[t]
            if kind == "Mul" and conv_consumers.get(t, 0) >= 2:  # a SiLU output read by two convolutions
                forks += 1
                if forks == 2:
                    found.append(producer[args[0]][1][0])  # SiLU(x) = x * sigmoid(x); x = stem conv(neck)
                    break
            t = args[0]
    if len(found) != 3:
        raise ValueError(f"expected a YOLOX head reading 3 neck outputs, found {len(found)}: {found}")
    return found


class DetectorFeatureLoss(nn.Module):
    """``loss(render, original)``: both (B,3,H,W) RGB in [0,1]; gradients flow into ``render`` only."""

    def __init__(self, path: str | Path, *, scale: float = 0.5):
        super().__init__()
        if not 0.0 < scale <= 1.0:
            raise ValueError(f"scale {scale} must be in (0, 1]")
        self.graph = OnnxGraph(path)
        self.layers = yolox_neck_outputs(self.graph)
        self.scale = scale

    def features(self, rgb: torch.Tensor) -> list[torch.Tensor]:
        x = rgb.flip(1) * 255.0  # the detector reads BGR, 0-255
        if self.scale != 1.0:
            x = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        out = self.graph(x, outputs=self.layers)
        return [out[n] for n in self.layers]

    def forward(self, render: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ref = self.features(original)
        got = self.features(render)
        terms = [((g - r) ** 2).mean() / (r**2).mean().clamp_min(1e-6) for g, r in zip(got, ref)]
        return torch.stack(terms).mean()
