"""``latentcast export grounding``: a Grounding DINO bundle for the edge's open-vocabulary backend.

::

    --model (local folder | hub id | short name | tiny-random) ─► transformers GroundingDino (PyTorch)
    --labels (task name | comma-separated labels) ─► text side once per list (BERT, in chunks that fit
                                                     the model's text length) ─► text.npz
    image side (backbone, fusion, decoder) ─► image.onnx (fixed --image-size) ─► manifest.json
    [--tensorrt] ─► image.engine (needs TensorRT and an NVIDIA GPU)

The edge then runs it with ``grounding.backend: open-vocab`` and ``grounding.bundle: <out>``.
A new label list for the same model only rewrites text.npz and the manifest (``--labels-only``).
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["SHORT_NAMES", "add_arguments", "main", "resolve_labels"]

# short model names -> hub ids (IDEA-Research's releases, Apache-2.0)
SHORT_NAMES = {"grounding-dino-tiny": "IDEA-Research/grounding-dino-tiny",
               "grounding-dino-base": "IDEA-Research/grounding-dino-base"}
# a tiny randomly initialised model (seed 0): for tests and dry runs, detects nothing useful
TINY_RANDOM = "tiny-random"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("grounding (latentcast export grounding)")
    g.add_argument(
        "--model",
        default="grounding-dino-tiny",
        help=f"local folder, hub id, {', '.join(SHORT_NAMES)}, or {TINY_RANDOM} (default grounding-dino-tiny)",
    )
    g.add_argument("--labels", default=None,
                   help="a task name (latentcast task list) or comma-separated labels; default: the edge's default "
                        "task labels")
    g.add_argument("--format", default="onnx", choices=["onnx"], help="graph format (onnx)")
    g.add_argument("--tensorrt", action="store_true", help="also build a TensorRT engine (NVIDIA GPU + TensorRT)")
    g.add_argument("--image-size", default="576x768", help="the graph's fixed input HxW (default 576x768)")
    g.add_argument("--max-text-len", type=int, default=None,
                   help="tokens per text chunk (default: the model's, 256 for the released models)")
    g.add_argument("--download", action="store_true",
                   help="allow fetching the model from the hub (default: local folder or hub cache only)")
    g.add_argument("--labels-only", action="store_true",
                   help="keep --out's image.onnx and only re-export the text side for new labels")


def resolve_labels(spec: str | None) -> tuple[list[str], str]:
    """(labels, name for the bundle folder) from a task name or a comma-separated list."""
    from latentcast.edge.config import GroundingConfig
    from latentcast.edge.tasks import TaskError, load_task

    if not spec:
        return list(GroundingConfig().labels), "default"
    if "," not in spec:
        try:
            tl = load_task(spec.strip())
            return list(tl.labels), tl.name
        except (TaskError, FileNotFoundError):
            pass
    labels = [s.strip() for s in spec.split(",") if s.strip()]
    if not labels:
        raise ValueError(f"--labels {spec!r}: no labels")
    return labels, "custom"


def _image_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"--image-size {text!r}: expected HxW, e.g. 576x768")
    return int(m.group(1)), int(m.group(2))


def main(a: argparse.Namespace) -> int:
    from latentcast.models import grounding_dino as gd

    labels, list_name = resolve_labels(a.labels)
    size = _image_size(a.image_size)
    if a.model == TINY_RANDOM:
        model, tok = gd.tiny_grounding_dino(seed=0)
        log.warning("--model %s: a randomly initialised tiny model; the bundle runs but finds nothing meaningful",
                    TINY_RANDOM)
    else:
        try:
            model, tok = gd.load_grounding_dino(SHORT_NAMES.get(a.model, a.model), local_files_only=not a.download)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise OSError(f"{exc}{'' if a.download else '; or add --download to fetch it from the hub'}") from None
    short = Path(a.model).name if a.model not in SHORT_NAMES else a.model
    out = Path(a.out) if a.out else Path("grounding") / f"{short}-{list_name}"
    if a.labels_only:
        gd.export_labels(model, tok, labels, out, max_text_len=a.max_text_len)
    else:
        gd.export_grounding(model, tok, labels, out, image_size=size, max_text_len=a.max_text_len,
                            name=SHORT_NAMES.get(a.model, a.model))
    if a.tensorrt:
        print(gd.build_tensorrt_engine(out / "image.onnx", out / "image.engine"))
    import json

    man = json.loads((out / "manifest.json").read_text())
    print(f"{out}: {man['model']} {man['image_size'][0]}x{man['image_size'][1]}, {len(man['labels'])} labels in "
          f"{len(man['chunks'])} chunk(s), label set hash {man['label_set_hash']}")
    print(f"edge config: grounding.backend: open-vocab, grounding.bundle: {out}")
    return 0
