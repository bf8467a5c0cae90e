"""What every results file records about its run: the command, the commit and the machine."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

__all__ = ["command", "commit", "machine", "portable_arg", "results_path", "write_results"]


def command(prog: str = "latentcast") -> str:
    """The command line as a user would type it (``latentcast ...``, or ``prog`` and the arguments), without this
    machine's layout: the shared folder as ``$LATENTCAST_SHARED``, paths below the current folder relative,
    the home folder as ``~``."""
    return " ".join([prog] + [portable_arg(a) for a in sys.argv[1:]])


def portable_arg(arg: str) -> str:
    """A path as a results file records it: relative paths as they are, absolute ones without this machine's
    layout (see :func:`command`)."""
    if not os.path.isabs(arg):
        return arg
    from latentcast.shared import portable_path

    out = portable_path(arg)
    home = str(Path.home())
    if os.path.isabs(out) and (out == home or out.startswith(home + os.sep)):
        out = "~" + out[len(home):]
    return out


def commit() -> str:
    """The repository's HEAD commit (with ``+dirty`` when the work tree has changes), or "unknown"."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, cwd=here).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def machine() -> dict:
    """Platform, Python, CPU model and count, and the versions of the numeric runtimes."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    try:
        import torch

        info["torch"], info["torch_threads"] = torch.__version__, torch.get_num_threads()
    except ImportError:
        pass
    return info


def results_path(path: str | os.PathLike) -> Path:
    """Where :func:`write_results` writes the JSON of ``path``: ``.json`` added when it has no suffix."""
    out = Path(path)
    return out if out.suffix else out.with_suffix(".json")


def write_results(path: str | os.PathLike, result: dict, markdown: str) -> Path:
    """A benchmark's JSON at ``path`` (``.json`` added when it has no suffix) and its markdown table beside it
    (``.md``); returns the JSON path."""
    import json

    out = results_path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown)
    return out
