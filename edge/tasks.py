"""Task label lists: what the edge grounds for a task (DISCOVER's task-level prior; stdlib only).

A task list is made once per task (by a multimodal LLM following the paper's Algorithm 1 prompt,
``latentcast task new``, or curated by hand) and stored as a small versioned JSON file::

    {
      "format": "latentcast-task-1",
      "name": "traffic",
      "description": "count vehicles and cyclists at an intersection",
      "source": {"kind": "llm", "model": "gpt-4o-2024-08-06", "prompt_version": "discover-alg1-v1",
                 "endpoint": "api.openai.com", "created": "2025-11-22T05:30:00Z"},
      "label_set_hash": "1a2b3c4d",
      "labels": ["car", "truck", "bus", ...]
    }

- ``labels`` are normalised on load and save: stripped, inner whitespace collapsed to one space,
  lower case, duplicates dropped keeping the first. ROI ``label_id`` values index this list.
- ``label_set_hash`` is :func:`latentcast.proto.ids.label_set_hash` of the normalised labels (hex):
  the value every packet header of a stream grounded with this list carries, so the cloud knows
  which labels the ids refer to. It is optional in a file; when present it must match the labels.
- ``source.kind`` is ``"shipped"`` (hand-curated lists in ``edge/task_lists/``) or ``"llm"``;
  ``endpoint`` is the LLM host (``host[:port]``): never a key, a user name or a query string.

Lookup of a task name (``[a-z0-9][a-z0-9_-]*``): the user cache ``$LATENTCAST_CACHE/tasks/<name>.json``
(default ``~/.cache/latentcast/tasks``) first, then the shipped lists. Writes are atomic (a temporary
file in the same folder, then ``os.replace``): a failed write never corrupts a cached list.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentcast.proto.ids import label_set_hash
from latentcast.shared import cache_dir as user_cache_dir

__all__ = ["FORMAT", "SOURCE_KINDS", "MAX_LABELS", "MAX_LABEL_CHARS", "TaskError", "TaskSource", "TaskList",
           "TaskEntry", "normalize_labels", "check_task_name", "cache_dir", "shipped_dir", "task_path",
           "load_task", "load_task_file", "save_task", "list_tasks", "utc_now"]

FORMAT = "latentcast-task-1"
SOURCE_KINDS = ("shipped", "llm")
MAX_LABELS = 4096  # the cloud's default session limit (cloud sessions.max_labels)
MAX_LABEL_CHARS = 256  # the cloud's default longest label (cloud sessions.max_id_chars)
MAX_FILE_BYTES = 4 * 1024 * 1024
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
_MAX_NAME = 64
_FIELDS = ("format", "name", "description", "source", "label_set_hash", "labels")
_SOURCE_FIELDS = ("kind", "model", "prompt_version", "endpoint", "created")


class TaskError(ValueError):
    """A task list that cannot be found, read or used; the message names the file and the field."""


def utc_now() -> str:
    """The current UTC time as ISO 8601 with a ``Z`` (the ``created`` field of generated lists)."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def check_task_name(name: Any) -> str:
    """``name`` if it is a valid task name (``[a-z0-9][a-z0-9_-]*``, at most 64 characters)."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or len(name) > _MAX_NAME:
        raise TaskError(f"invalid task name {name!r}: use lower-case letters, digits, '-' and '_', starting with "
                        f"a letter or digit, at most {_MAX_NAME} characters (e.g. traffic, people-counting)")
    return name


def normalize_labels(labels: Any, *, where: str = "labels") -> tuple[str, ...]:
    """Stripped, whitespace-collapsed, lower-case, de-duplicated (first kept) labels. Raises
    :class:`TaskError` for a non-list, a non-string or empty item, an over-long item, or no labels."""
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise TaskError(f"{where}: expected a list of strings, got {type(labels).__name__}")
    out: dict[str, None] = {}
    for i, lab in enumerate(labels):
        if not isinstance(lab, str):
            raise TaskError(f"{where}[{i}]: expected a string, got {type(lab).__name__} {lab!r}")
        key = " ".join(lab.split()).lower()
        if not key:
            raise TaskError(f"{where}[{i}]: empty label")
        if len(key) > MAX_LABEL_CHARS:
            raise TaskError(f"{where}[{i}]: label of {len(key)} characters (max {MAX_LABEL_CHARS}): {key[:40]!r}...")
        out.setdefault(key, None)
    if not out:
        raise TaskError(f"{where}: empty: a task needs at least one label")
    if len(out) > MAX_LABELS:
        raise TaskError(f"{where}: {len(out)} labels (max {MAX_LABELS})")
    return tuple(out)


def _check_created(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TaskError(f"{where}: expected an ISO 8601 date or time string, got {value!r}")
    try:
        _dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise TaskError(f"{where}: {value!r} is not an ISO 8601 date or time (e.g. 2025-11-22 or "
                        "2025-11-22T05:30:00Z)") from None
    return value.strip()


@dataclass(frozen=True)
class TaskSource:
    """Where a label list came from."""

    kind: str  # "shipped" (hand-curated, in edge/task_lists/) or "llm" (latentcast task new)
    model: str  # the LLM's name as the endpoint reported it, or "hand-curated"
    prompt_version: str | None = None  # edge/task_llm.py PROMPT_VERSION of an LLM list; None for shipped lists
    endpoint: str | None = None  # LLM host[:port] (no scheme, user, key or query); None for shipped lists
    created: str = ""  # ISO 8601 date or UTC time

    def __post_init__(self) -> None:
        self.validate("source")

    def validate(self, where: str) -> None:
        if self.kind not in SOURCE_KINDS:
            raise TaskError(f"{where}.kind: {self.kind!r} is not one of {', '.join(SOURCE_KINDS)}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise TaskError(f"{where}.model: a non-empty string is required, got {self.model!r}")
        for name in ("prompt_version", "endpoint"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise TaskError(f"{where}.{name}: expected a non-empty string or null, got {v!r}")
        if self.kind == "llm" and not self.prompt_version:
            raise TaskError(f"{where}.prompt_version: required for an LLM-generated list")
        if self.endpoint is not None and re.search(r"[/@?#\s]", self.endpoint):
            raise TaskError(f"{where}.endpoint: {self.endpoint!r} must be host[:port] only (no scheme, path, "
                            "user or query: keys never go into task files)")
        _check_created(self.created, f"{where}.created")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model, "prompt_version": self.prompt_version,
                "endpoint": self.endpoint, "created": self.created}


@dataclass(frozen=True)
class TaskList:
    """A task's label list and its provenance. ``labels`` are normalised by the constructor."""

    name: str
    description: str
    labels: tuple[str, ...]
    source: TaskSource
    format: str = FORMAT
    path: Path | None = field(default=None, compare=False)  # the file it was loaded from or saved to

    def __post_init__(self) -> None:
        check_task_name(self.name)
        if not isinstance(self.description, str) or not self.description.strip():
            raise TaskError(f"task {self.name!r}: description must be a non-empty string")
        if self.format != FORMAT:
            raise TaskError(f"task {self.name!r}: format {self.format!r} is not supported (expected {FORMAT!r})")
        if not isinstance(self.source, TaskSource):
            raise TaskError(f"task {self.name!r}: source must be a TaskSource, got {type(self.source).__name__}")
        object.__setattr__(self, "labels", normalize_labels(self.labels))

    @property
    def hash_bytes(self) -> bytes:
        """The packet header's ``label_set_hash`` of this list (4 bytes)."""
        return label_set_hash(self.labels)

    @property
    def hash(self) -> str:
        """:attr:`hash_bytes` as 8 hex digits (what ``latentcast info`` and ``task show`` print)."""
        return self.hash_bytes.hex()

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "name": self.name, "description": self.description,
                "source": self.source.to_dict(), "label_set_hash": self.hash, "labels": list(self.labels)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "task list") -> TaskList:
        """Validates ``data`` (a parsed task file); errors name ``where`` and the field."""
        def err(msg: str) -> TaskError:
            return TaskError(f"{where}: {msg}")

        if not isinstance(data, Mapping):
            raise err(f"the top level must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise err(f"unknown field(s) {', '.join(map(repr, unknown))} (valid: {', '.join(_FIELDS)})")
        for k in ("format", "name", "description", "source", "labels"):
            if k not in data:
                raise err(f"missing field {k!r}")
        if data["format"] != FORMAT:
            raise err(f"format: {data['format']!r} is not supported (expected {FORMAT!r})")
        for k in ("name", "description"):
            if not isinstance(data[k], str) or not data[k].strip():
                raise err(f"{k}: expected a non-empty string, got {data[k]!r}")
        try:
            check_task_name(data["name"])
        except TaskError as exc:
            raise err(f"name: {exc}") from None
        src = data["source"]
        if not isinstance(src, Mapping):
            raise err(f"source: expected an object, got {type(src).__name__}")
        unknown = sorted(set(src) - set(_SOURCE_FIELDS))
        if unknown:
            raise err(f"source: unknown field(s) {', '.join(map(repr, unknown))} (valid: {', '.join(_SOURCE_FIELDS)})")
        for k in ("kind", "model", "created"):
            if k not in src:
                raise err(f"missing field 'source.{k}'")
        try:
            source = TaskSource(kind=src["kind"], model=src["model"], prompt_version=src.get("prompt_version"),
                                endpoint=src.get("endpoint"), created=src["created"])
            labels = normalize_labels(data["labels"])
        except TaskError as exc:
            raise err(str(exc)) from None
        tl = cls(name=data["name"], description=data["description"].strip(), labels=labels, source=source)
        stored = data.get("label_set_hash")
        if stored is not None and stored != tl.hash:
            raise err(f"label_set_hash: {stored!r} does not match the labels ({tl.hash}); the labels were edited: "
                      f"set it to {tl.hash!r} or delete the field")
        return tl


# ---------------------------------------------------------------------- files and lookup


def cache_dir() -> Path:
    """``$LATENTCAST_CACHE/tasks`` (default ``~/.cache/latentcast/tasks``): lists made on this machine."""
    return user_cache_dir() / "tasks"


def shipped_dir() -> Path:
    """The ready-made lists installed with the package (``edge/task_lists/``)."""
    return Path(__file__).resolve().parent / "task_lists"


def load_task_file(path: str | os.PathLike) -> TaskList:
    """A task list from ``path``; :class:`TaskError` naming the file (and field) when it is unusable."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise TaskError(f"{p}: {size} bytes, larger than a task list can be ({MAX_FILE_BYTES})")
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskError(f"task file {p} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(f"{p}: cannot read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TaskError(f"{p}: not valid JSON: {exc}") from None
    tl = TaskList.from_dict(data, where=str(p))
    if tl.name != p.stem:
        raise TaskError(f"{p}: name: {tl.name!r} differs from the file name {p.stem!r}")
    object.__setattr__(tl, "path", p)
    return tl


def task_path(name: str) -> Path:
    """The file ``name`` resolves to: the user cache first, then the shipped lists."""
    check_task_name(name)
    for d in (cache_dir(), shipped_dir()):
        p = d / f"{name}.json"
        if p.is_file():
            return p
    known = ", ".join(sorted({e.name for e in list_tasks()})) or "none"
    raise TaskError(f"no task list named {name!r} in {cache_dir()} or {shipped_dir()} (known: {known}); "
                    f"make one with: latentcast task new {name} --description '...'")


def load_task(name: str) -> TaskList:
    """The task list ``name`` (user cache, then shipped)."""
    return load_task_file(task_path(name))


def save_task(task: TaskList, directory: str | os.PathLike | None = None) -> Path:
    """Write ``task`` to ``directory`` (default :func:`cache_dir`) as ``<name>.json``, atomically:
    a temporary file in the same folder, flushed and fsynced, then ``os.replace``. Returns the path."""
    d = Path(directory) if directory is not None else cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    dest = d / f"{check_task_name(task.name)}.json"
    data = task.to_json().encode("utf-8")
    mode = dest.stat().st_mode & 0o777 if dest.is_file() else 0o644  # mkstemp's 0600 would hide the list
    fd, tmp = tempfile.mkstemp(prefix=f".{task.name}.", suffix=".tmp", dir=d)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    object.__setattr__(task, "path", dest)
    return dest


@dataclass(frozen=True)
class TaskEntry:
    """One task file found by :func:`list_tasks`."""

    name: str
    origin: str  # "cache" or "shipped"
    path: Path
    active: bool  # the file the name resolves to (the cache wins over a shipped list of the same name)


def _names(d: Path) -> Iterable[str]:
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.json") if p.is_file() and _NAME_RE.fullmatch(p.stem))


def list_tasks() -> list[TaskEntry]:
    """Every cached and shipped task file, by name (cache first within a name)."""
    cached, shipped = set(_names(cache_dir())), set(_names(shipped_dir()))
    out = []
    for name in sorted(cached | shipped):
        if name in cached:
            out.append(TaskEntry(name, "cache", cache_dir() / f"{name}.json", True))
        if name in shipped:
            out.append(TaskEntry(name, "shipped", shipped_dir() / f"{name}.json", name not in cached))
    return out
