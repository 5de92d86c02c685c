"""Configuration machinery shared by every stage.

Each stage defines a frozen dataclass of its settings next to its code (``DataConfig`` in
:mod:`qless.data`, ``ProjectionConfig`` in :mod:`qless.project`, ...), deriving from
:class:`Config`. A field carries its help text in ``metadata["help"]``; that one definition
drives the Python API, the command-line flags (:func:`add_arguments` / :func:`from_args`), the
JSON written into manifests (:func:`to_dict`) and the config files read by ``qless run``
(:func:`from_dict`, :func:`read_config_file`, :func:`apply_overrides`).

Every field is checked against its annotation when a config is built, however it is built
(Python, JSON, YAML, flags): a ``Literal`` accepts only its choices, numbers must be finite,
nested sections become their config class. A stage adds its own checks in ``validate()``.
Errors are :class:`~qless.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, get_args, get_origin

from qless.errors import ConfigError

T = TypeVar("T")


def option(default: Any, help: str, *, flag: bool = True) -> Any:
    """A dataclass field with help text. ``flag=False`` keeps it out of the command line."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence defaults: configs are frozen")
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag})


class Config:
    """Base of every stage's frozen settings dataclass.

    ``section`` names the config in messages (``warmup.learning_rate: ...``). Construction
    converts and checks each field against its annotation (:func:`check_fields`), then calls
    ``validate()`` for the stage's own rules."""

    section: ClassVar[str] = "config"

    def __post_init__(self) -> None:
        check_fields(self)
        self.validate()

    def validate(self) -> None:
        """Cross-field and range checks of a stage; raise ConfigError naming the field."""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_fields(cfg: Any) -> None:
    """Convert every field of the dataclass ``cfg`` to its declared type in place, or raise ConfigError."""
    hints = _hints(type(cfg))
    section = getattr(cfg, "section", type(cfg).__name__)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        converted = _convert(value, hints[f.name], f"{section}.{f.name}")
        if converted is not value:
            object.__setattr__(cfg, f.name, converted)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Convert a JSON, YAML, command-line or Python value to the field's declared type, or raise ConfigError."""
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required (got null)")
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if not isinstance(value, (str, int, float)) or isinstance(value, bool) or value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is tuple:
        (item_tp, *_rest) = get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        items = tuple(_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
        return value if isinstance(value, tuple) and all(a is b for a, b in zip(items, value)) else items
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
            return value if isinstance(value, int) else int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return value if type(value) is float else number
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
    ``"run.json: warmup.epochs"``). Keys may be spelled with dashes (``max-length``)."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object with fields of {cls.__name__}, got {type(data).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
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


def differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON-like values differ (recursing into objects)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".") or "(value)"]


def lookup(obj: Any, dotted: str) -> Any:
    """The value at a dotted path of nested dicts (None where absent)."""
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def describe_differences(a: Any, b: Any, fields: list[str] | None = None) -> str:
    """``"field: A vs B (and 2 more: x, y)"`` for the first differing path, '' when equal."""
    diff = fields if fields is not None else differences(a, b)
    if not diff:
        return ""
    first = diff[0]
    more = f" (and {len(diff) - 1} more: {', '.join(diff[1:4])}{'...' if len(diff) > 4 else ''})" if len(diff) > 1 else ""
    return f"{first}: {lookup(a, first)!r} vs {lookup(b, first)!r}{more}"


# ---------------------------------------------------------------------------------------------
# Config files and overrides


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON (``.json``) or YAML (``.yaml``/``.yml``) file holding one object."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file ({getattr(e, 'strerror', None) or e})") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be one object (key: value pairs), got {type(data).__name__}")
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["warmup.epochs=2", "targets=[a.jsonl, b.jsonl]"]`` -> nested dict. Values are read as
    YAML scalars or lists (``2`` is a number, ``true`` a boolean, ``[a, b]`` a list)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: write it as SECTION.FIELD=VALUE, e.g. warmup.epochs=2")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not readable ({e})") from None
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is set to a value and also used as a section")
        node[last] = value
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` layered on ``base``: nested objects merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# Command-line flags


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
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        # argparse %-formats help strings: a literal % must be doubled
        help_text = f"{f.metadata.get('help', '')} (default: {shown})".replace("%", "%%")
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
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        dest = f"{prefix}_{f.name}" if prefix else f.name
        value = getattr(ns, dest, None)
        if value is not None:
            changes[f.name] = _convert(value, hints[f.name], f"{where}: --{dest.replace('_', '-')}")
    if base is None:
        return cls(**changes)
    return dataclasses.replace(base, **changes)  # type: ignore[type-var]
