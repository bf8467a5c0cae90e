"""Command-line options generated from a config dataclass, so that a default lives in one place.

:func:`add_dataclass_options` adds ``--field-name`` for each field (type and default from the field, help
from the field's trailing ``#`` comment and the comment lines right below it); :func:`dataclass_from_args`
builds the dataclass back from the parsed options::

    add_dataclass_options(parser, TrainConfig, exclude=("overrides",), aliases={"stage1_steps": ("--steps-1",)})
    cfg = dataclass_from_args(TrainConfig, args)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import logging
import re
import tokenize
import typing
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from latentcast.config import unwrap_optional

log = logging.getLogger(__name__)

__all__ = ["field_comments", "add_dataclass_options", "add_encoder_options", "add_average_options", "chosen_average",
           "dataclass_from_args", "option_name", "EDGE_CONFIG_HELP", "temporal_settings"]

#: ``--edge-config`` of the tools that code temporal streams outside an edge (eval, bench stream)
EDGE_CONFIG_HELP = ("code temporal streams with the temporal settings of this edge config and its "
                    "LATENTCAST_EDGE__TEMPORAL__* variables, e.g. to measure one lever (default: the defaults)")

_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


def option_name(field: str) -> str:
    """``stage1_steps`` -> ``--stage1-steps``."""
    return "--" + field.replace("_", "-")


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """``{field: comment}`` from the class source: the comment after ``name: type = default`` and the
    comment-only lines that continue it (``#   ...`` indented under it)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source (a frozen install): no help texts
        return {}
    out: dict[str, str] = {}
    current: str | None = None
    names = {f.name for f in dataclasses.fields(cls)}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in names and current != tok.string:
            line = tok.line.strip()
            current = tok.string if re.match(rf"{tok.string}\s*:", line) else None
        elif tok.type == tokenize.NL and not tok.line.strip():  # a blank line ends a field's comment
            current = None
        elif tok.type == tokenize.COMMENT and current is not None:
            text = tok.string.lstrip("#").strip()
            out[current] = f"{out[current]} {text}" if current in out else text
        elif tok.type == tokenize.NAME and tok.start[1] == 4:
            current = None
    return out


def _scalar_type(cls: type, f: dataclasses.Field) -> type:
    hints = typing.get_type_hints(cls)
    t = unwrap_optional(hints.get(f.name, f.type))[0]  # an optional field's option defaults to None: unset
    if isinstance(t, str):
        t = _SCALARS.get(t, str)
    if t not in (int, float, str, bool):
        raise TypeError(f"{cls.__name__}.{f.name}: type {t!r} has no command-line form; exclude the field")
    return t


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"field {f.name!r} has no default")


def add_dataclass_options(p: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                          include: Sequence[str] | None = None, exclude: Collection[str] = (),
                          aliases: Mapping[str, Sequence[str]] | None = None,
                          rename: Mapping[str, str] | None = None,
                          choices: Mapping[str, Sequence[Any]] | None = None,
                          help_extra: Mapping[str, str] | None = None, only_given: bool = False) -> list[str]:
    """Add one option per field of dataclass ``cls`` (``include``: these, in this order; else all but
    ``exclude``). The option is ``--field-name`` (``rename``: another spelling; ``aliases``: more spellings),
    its ``dest`` the field name. ``bool`` fields that default to False are flags, those that default to True
    get ``--no-...`` too. Help: the field's comment and its default. With ``only_given`` the options
    default to None (the caller overrides only what was given, e.g. over a config file) and the help
    still names the dataclass default. Returns the field names added."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(include) if include is not None else [n for n in fields if n not in exclude]
    comments = field_comments(cls)
    aliases, rename, choices, help_extra = aliases or {}, rename or {}, choices or {}, help_extra or {}
    for name in names:
        if name not in fields:
            raise ValueError(f"{cls.__name__} has no field {name!r}")
        f = fields[name]
        typ, default = _scalar_type(cls, f), _default(f)
        flags = [rename.get(name, option_name(name)), *aliases.get(name, ())]
        text = " ".join(t for t in (comments.get(name, ""), help_extra.get(name, "")) if t)
        kw: dict[str, Any] = {"dest": name}
        if typ is bool:
            plain_flag = not default and not only_given
            kw["action"] = "store_true" if plain_flag else argparse.BooleanOptionalAction
            kw["default"] = None if only_given else default
        else:
            kw["type"] = typ
            kw["default"] = None if only_given else default
            if name in choices:
                kw["choices"] = list(choices[name])
        shown = "unset" if default is None else f"{default!r}" if isinstance(default, str) else f"{default}"
        kw["help"] = f"{text} (default {shown})".strip().replace("%", "%%")  # argparse formats help with %
        p.add_argument(*flags, **kw)
    return names


def dataclass_from_args(cls: type, args: argparse.Namespace, *, base: Any = None, **values: Any) -> Any:
    """``cls`` with every field that ``args`` holds (not None) and ``values`` (which win) over ``base``
    (default: the dataclass defaults)."""
    start = dataclasses.asdict(base) if base is not None else {}
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
             if getattr(args, f.name, None) is not None}
    return cls(**{**start, **given, **values})


def temporal_settings(path: str):
    """The ``temporal`` section of the edge config at ``path`` (a TemporalConfig); a bad file exits with its
    error as ``--edge-config``'s."""
    from latentcast.edge.config import load_edge_config

    try:
        return load_edge_config(path).temporal
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: --edge-config {path}: {exc}") from None


def add_average_options(p: argparse.ArgumentParser, verb: str, note: str = "") -> None:
    """``--ema`` / ``--ema-slow`` (one or neither): which of a training checkpoint's moving averages of the weights
    the tool ``verb``s instead of its weights (the keys of ``models.training.AVERAGES``); :func:`chosen_average`
    reads the choice back."""
    avg = p.add_mutually_exclusive_group()
    avg.add_argument("--ema", action="store_true",
                     help=f"{verb} the moving average of the weights (a run trained with --ema), not the weights{note}")
    avg.add_argument("--ema-slow", action="store_true",
                     help=f"{verb} the slower moving average (a run trained with --ema-slow), not the weights")


def chosen_average(a: argparse.Namespace) -> str | None:
    """The average :func:`add_average_options` chose: ``"ema"``, ``"ema_slow"`` or None (the weights)."""
    return "ema" if a.ema else "ema_slow" if a.ema_slow else None


def add_encoder_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--analysis`` and ``--rdoq``: the edge encoder's g_a precision and its choice of symbols, as the edge
    config's ``codec.analysis`` and ``codec.rdoq``."""
    from latentcast.edge.config import CodecConfig

    add_dataclass_options(p, CodecConfig, include=("analysis", "rdoq"),
                          help_extra={"analysis": "(the edge's codec.analysis)", "rdoq": "(the edge's codec.rdoq)"})
