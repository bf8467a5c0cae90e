"""Synthesis files: a g_s for one codec's packets, chosen by the cloud (``codec.synthesis``).

::

    packet ──entropy decoding (the codec's own, bit-exact)──► ŷ, mask, ẑ ──g_s (this file's)──► ẑ_c ──► frame

A packet names its codec's weights hash; that is what must match for decoding. The synthesis only turns
the decoded latent into a frame, so the cloud may render with a cheaper one (``latentcast train
synthesis``) without touching the edge or the bitstream. A synthesis file names the codec weights hash
it was trained for and is refused for any other codec.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from latentcast.weights import SUFFIXES, read_tagged_file, weights_dir, weights_path

from .elic import ElicConfig, SynthesisToLatent

__all__ = ["SYNTHESIS_FORMAT", "SYNTHESIS_CHOICES", "SynthesisFile", "save_synthesis", "load_synthesis",
           "find_synthesis", "release_synthesis", "synthesis_macs_per_cell"]

SYNTHESIS_FORMAT = "latentcast-synthesis-1"
#: the values of ``codec.synthesis`` besides a shipped name or a path: "auto" renders with the synthesis
#: shipped for the loaded codec when there is one (else its own g_s), "own" always with the codec's own
SYNTHESIS_CHOICES = ("auto", "own")
#: the fields of ElicConfig a synthesis file may change; the rest must be the codec's
SYNTHESIS_FIELDS = ("gs_width", "gs_blocks", "gs_up_widths", "gs_tail_blocks")


class SynthesisFile:
    """A loaded synthesis: its g_s, configuration, the codec hash it decodes and its metadata."""

    def __init__(self, g_s: SynthesisToLatent, cfg: ElicConfig, codec_hash: bytes, path: Path | None, meta: dict):
        self.g_s, self.cfg, self.codec_hash, self.path, self.meta = g_s.eval(), cfg, codec_hash, path, meta

    @property
    def name(self) -> str:
        return self.path.name.removesuffix(SUFFIXES["synthesis"]) if self.path else "unnamed"


def save_synthesis(g_s: SynthesisToLatent, cfg: ElicConfig, codec_hash: bytes, path: Path | str, *,
                   meta: dict | None = None) -> Path:
    """Write ``g_s`` (trained for the codec whose weights hash is ``codec_hash``) to ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in g_s.state_dict().items()}
    md = {"format": SYNTHESIS_FORMAT, "config": json.dumps(cfg.to_dict()), "codec_hash": codec_hash.hex(),
          "meta": json.dumps(meta or {})}
    save_file(tensors, str(path), metadata=md)
    return path


def release_synthesis(checkpoint: Path | str, out: Path | str) -> Path:
    """Freeze ``checkpoint`` (``last.pt`` of ``latentcast train synthesis``) into the synthesis file ``out``."""
    st = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if "student" not in st or "codec_hash" not in st:
        raise ValueError(f"{checkpoint} is not a `latentcast train synthesis` checkpoint")
    cfg = ElicConfig.from_dict(st["student"])
    g_s = SynthesisToLatent(cfg)
    g_s.load_state_dict(st["model"])
    train = {k: v for k, v in st.get("train", {}).items() if k not in ("out", "threads")}
    return save_synthesis(g_s, cfg, bytes.fromhex(st["codec_hash"]), out, meta={"step": st["step"], "train": train})


def find_synthesis(codec_hash: bytes, folder: Path | None = None) -> Path | None:
    """The first synthesis file (by name) in ``folder`` (default: the shipped weights) trained for the codec
    whose weights hash is ``codec_hash``; None when there is none."""
    from safetensors import safe_open

    for p in sorted((folder or weights_dir()).glob(f"*{SUFFIXES['synthesis']}")):
        with safe_open(str(p), framework="pt") as f:
            md = f.metadata() or {}
        if md.get("format") == SYNTHESIS_FORMAT and md.get("codec_hash") == codec_hash.hex():
            return p
    return None


def _resolve(name: str) -> Path:
    p = Path(name)
    if p.suffix == ".safetensors" or p.is_file():
        return p
    cand = weights_path(name, "synthesis")
    if not cand.is_file():
        suffix = SUFFIXES["synthesis"]
        have = sorted(q.name.removesuffix(suffix) for q in weights_dir().glob(f"*{suffix}"))
        raise FileNotFoundError(f"no synthesis named {name!r} (shipped: {', '.join(have) or 'none'}; "
                                "or give a .safetensors path)")
    return cand


def load_synthesis(name: str, codec_cfg: ElicConfig, codec_hash: bytes) -> SynthesisFile:
    """The synthesis ``name`` (shipped in models/weights as ``<name>-synthesis.safetensors``, or a path) for
    the codec with configuration ``codec_cfg`` and weights hash ``codec_hash``; refuses another codec's."""
    path = _resolve(name)
    sd, md = read_tagged_file(path, SYNTHESIS_FORMAT, what="synthesis",
                              get="train one with `latentcast train synthesis` and `latentcast release synthesis`")
    if md.get("codec_hash") != codec_hash.hex():
        raise ValueError(f"synthesis {path} was trained for codec weights {md.get('codec_hash', '?')[:16]}, "
                         f"this codec is {codec_hash.hex()[:16]}: train one for it with `latentcast train synthesis`")
    cfg = ElicConfig.from_dict(json.loads(md["config"]))
    other = {k for k, v in cfg.to_dict().items() if k not in SYNTHESIS_FIELDS and v != codec_cfg.to_dict()[k]}
    if other:
        raise ValueError(f"synthesis {path} differs from the codec in {', '.join(sorted(other))}")
    g_s = SynthesisToLatent(cfg)
    g_s.load_state_dict(sd)
    return SynthesisFile(g_s, cfg, codec_hash, path, json.loads(md.get("meta", "{}")))


def synthesis_macs_per_cell(g_s: SynthesisToLatent) -> int:
    """Multiply-accumulates of g_s (without M(ẑ), once per keyframe) per 16x16-pixel cell of the frame."""
    macs = 0

    def hook(m, _inp, out):
        nonlocal macs
        k = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]
        macs += int(out.numel() * k)

    hs = [m.register_forward_hook(hook) for m in g_s.modules() if isinstance(m, torch.nn.Conv2d)
          and not any(m is n for n in g_s.global_net.modules())]
    try:
        cfg_m = g_s.head.weight.shape[1] - 1 - g_s.global_net[-1].out_channels
        with torch.no_grad():
            g_s.from_global(torch.zeros(1, cfg_m, 4, 4), torch.ones(1, 1, 4, 4),
                            torch.zeros(1, g_s.global_net[-1].out_channels, 4, 4))
    finally:
        for h in hs:
            h.remove()
    return macs // 16
