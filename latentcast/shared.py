"""Where the shared, read-only material (data sets, third-party weights) is found.

One setting: the environment variable ``LATENTCAST_SHARED``. Without it, the
fallback is the ``shared`` folder beside the repository (``../shared`` from the
project root), then ``../shared`` from the current directory. Users on their
own machines point the variable at their own copy.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "LATENTCAST_SHARED"
CACHE_ENV_VAR = "LATENTCAST_CACHE"

__all__ = ["CACHE_ENV_VAR", "ENV_VAR", "cache_dir", "file_sha256", "portable_path", "shared_dir", "shared_path"]


def _candidates() -> list[Path]:
    env = os.environ.get(ENV_VAR)
    if env:
        return [Path(env).expanduser()]
    repo_root = Path(__file__).resolve().parent.parent
    return [repo_root.parent / "shared", Path.cwd().parent / "shared"]


def shared_dir() -> Path:
    """The shared folder; raises ``FileNotFoundError`` naming the setting when none exists."""
    cands = _candidates()
    for c in cands:
        if c.is_dir():
            return c
    tried = ", ".join(str(c) for c in cands)
    raise FileNotFoundError(
        f"shared data folder not found (tried {tried}); set {ENV_VAR} to the folder that "
        "holds data/ and models/"
    )


def shared_path(*parts: str) -> Path:
    """A file under the shared folder; raises ``FileNotFoundError`` naming it if missing."""
    p = shared_dir().joinpath(*parts)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist (shared folder from {ENV_VAR} or ../shared)")
    return p


def portable_path(path: str | os.PathLike) -> str:
    """A path for results files without this machine's layout: ``$LATENTCAST_SHARED/...`` for files in
    the shared folder, a path relative to the current directory for files below it, else the path."""
    p = Path(path)
    if "://" in str(path):
        return str(path)
    try:
        return "$" + ENV_VAR + "/" + p.resolve().relative_to(shared_dir().resolve()).as_posix()
    except (ValueError, FileNotFoundError):
        pass
    try:
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks (bundle manifests record these)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """The user's writable cache (training latents, task lists from the LLM, runs): ``$LATENTCAST_CACHE`` or
    ``~/.cache/latentcast``."""
    return Path(os.environ.get(CACHE_ENV_VAR, Path.home() / ".cache" / "latentcast")).expanduser()
