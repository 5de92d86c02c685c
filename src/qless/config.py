"""Configuration machinery shared by every stage.

Each stage defines a frozen dataclass of its settings next to its code (``DataConfig`` in
:mod:`qless.data`, ``ProjectionConfig`` in :mod:`qless.project`, ...). A field carries its help
text in ``metadata["help"]``; that one definition drives the Python API, the command-line flags
(:func:`add_arguments` / :func:`from_args`), the JSON written into manifests (:func:`to_dict`)
and the config files read by ``qless run`` (:func:`from_dict`). Validation lives in each
class's ``__post_init__`` and raises :class:`~qless.errors.ConfigError`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

from qless.errors import ConfigError

T = TypeVar("T")


def option(default: Any, help: str, *, flag: bool = True) -> Any:
    """A dataclass field with help text. ``flag=False`` keeps it out of the command line."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence defaults: configs are frozen")
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag})


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Convert a JSON or command-line value to the field's declared type, or raise ConfigError."""
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required (got null)")
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is tuple:
        (item_tp, *_rest) = get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    raise TypeError(f"unsupported config field type {tp!r} at {where}")


def _join(where: str, key: str) -> str:
    """``"run.json:" + "extract"`` -> ``"run.json: extract"``; ``"a" + "b"`` -> ``"a.b"``."""
    return f"{where} {key}" if where.endswith(":") else f"{where}.{key}"


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build ``cls`` from a JSON-like mapping; unknown or ill-typed keys raise ConfigError.

    ``where`` names the place for messages, e.g. ``"run.json:"`` (fields are then named
    ``"run.json: warmup.epochs"``).
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object with fields of {cls.__name__}, got {type(data).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {', '.join(unknown)}; {cls.__name__} accepts {', '.join(sorted(names))}"
        )
    kwargs = {k: _convert(v, hints[k], _join(where, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if str(e).startswith(where):
            raise
        raise ConfigError(f"{where}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a config dataclass (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (), prefix: str = "") -> None:
    """Add one ``--flag`` per field of ``cls`` (dashes for underscores), help from metadata.

    ``prefix`` (e.g. ``"projection"``) names the flags ``--projection-FIELD`` when two configs
    of one command share field names. Defaults are left as ``None`` so that :func:`from_args`
    can tell what the user set and layer it over a preset or config file.
    """
    hints = _hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("flag", True):
            continue
        tp, _ = _strip_optional(hints[f.name])
        dest = f"{prefix}_{f.name}" if prefix else f.name
        flag = "--" + dest.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})"
        if tp is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif get_origin(tp) is Literal:
            group.add_argument(flag, dest=dest, choices=get_args(tp), default=None, help=help_text)
        elif get_origin(tp) is tuple:
            group.add_argument(flag, dest=dest, nargs="+", default=None, metavar="VALUE", help=help_text)
        else:
            group.add_argument(flag, dest=dest, default=None, metavar=f.name.upper(), help=help_text)


def from_args(cls: type[T], ns: argparse.Namespace, base: T | None = None, where: str = "command line",
              prefix: str = "") -> T:
    """``base`` (or the class defaults) with every flag the user gave applied on top."""
    hints = _hints(cls)
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        dest = f"{prefix}_{f.name}" if prefix else f.name
        value = getattr(ns, dest, None)
        if value is not None:
            changes[f.name] = _convert(value, hints[f.name], f"{where}: --{dest.replace('_', '-')}")
    if base is None:
        return cls(**changes)
    return dataclasses.replace(base, **changes)
