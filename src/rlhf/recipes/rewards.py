"""Python reward functions, as TRL calls them: ``fn(prompts=..., completions=..., **columns)``
returning one number per completion.

A reward function is named ``module:function`` (optionally ``module:function:weight``), or handed
in from Python as a callable (:mod:`rlhf.handles`). It receives ``prompts`` and ``completions`` as
lists plus every extra dataset column as a keyword list. Prompts are as in the dataset: text or
messages. A completion takes its prompt's form, as in TRL: text for a text prompt, and
``[{"role": "assistant", "content": text}]`` for a conversational one (:func:`in_prompt_form`).
None means "does not apply", as in TRL: it is left out of the weighted sum over functions, and a
completion no function applies to is unscorable (GRPO gives it no advantage). Anything else than a
finite number or None (NaN, inf, a string), or an exception, stops the run with one line naming the
function, the value or exception, and the prompt's ``file:line``. Functions that accept
``completion_ids`` (by name or ``**kwargs``) get the sampled token ids, as TRL gives them.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

from rlhf import handles
from rlhf.errors import UserError


@dataclass
class RewardFn:
    name: str
    fn: Callable
    weight: float = 1.0


def load_reward_fns(spec: str | None) -> list[RewardFn]:
    """Parse ``"pkg.mod:fn[:weight],other:fn2"`` into callables (the working directory is importable).

    An item may also be the handle of a Python callable handed in (``<fn correct>[:weight]``,
    :mod:`rlhf.handles`); it is named by its ``__name__`` in metrics and errors.
    """
    if not spec:
        return []
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    fns = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        handle, _, weight = item.partition(">:")
        fn = handles.lookup(handle + ">" if weight else item)
        if callable(fn):
            fns.append(RewardFn(getattr(fn, "__name__", handle.strip("<>")), fn, float(weight) if weight else 1.0))
            continue
        parts = item.split(":")
        if len(parts) not in (2, 3):
            raise UserError(f"--reward-fn {item}: expected module:function[:weight]")
        try:
            fn = getattr(importlib.import_module(parts[0]), parts[1])
            weight = float(parts[2]) if len(parts) == 3 else 1.0
        except (ImportError, AttributeError, ValueError) as e:
            raise UserError(f"--reward-fn {item}: {e}") from None
        fns.append(RewardFn(f"{parts[0]}:{parts[1]}", fn, weight))
    seen: dict[str, int] = {}
    for r in fns:  # two functions of one name (two lambdas, two closures) keep a metric each
        seen[r.name] = seen.get(r.name, 0) + 1
        if seen[r.name] > 1:
            r.name = f"{r.name}#{seen[r.name]}"
    return fns


def in_prompt_form(prompt, text: str):
    """A completion as TRL gives it to reward functions: ``text`` after a string prompt,
    ``[{"role": "assistant", "content": text}]`` after a message list."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def _takes(fn: Callable, name: str) -> bool:
    """Whether ``fn`` accepts the keyword ``name`` (by name, or through ``**kwargs``)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD or p.name == name for p in params)


def call_reward_fn(r: RewardFn, prompts: list, completions: list, extras: dict[str, list], where: list[str] | None,
                   completion_ids: list[list[int]] | None = None):
    """``r.fn`` on the batch; an exception it raises is a :class:`UserError` naming the function,
    the exception's first line and the record: the first completion that raises on its own
    (the function is called once per completion to find it), else the batch's prompts."""
    if completion_ids is not None and _takes(r.fn, "completion_ids"):  # TRL passes the sampled token ids too
        extras = {**extras, "completion_ids": completion_ids}
    try:
        return r.fn(prompts=prompts, completions=completions, **extras)
    except Exception as e:  # the user's code: any exception is theirs to fix
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raised = f"{type(e).__name__}: {message}" if message else type(e).__name__
    culprit = None
    for i in range(len(completions)):
        try:
            r.fn(prompts=prompts[i : i + 1], completions=completions[i : i + 1],
                 **{k: v[i : i + 1] for k, v in extras.items()})
        except Exception:
            culprit = i
            break
    known = [w for w in where or [] if w]
    if culprit is not None:
        at = f"completion {culprit + 1} of the batch" + (f" (prompt {where[culprit]})" if known else "")
    else:
        at = "a batch of prompts" + (f" {known[0]} to {known[-1]}" if known else "")
    raise UserError(f"reward function {r.name} raised {raised} on {at}") from None


def reward_value(name: str, value, i: int, where: list[str] | None) -> float:
    """``value`` as a float; None (TRL's "this function does not apply") is NaN, for the caller to leave out."""
    if value is None:
        return math.nan
    number = None
    if not isinstance(value, (str, bytes)):  # bools count as 0 and 1, as in TRL
        try:
            number = float(value)
        except (TypeError, ValueError):
            pass
    if number is None or not math.isfinite(number):
        prompt = f" (prompt {where[i]})" if where and where[i] else ""
        raise UserError(f"reward function {name} returned {value!r} for completion {i + 1} of the batch{prompt}; "
                        "a reward must be a finite number")
    return number
