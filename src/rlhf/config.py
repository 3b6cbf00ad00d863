"""Typed dataclass configs: each field's docstring is its ``--help``.

Precedence is defaults < YAML file (``--config``) < command-line flags. Only the standard
library is imported here.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing


class ConfigError(Exception):
    """A bad config value or file; the message is one line naming where."""


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field, read from the class source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(tp):
    """``int | None`` -> ``(int, True)``; ``Literal['a','b']`` -> ``(('a','b'), False)``."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else str
        origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return typing.get_args(tp), optional
    if origin in (list, tuple):
        return list, optional
    return tp, optional


def _convert(name: str, tp, value, where: str):
    label = where if where.startswith("--") else f"{where}: {name}"
    base, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{label}: must not be empty")
    try:
        if isinstance(base, tuple):  # Literal choices
            if value not in base:
                raise ValueError(f"expected one of {', '.join(map(str, base))}, got {value!r}")
            return value
        if base is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(f"expected true or false, got {value!r}")
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if base is list:
            return [s.strip() for s in value.split(",")] if isinstance(value, str) else list(value)
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected an integer, got {value}")
        return base(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{label}: {e}") from None


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per field, with the field docstring as help and no argparse default."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        base, _ = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            choices = list(base) if isinstance(base, tuple) else None
            extra = {"nargs": "?", "const": f.metadata["const"]} if "const" in f.metadata else {}
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, choices=choices, help=help_text,
                                metavar=None if choices else f.name.upper(), **extra)


def build_config(cls: type, yaml_path: str | None, flags: dict):
    """Defaults < YAML < flags, with every value checked against the field's type."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict = {}
    if yaml_path:
        import yaml

        try:
            with open(yaml_path) as fh:
                loaded = yaml.safe_load(fh) or {}
        except OSError as e:
            raise ConfigError(f"{yaml_path}: cannot read ({e.strerror})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{yaml_path}:{mark.line + 1}" if mark else yaml_path
            raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{yaml_path}: expected a mapping of field: value")
        for key, value in loaded.items():
            key = str(key).replace("-", "_")
            if key not in names:
                raise ConfigError(f"{yaml_path}: unknown field {key!r}")
            values[key] = _convert(key, hints[key], value, yaml_path)
    for key, value in flags.items():
        if key in names:
            values[key] = _convert(key, hints[key], value, "--" + key.replace("_", "-"))
    try:
        cfg = cls(**values)
    except TypeError as e:
        raise ConfigError(str(e)) from None
    check = getattr(cfg, "check", None)
    if check:
        check()
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
