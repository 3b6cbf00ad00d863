"""Typed dataclass configs: each field's docstring is its ``--help``.

Precedence is defaults < YAML file (``--config``) < command-line flags. Only the standard
library is imported here.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import os
import textwrap
import types
import typing

from rlhf.errors import UserError
from rlhf.training.trl_names import TRL_ALIASES, TRL_UNSUPPORTED, asks_nothing


class ConfigError(UserError):
    """A bad config value or file; the message is one line naming where."""


# Our own flags that were renamed: the old name is refused with the new one.
RENAMED: dict[str, str] = {
    "loss_agg": "GRPO's loss and its normalisation are --loss-type (TRL's names; PPO keeps --loss-agg)",
}
# Aliases whose value is converted, so they keep their own argparse dest.
_CONVERTED = ("per_device_train_batch_size", "dataset_name", "resume_from_checkpoint", "reward_funcs")


def flag(name: str) -> str:
    """Our flag for field ``name``: ``max_new_tokens`` -> ``--max-new-tokens``."""
    return "--" + name.replace("_", "-")


def spellings(cls: type) -> dict[str, str]:
    """Every name ``cls`` answers to (its fields, their TRL aliases) -> the field it sets."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {**{a: t for a, t in TRL_ALIASES.items() if t in names}, **{n: n for n in names}}


def unknown_name(cls: type, name: str, recipe: str, dash: str = "--") -> str:
    """The one-line complaint about flag or key ``name`` that ``cls`` does not have: a TRL setting
    with no meaning here, an alias of a field this recipe lacks, or a typo and its closest match."""
    key = name.lstrip("-").split("=", 1)[0].replace("-", "_")
    shown = dash + name.lstrip("-").split("=", 1)[0] if dash else repr(key)
    if key in RENAMED:
        return f"{shown} is not a setting of rlhf {recipe}: {RENAMED[key]}"
    if key in TRL_UNSUPPORTED:  # TRL's setting with no meaning here, and why
        return f"{shown} (TRL/transformers) is not supported by rlhf {recipe}: {TRL_UNSUPPORTED[key]}"
    if key in TRL_ALIASES:
        return f"{shown} (TRL's name for {flag(TRL_ALIASES[key])}) has no meaning in rlhf {recipe}"
    known = spellings(cls)
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
    what = "flag" if dash == "--" else "field"
    if not close:
        return f"unknown {what} {shown}"
    target = known[close[0]]
    return f"unknown {what} {shown}; did you mean {flag(target) if dash == '--' else target}?"


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
        if base is str and isinstance(value, (list, tuple)):  # TRL's report_to: [wandb, tensorboard]
            return ",".join(str(v) for v in value) or "none"
        if base is int and isinstance(value, str) and not value.strip().lstrip("+-").isdigit():
            try:
                value = float(value)  # TRL's float fields: --num_train_epochs 3.0
            except ValueError:
                raise ValueError(f"expected an integer, got {value!r}") from None
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
    # Hidden spellings (README, "TRL's names"): underscores, and TRL's names for our fields.
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, target in spellings(cls).items():
        if name == target and "_" not in name:  # --lr, --seed: the flag above already
            continue
        base, _ = _base_type(hints[target])
        metadata = fields[target].metadata
        extra = ({"nargs": "?", "const": "true"} if base is bool  # --use_peft, --bf16 false
                 else {"nargs": "?", "const": metadata["const"]} if "const" in metadata else {})
        dest = name if name in _CONVERTED else target
        parser.add_argument("--" + name, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **extra)
    for name, target in spellings(cls).items():  # TRL's --no_bf16, --no_use_peft
        if _base_type(hints[target])[0] is bool:
            parser.add_argument("--no_" + name, dest=target, action="store_const", const="false",
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def bool_flags(cls: type) -> set[str]:
    """Our ``--flag`` of each bool field (they also take TRL's ``--bf16 false``; see ``cli``)."""
    hints = typing.get_type_hints(cls)
    return {flag(f.name) for f in dataclasses.fields(cls) if _base_type(hints[f.name])[0] is bool}


def _from_trl(name: str, value):
    """The value of TRL setting ``name`` in our terms (``per_device_train_batch_size`` x the
    processes of ``accelerate launch`` / ``torchrun``; a ``dataset_name`` that is not a local
    path or data file as the hub's ``hf:NAME``)."""
    if name == "per_device_train_batch_size":
        per_device = _convert(name, int, value, "--per_device_train_batch_size")
        return per_device * int(os.environ.get("WORLD_SIZE", "1"))
    if name == "reward_funcs":  # TRL's list of dotted paths (trl.rewards.accuracy_reward) -> module:function
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        out = []
        for item in (str(i).strip() for i in items if str(i).strip()):
            if ":" not in item and "." not in item:
                raise ConfigError(f"reward_funcs: {item!r} is a name from a script's registry; give its module path "
                                  "(module.function or module:function)")
            out.append(item if ":" in item else "{}:{}".format(*item.rsplit(".", 1)))
        return ",".join(out)
    if name == "scale_rewards" and str(value).lower() in ("true", "false"):  # TRL's booleans
        return "group" if str(value).lower() == "true" else "none"
    if name == "resume_from_checkpoint" and str(value).lower() in ("true", "false"):  # transformers: the latest
        return "auto" if str(value).lower() == "true" else None                      # one; or no resume
    if name == "dataset_name":
        value = str(value)
        local = os.path.exists(value) or value.lower().endswith((".jsonl", ".json", ".csv", ".parquet"))
        return value if value.startswith("hf:") or local else f"hf:{value}"
    return value


def build_config(cls: type, yaml_path: str | None, flags: dict):
    """Defaults < YAML < flags, with every value checked against the field's type."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict = {}
    if yaml_path:
        import yaml

        try:
            with open(yaml_path, encoding="utf-8-sig") as fh:  # a byte-order mark is not text
                loaded = yaml.safe_load(fh) or {}
        except OSError as e:
            raise ConfigError(f"{yaml_path}: cannot read ({e.strerror})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{yaml_path}:{mark.line + 1}" if mark else yaml_path
            raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{yaml_path}: expected a mapping of field: value")
        known = spellings(cls)
        recipe = cls.__module__.rsplit(".", 1)[-1]
        loaded = {str(k).replace("-", "_"): v for k, v in loaded.items()}
        weights = loaded.pop("reward_weights", None)
        if weights is not None and "reward_fn" in names:  # TRL: one weight per reward function, in order
            funcs = loaded.get("reward_funcs", loaded.get("reward_fn"))
            funcs = _from_trl("reward_funcs", funcs) if funcs is not None else ""
            items = [f for f in funcs.split(",") if f]
            if not isinstance(weights, (list, tuple)) or len(weights) != len(items):
                raise ConfigError(f"{yaml_path}: reward_weights: {weights!r} is not one number per reward function "
                                  f"({len(items)})")
            loaded["reward_funcs"] = ",".join(f"{f}:{float(w)}" for f, w in zip(items, weights))
            loaded.pop("reward_fn", None)
        refused, ignored = [], []
        for key, value in loaded.items():
            if key not in known:
                if key in TRL_UNSUPPORTED and asks_nothing(key, value, loaded, recipe):
                    ignored.append(key if "token" in key else f"{key}={value}")  # no secret on stderr
                    continue
                refused.append(unknown_name(cls, key, recipe, dash=""))
                continue
            if known[key] in values:
                raise ConfigError(f"{yaml_path}: {key!r} sets {known[key]!r}, which another key set already")
            values[known[key]] = _convert(known[key], hints[known[key]], _from_trl(key, value), yaml_path)
        if refused:
            raise ConfigError(f"{yaml_path}: " + (refused[0] if len(refused) == 1 else
                                                  f"{len(refused)} keys cannot be honoured: " + "; ".join(refused)))
        if ignored:
            import sys

            print(f"rlhf {recipe}: {yaml_path}: TRL settings that ask for nothing here, ignored: {', '.join(ignored)}",
                  file=sys.stderr)
    trl_batch = "per_device_train_batch_size" in flags or (yaml_path and "per_device_train_batch_size" in loaded)
    for key in _CONVERTED:
        target = TRL_ALIASES[key]
        if key in flags:
            if target in flags:
                raise ConfigError(f"--{key} and {flag(target)} both given; use {flag(target)}")
            flags = {**flags, target: _from_trl(key, flags[key])}
    for key, value in flags.items():
        if key in names:
            values[key] = _convert(key, hints[key], _from_trl(key, value), flag(key))
    try:
        cfg = cls(**values)
    except TypeError as e:
        raise ConfigError(str(e)) from None
    cfg.__dict__["given"] = frozenset(values)  # what the user set (not a field: a default may adapt to the model)
    cfg.__dict__["trl_batch"] = bool(trl_batch)  # TRL's per-device batch size was given (GRPO reads it as TRL does)
    check = getattr(cfg, "check", None)
    if check:
        check()
    return cfg


def trl_grpo_batch(cfg) -> None:
    """TRL's GRPO batch on a GRPO config, where per_device_train_batch_size was given and the rollout and minibatch
    sizes were not: batch (already x processes) x gradient_accumulation_steps completions an optimizer step, one
    generation each (TRL's default steps_per_generation), so G of them per prompt."""
    if not getattr(cfg, "trl_batch", False) or {"rollout_batch_size", "mini_batch_size"} & getattr(cfg, "given", set()):
        return
    completions = cfg.batch_size * cfg.grad_accum
    if completions % cfg.num_generations:
        raise ConfigError(f"per_device_train_batch_size x processes x gradient_accumulation_steps = {completions} "
                          f"completions a step is not a multiple of --num-generations {cfg.num_generations}")
    cfg.mini_batch_size, cfg.rollout_batch_size, cfg.grad_accum = completions, completions // cfg.num_generations, 1


def from_keywords(cls: type, keywords: dict, recipe: str):
    """A config from Python keyword arguments (the Python API): our field names or TRL's, each value
    checked as a flag's is. An unknown keyword is refused with the closest name, as the CLI refuses
    an unknown flag."""
    known = spellings(cls)
    values: dict = {}
    for key, value in keywords.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"rlhf.{recipe}(): " + unknown_name(cls, name, recipe, dash="").replace(
                "unknown field", "unknown keyword"))
        if known[name] in values:
            raise ConfigError(f"rlhf.{recipe}(): {name}= sets {known[name]!r}, which another keyword set already")
        if known[name] == "resume" and isinstance(value, bool):  # resume=True: the latest, as plain --resume
            value = "auto" if value else None
        if name in _CONVERTED:  # converted by build_config, as the command line's are
            values[name] = value
            continue
        values[known[name]] = _from_trl(name, value)
    return build_config(cls, None, values)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
