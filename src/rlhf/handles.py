"""Objects a Python caller hands to a run where the command line gives a name: a loaded model
with its tokenizer, rows of data, a reward function.

Each object is registered under a *handle*, a string such as ``<model LlamaForCausalLM>`` that
stands in the config field a path or ``module:function`` would fill. Configs so stay plain values:
YAML, ``--print-config``, the model card, run records and ``--resume`` treat a handle as they treat
a path. The loaders (:mod:`rlhf.data.readers`, :mod:`rlhf.models.loading`,
:func:`rlhf.recipes.rewards.load_reward_fns`) look a handle up before they look at the disk, and
the API releases its handles when the run ends. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_OBJECTS: dict[str, Any] = {}


@dataclass
class Loaded:
    """A model in memory and the tokenizer that goes with it."""

    model: Any
    tokenizer: Any = None


@dataclass
class Rows:
    """Records in memory (a list of dicts or a ``datasets.Dataset``); ``label`` names them in errors
    (``data[17]: chosen: empty``)."""

    rows: Any
    label: str


def register(obj: Any, name: str) -> str:
    """A handle for ``obj``: ``<name>``, or ``<name #2>`` ... when another object holds that one."""
    handle, n = f"<{name}>", 2
    while handle in _OBJECTS and _OBJECTS[handle] is not obj:
        handle, n = f"<{name} #{n}>", n + 1
    _OBJECTS[handle] = obj
    return handle


def lookup(name: Any) -> Any:
    """The object registered under handle ``name``, or None (a path, a module:function, not a string)."""
    return _OBJECTS.get(name) if isinstance(name, str) else None


def release(handles: list[str]) -> None:
    """Forget ``handles``, so the objects they held can be freed."""
    for handle in handles:
        _OBJECTS.pop(handle, None)
