"""Where the shipped weight files are and what they are called: the one place that knows (no torch).

The repository ships, per codec ``<name>``, in ``models/weights/`` (installed: ``latentcast/models/weights/``)::

    <name>.safetensors            the codec (models/codec.py: LatentCodec.load)
    <name>.onnx/                  its edge bundle (edge/encoder.py, written by ``latentcast export edge``)
    <name>-temporal.safetensors   its P-frame tables (edge/temporal.py, models/temporal.py;
                                  written by ``latentcast train temporal``)
    <variant>-synthesis.safetensors  a cheaper synthesis g_s for a codec's packets (models/synthesis.py;
                                  written by ``latentcast release synthesis``), e.g. elic-lite-fast

The folder is found through the ``latentcast.models`` package's location without importing it, so the
edge (which never imports torch or ``latentcast.models``) resolves its bundle here too.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

__all__ = ["WeightKind", "SUFFIXES", "weights_dir", "weights_path", "codec_name_of", "read_tagged_file"]

WeightKind = Literal["codec", "edge-bundle", "temporal-tables", "synthesis"]

#: file (or folder) name of each kind after the codec name
SUFFIXES: dict[str, str] = {"codec": ".safetensors", "edge-bundle": ".onnx", "temporal-tables": "-temporal.safetensors",
                             "synthesis": "-synthesis.safetensors"}


@functools.lru_cache(maxsize=1)
def weights_dir() -> Path:
    """The shipped weights folder: ``weights/`` inside the ``latentcast.models`` package (not imported)."""
    spec = importlib.util.find_spec("latentcast.models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package latentcast.models not found: cannot locate the shipped weights")
    return Path(next(iter(spec.submodule_search_locations))).resolve() / "weights"


def weights_path(name: str, kind: WeightKind = "codec", *, folder: Path | str | None = None) -> Path:
    """The file of codec ``name`` of this ``kind`` in ``folder`` (default: the shipped weights folder).
    Only the path: whether it exists is the caller's question."""
    if kind not in SUFFIXES:
        raise ValueError(f"unknown weight kind {kind!r} (one of {', '.join(SUFFIXES)})")
    return (Path(folder) if folder is not None else weights_dir()) / f"{name}{SUFFIXES[kind]}"


def codec_name_of(path: Path | str) -> str:
    """The codec name in a weight file's or bundle's name (``.../elic-lite.onnx`` -> ``elic-lite``); a name
    without a known suffix is the codec name itself."""
    name = Path(path).name
    for suffix in sorted(SUFFIXES.values(), key=len, reverse=True):  # "-temporal.safetensors" before ".safetensors"
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def read_tagged_file(path: Path | str, fmt: str, *, what: str, get: str,
                     framework: str = "pt") -> tuple[dict[str, Any], dict[str, str]]:
    """The tensors and metadata of a latentcast safetensors file whose ``format`` metadata is ``fmt``.

    ``what`` names the file in errors ("codec weights"); ``get`` says how to get one. A missing file
    is a ``FileNotFoundError``, another file kind a ``ValueError`` quoting its format. ``framework``:
    ``"pt"`` (torch tensors) or ``"numpy"``.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found ({get})")
    with safe_open(str(path), framework=framework) as f:
        md = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if md.get("format") != fmt:
        raise ValueError(f"{path} is not a latentcast {what} file (format {md.get('format')!r}, expected {fmt!r})")
    return tensors, md
