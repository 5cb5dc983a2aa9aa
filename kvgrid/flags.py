"""Command-line flags generated from config dataclasses, so that an option is written once:
as a field with its default and, right below it, a docstring that is the flag's help.

A field ``max_num_seqs: int = 128`` becomes ``--max-num-seqs`` (type int, default 128);
``bool`` becomes ``--name/--no-name``; ``bool | None`` becomes ``--name {auto,on,off}`` (auto:
None); ``Literal[...]`` gives the choices; ``X | None`` takes X, default None. A field's
``metadata`` (:func:`flag`) may rename the flag, scale its unit, set a metavar or keep the
field off the command line."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import textwrap
import types
import typing
from collections.abc import Iterable
from pathlib import PurePath
from typing import Any, Literal, TypeVar

T = TypeVar("T")

_SWITCH = {"auto": None, "on": True, "off": False}


def flag(
    name: str | None = None,
    *,
    scale: float | None = None,
    metavar: str | None = None,
    cli: bool = True,
) -> dict[str, Any]:
    """A field's command-line metadata: ``field(default=..., metadata=flag(...))``.
    ``name``: the flag without dashes (default: the field's name in kebab case); ``scale``:
    the flag is in units of ``scale`` field units (``GiB``: a size in bytes given in GiB);
    ``cli=False``: no flag."""
    return {"flag": name, "scale": scale, "metavar": metavar, "cli": cli}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings: the string right below each field in the class body (bases
    first), as one line."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source (frozen, or built at run time): no help
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, nxt in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


@dataclasses.dataclass(frozen=True)
class _Flag:
    field: str
    option: str  # "--kebab-name"
    dest: str
    kwargs: dict[str, Any]
    kind: str  # "value" | "bool" | "switch" (auto/on/off)
    scale: float | None


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _flags(cls: type, fields: Iterable[str] | None) -> list[_Flag]:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    wanted = None if fields is None else list(fields)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(wanted or ()) - set(by_name)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    out = []
    for name in wanted if wanted is not None else list(by_name):
        f = by_name[name]
        meta = {**flag(), **f.metadata}
        if not meta["cli"]:
            continue
        option = "--" + (meta["flag"] or name.replace("_", "-"))
        dest = option[2:].replace("-", "_")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            raise ValueError(f"{cls.__name__}.{name} needs a default to be a flag")
        help_text = docs.get(name, "").replace("%", "%%") or None
        tp, optional = _unwrap_optional(hints[name])
        kw: dict[str, Any] = {"help": help_text}
        if meta["metavar"]:
            kw["metavar"] = meta["metavar"]
        kind = "value"
        if tp is bool and optional:
            kind = "switch"
            kw.update(choices=list(_SWITCH), default={v: k for k, v in _SWITCH.items()}[default])
        elif tp is bool:
            kind = "bool"
            kw.update(action=argparse.BooleanOptionalAction, default=default)
        else:
            if typing.get_origin(tp) is Literal:
                kw["choices"] = list(typing.get_args(tp))
                tp = type(kw["choices"][0])
            if meta["scale"]:
                tp, default = float, default / meta["scale"]
            if tp in (int, float):
                kw["type"] = tp
            elif tp is not str and not (isinstance(tp, type) and issubclass(tp, PurePath)):
                raise TypeError(
                    f"{cls.__name__}.{name}: no flag for {tp!r}; mark it flag(cli=False)"
                )
            kw["default"] = default  # text and paths arrive as the text given
        out.append(_Flag(name, option, dest, kw, kind, meta["scale"]))
    return out


def add_dataclass_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    fields: Iterable[str] | None = None,
) -> None:
    """Add a flag for each of ``cls``'s ``fields`` (default: all of them but those marked
    ``flag(cli=False)``)."""
    for f in _flags(cls, fields):
        parser.add_argument(f.option, dest=f.dest, **f.kwargs)


def dataclass_kwargs(
    cls: type, args: argparse.Namespace, fields: Iterable[str] | None = None
) -> dict[str, Any]:
    """The field values the flags that :func:`add_dataclass_args` added hold."""
    out = {}
    for f in _flags(cls, fields):
        value = getattr(args, f.dest)
        if f.kind == "switch":
            value = _SWITCH[value]
        elif f.scale and value is not None:
            value = int(value * f.scale)
        out[f.field] = value
    return out


def dataclass_from_args(
    cls: type[T], args: argparse.Namespace, fields: Iterable[str] | None = None, **extra: Any
) -> T:
    """``cls`` built from the flags' values, plus ``extra`` fields."""
    return cls(**dataclass_kwargs(cls, args, fields), **extra)
