"""Configuration files for the services: a YAML file over dataclass defaults, then environment
variables over the file (numpy-free; the edge and the cloud both use it).

A config class is a (possibly nested) dataclass whose every field has a default and a comment.
Precedence, lowest first: the dataclass defaults, the YAML file, environment variables.
An environment variable names a field by its path, upper-cased, joined by ``__`` under a
prefix: with prefix ``LATENTCAST_EDGE``, ``server.address`` is ``LATENTCAST_EDGE__SERVER__ADDRESS``.
Values from the environment are parsed by the field's type (``bool``: 1/0/true/false/yes/no;
lists: comma-separated). Unknown keys in the file and malformed values are errors that name the
key and, for unknown keys, list the valid ones.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["ConfigError", "unwrap_optional", "coerce_value", "load_config", "config_to_dict", "describe_config",
           "example_yaml", "field_comments"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or variable that cannot be used; the message names the key."""


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``(T, True)`` for ``T | None``, else ``(tp, False)``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str, *, from_env: bool) -> Any:
    tp, optional = unwrap_optional(tp)
    if value is None and dataclasses.is_dataclass(tp):  # a YAML section whose keys are all commented out
        value = {}
    if value is None or (from_env and optional and value == ""):
        if optional:
            return None
        raise ConfigError(f"{key}: a value is required")
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin in (list, tuple):
        (item_tp, *_rest) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        items = [_coerce(v, item_tp, f"{key}[{i}]", from_env=from_env) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: {value!r} is not a boolean (use true/false)")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not a number")
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: {value!r} is not {'an integer' if tp is int else 'a number'}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__}")
        return str(value)
    return value


def coerce_value(value: Any, tp: Any, key: str) -> Any:
    """``value`` (e.g. a command-line string) as type ``tp``, by the rules of config files; ``ConfigError``
    naming ``key`` when it is not one."""
    return _coerce(value, tp, key, from_env=False)


def _build(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ConfigError(f"unknown key(s) {', '.join(map(repr, unknown))}{where} (valid: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name, from_env=False)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from None


def _env_overrides(cls: type, env: Mapping[str, str], prefix: str, path: tuple[str, ...] = ()) -> dict:
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = unwrap_optional(hints[f.name])
        var = "__".join((prefix, *path, f.name)).upper()
        if dataclasses.is_dataclass(tp):
            sub = _env_overrides(tp, env, prefix, (*path, f.name))
            if sub:
                out[f.name] = sub
        elif var in env:
            out[f.name] = _coerce(env[var], hints[f.name], var, from_env=True)
    return out


def _merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def config_to_dict(cfg: Any) -> dict:
    """A config instance as plain data (for logs and summaries)."""
    return dataclasses.asdict(cfg)


def load_config(cls: type[T], path: str | os.PathLike | None = None, *, env_prefix: str,
                env: Mapping[str, str] | None = None) -> T:
    """Defaults of ``cls``, then the YAML file at ``path`` (if given), then ``env`` (default
    ``os.environ``) variables ``<env_prefix>__<FIELD>[__<SUBFIELD>]``."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{p}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        data = dict(loaded)
    base = config_to_dict(_build(cls, data))
    over = _env_overrides(cls, os.environ if env is None else env, env_prefix)
    return _build(cls, _merge(base, over))


def field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field in the class source (continuation lines that are
    only a comment are appended): the documentation of every option lives next to its default."""
    import inspect
    import re

    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    last = None
    pat = re.compile(r"^\s+(\w+)\s*:[^#]*#\s?(.*)$")
    for line in lines:
        m = pat.match(line)
        if m:
            last = m.group(1)
            out[last] = m.group(2).strip()
        elif last and line.strip().startswith("#"):
            out[last] += " " + line.strip().lstrip("#").strip()
        else:
            last = None
    return out


def describe_config(cls: type, env_prefix: str, path: tuple[str, ...] = ()) -> list[tuple[str, str, Any, str]]:
    """(YAML key, environment variable, default, comment) of every leaf field, for documentation."""
    rows = []
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        tp, _ = unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            rows += describe_config(tp, env_prefix, (*path, f.name))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        rows.append((".".join((*path, f.name)), "__".join((env_prefix, *path, f.name)).upper(), default,
                     comments.get(f.name, "")))
    return rows


def example_yaml(cls: type, env_prefix: str, *, title: str = "") -> str:
    """A YAML file with every option at its default and its comment (all keys commented out
    except the section headers, so the file loads to the defaults)."""
    import yaml

    out = [f"# {title}" if title else "", f"# Every key can also be set with {env_prefix}__<SECTION>__<KEY>",
           "# (upper case); a variable overrides this file. Uncomment to change a default.", ""]
    section = None
    for key, var, default, comment in describe_config(cls, env_prefix):
        parts = key.split(".")
        indent = ""
        if len(parts) > 1:
            if parts[0] != section:
                section = parts[0]
                out += ["", f"{section}:"]
            indent = "  "
        value = yaml.safe_dump(list(default) if isinstance(default, tuple) else default,
                               default_flow_style=True).strip().removesuffix("...").strip()
        out.append(f"{indent}# {parts[-1]}: {value}  # {comment}  [{var}]")
    return "\n".join(out).lstrip("\n") + "\n"
