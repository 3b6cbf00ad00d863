"""The Python API: one function per stage, named as the command line names them.

    import rlhf

    def brief(prompts, completions, **columns):
        return [1.0 if len(c.split()) < 20 else 0.0 for c in completions]

    result = rlhf.grpo(model="runs/sft", data=[{"prompt": "Say hi."}] * 64, reward_fns=[brief],
                       output_dir="runs/grpo", max_steps=50)
    result.model        # the trained policy, in memory

Each function takes the stage's options as keyword arguments: the fields of the recipe's ``Config``
(their docstrings are ``help(rlhf.grpo)``, as they are ``rlhf grpo --help``), under our names or
TRL's (``learning_rate``, ``per_device_train_batch_size``, ...). Beside them it takes what the command
line cannot name: a loaded model with its tokenizer, data in memory, reward functions as callables,
and callbacks. A bad input raises :class:`rlhf.UserError` with the line the command line prints;
nothing else is raised for it, and no model is written by a run that failed.

Runs under ``accelerate launch script.py`` as the command line does: ``batch_size`` is global, every
process returns the same metrics, and only the main process writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rlhf import handles
from rlhf.errors import CollectiveTimeout, UserError
from rlhf.recipes import STAGES, config_module

ONLINE = ("ppo", "grpo")  # the stages with reward_model= and reward_fns=
WITH_REFERENCE = ("dpo", "ppo", "grpo")  # the stages with ref_model=
# TRL's trainer arguments (GRPOTrainer(model, reward_funcs, train_dataset=, eval_dataset=, processing_class=)).
TRAINER_ALIASES = {"reward_funcs": "reward_fns", "train_dataset": "data", "eval_dataset": "eval_data",
                   "processing_class": "tokenizer", "environment_factory": "env"}


@dataclass
class Result:
    """What a run returns.

    Attributes:
        stage: ``sft``, ``rm``, ``ppo``, ``dpo``, ``grpo`` or ``distill``.
        output_dir: the run's ``--output-dir``.
        model_path: the directory of the saved final model (``output_dir``; None if none was saved).
        metrics: the last value of every metric the run logged, as the main process logged them
            (``metrics.jsonl`` holds them all), the same on every process.
        warnings: the over-optimisation monitor's warnings (PPO, GRPO), each a dict with ``step``,
            ``signal``, ``value``, ``threshold`` and the message under ``event``.
        model: the trained model in memory, on this process (with LoRA the ``PeftModel``, adapters not
            merged; PPO's policy without its value head). None where the saved model is not the one in
            memory (``stop_on_overoptimisation`` kept an earlier policy) or is several (an ensemble):
            :meth:`load_model` reads it from ``model_path``.
        tokenizer: the tokenizer that goes with ``model``.
    """

    stage: str
    output_dir: str
    model_path: str | None
    metrics: dict[str, float]
    warnings: list[dict] = field(default_factory=list)
    model: Any = None
    tokenizer: Any = None

    def load_model(self):
        """The saved model from ``model_path``: ``model`` if it is in memory, else read from disk (a
        reward model as ``AutoModelForSequenceClassification``, a policy as ``AutoModelForCausalLM``)."""
        if self.model is not None:
            return self.model
        if self.model_path is None:
            raise UserError(f"{self.output_dir}: the run saved no model")
        from rlhf.models import load_causal_lm, load_reward_models

        if self.stage == "rm":
            models = load_reward_models(self.model_path)
            return models[0] if len(models) == 1 else models
        return load_causal_lm(self.model_path)


def _data_handle(rows, label: str, held: list[str]) -> str:
    """A path stays a path; a list of dicts or a ``datasets.Dataset`` is handed in (:mod:`rlhf.handles`)."""
    if isinstance(rows, (str, os.PathLike)):
        return os.fspath(rows)
    if type(rows).__name__ in ("DatasetDict", "IterableDatasetDict"):
        raise UserError(f"{label}=: a DatasetDict holds splits {', '.join(rows)}; give one, {label}=ds['train']")
    if not hasattr(rows, "__iter__") or isinstance(rows, (dict, bytes)):
        raise UserError(f"{label}=: expected a path, a list of dicts or a datasets.Dataset, got {type(rows).__name__}")
    fingerprint = getattr(rows, "_fingerprint", None)
    if fingerprint is None:
        rows = list(rows)
        fingerprint = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
    handle = handles.register(handles.Rows(rows, label), f"{label}: {len(rows)} records {fingerprint[:12]}")
    held.append(handle)
    return handle


def _model_handle(model, tokenizer, what: str, held: list[str]) -> str:
    """A path or hub id stays one; a loaded model is handed in with its tokenizer."""
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    if not hasattr(model, "config"):
        raise UserError(f"{what}=: expected a path, a hub id or a transformers PreTrainedModel, got "
                        f"{type(model).__name__}")
    source = getattr(model.config, "_name_or_path", "") or "memory"
    handle = handles.register(handles.Loaded(model, tokenizer), f"{what} {type(model).__name__} from {source}")
    held.append(handle)
    return handle


def _with_tokenizer(other, what: str, tokenizer, model, held: list[str]) -> str:
    """``reward_model=`` / ``ref_model=``: a path, a loaded model, or ``(model, tokenizer)``. A loaded one
    without a tokenizer of its own is read with the policy's, so it must have an embedding for each of its
    tokens (a path's tokenizer is compared with the policy's when the run loads it)."""
    own = None
    if isinstance(other, tuple):
        if len(other) != 2:
            raise UserError(f"{what}=: expected a model or (model, tokenizer), got a tuple of {len(other)}")
        other, own = other
    if isinstance(other, (str, os.PathLike)) or own is not None:
        return _model_handle(other, own, what, held)
    from rlhf.models import load_tokenizer

    policy_tokenizer = tokenizer if tokenizer is not None else (
        load_tokenizer(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else None)
    if policy_tokenizer is None:  # no policy to take it from: the run refuses the model with one line
        return _model_handle(other, None, what, held)
    embeddings = other.get_input_embeddings() if hasattr(other, "get_input_embeddings") else None
    if embeddings is not None and embeddings.num_embeddings < len(policy_tokenizer):
        raise UserError(f"{what}=: its {embeddings.num_embeddings} token embeddings are fewer than the policy "
                        f"tokenizer's {len(policy_tokenizer)} tokens; give {what}=(model, its_tokenizer)")
    return _model_handle(other, policy_tokenizer, what, held)


def _plain(value) -> bool:
    """A value a flag could give: a string, a number, a bool, None, or a list of those."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) and not isinstance(v, (list, tuple)) for v in value)
    return value is None or isinstance(value, (str, int, float, bool, os.PathLike))


def _check_keywords(stage: str, cls, options: dict, objects: list[str]) -> None:
    """Refuse an option given an object, and a misspelt object keyword (with the object's name)."""
    import difflib

    from rlhf.training.options import spellings
    from rlhf.training.trl_names import TRL_ALIASES, TRL_UNSUPPORTED

    known = spellings(cls)
    where = ", ".join(f"{o}=" for o in objects)
    for key, value in options.items():
        if key in known and not _plain(value):
            raise UserError(f"rlhf.{stage}(): {key}= takes a plain value (a path, a name, a number), not a "
                            f"{type(value).__name__}; objects go in {where}")
        if key in known or key in TRL_UNSUPPORTED or key in TRL_ALIASES:
            continue
        ratio = lambda name: difflib.SequenceMatcher(None, key, name).ratio()  # noqa: E731
        best = max([*known, *objects, *TRAINER_ALIASES], key=ratio)
        if best not in known and ratio(best) >= 0.75:
            raise UserError(f"rlhf.{stage}(): unknown keyword {key!r}; did you mean {TRAINER_ALIASES.get(best, best)}?")


def _reward_fn_spec(reward_fns, held: list[str]) -> str | None:
    """``module:function[:weight]`` strings as they are; callables (or ``(callable, weight)``) as handles."""
    if reward_fns is None:
        return None
    if isinstance(reward_fns, str) or callable(reward_fns):
        reward_fns = [reward_fns]
    items = []
    for i, item in enumerate(reward_fns):
        if isinstance(item, tuple) and len(item) != 2:
            raise UserError(f"reward_fns[{i}]: expected a function or (function, weight), got a tuple of {len(item)}")
        fn, weight = item if isinstance(item, tuple) else (item, None)
        if weight is not None:
            try:
                weight = float(weight)
            except (TypeError, ValueError):
                raise UserError(f"reward_fns[{i}]: weight {weight!r} is not a number") from None
        if isinstance(fn, str):
            items.append(fn if weight is None else f"{fn}:{weight}")
            continue
        if not callable(fn):
            raise UserError(f"reward_fns[{i}]: expected a callable or 'module:function', got {type(fn).__name__}")
        handle = handles.register(fn, "fn " + getattr(fn, "__name__", type(fn).__name__).replace(",", "_"))
        held.append(handle)
        items.append(handle if weight is None else f"{handle}:{weight}")
    return ",".join(items)


def train(stage: str, cfg, callbacks: list[Callable] = ()) -> Result:
    """Run ``stage`` on a built config; the command line and the keyword functions both end here."""
    from rlhf.training.checkpoints import release_output_dirs
    from rlhf.training.logs import CALLBACKS
    from rlhf.training.saving import FINAL
    from rlhf.watch.runs import load_run

    module = importlib.import_module(STAGES[stage][0])
    final: dict = {}
    tokens = (CALLBACKS.set(tuple(callbacks)), FINAL.set(final))
    try:
        metrics = module.run(cfg)
    except FileNotFoundError as e:
        raise UserError(f"{e.filename or ''}: {e.strerror or e}".lstrip(": ")) from None
    except RuntimeError as e:  # gloo's "Timed out waiting 1800000ms for recv operation to complete"
        if "timed out" not in str(e).lower() or not _distributed():
            raise
        raise CollectiveTimeout(f"a collective across processes waited --ddp-timeout {cfg.ddp_timeout} s and timed "
                                "out: another process stopped, hung, or ran other steps") from None
    finally:
        FINAL.reset(tokens[1])
        CALLBACKS.reset(tokens[0])
        release_output_dirs()  # also after an error: the output directory is free again
    metrics = _from_main_process(dict(metrics))
    path = final.get("path")
    kept = final.get("models", {}).get(os.path.abspath(path)) if path else None
    try:
        warnings = load_run(cfg.output_dir).warnings
    except UserError:  # another process's directory, not written here
        warnings = []
    return Result(stage, cfg.output_dir, path, metrics, warnings, *(kept or (None, None)))


def _distributed() -> bool:
    import torch.distributed

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _from_main_process(metrics: dict) -> dict:
    """The main process's metrics (those metrics.jsonl holds) on every process: PPO's and GRPO's
    rollout means (reward, lengths, the monitor) are each process's own share until then."""
    from accelerate import PartialState

    if not PartialState._shared_state or PartialState().num_processes == 1:
        return metrics
    from accelerate.utils import broadcast_object_list

    box = [metrics]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _call(stage: str, objects: list[str], given: dict, options: dict) -> Result:
    from rlhf.training.options import from_keywords

    module = importlib.import_module(config_module(stage))
    _check_keywords(stage, module.Config, options, objects)
    model, tokenizer = given.get("model"), given.get("tokenizer")
    held: list[str] = []
    try:
        keywords = dict(options)
        if tokenizer is not None and isinstance(model, (str, os.PathLike)):
            raise UserError(f"rlhf.{stage}(): tokenizer= goes with a loaded model; a model path brings its own")
        if model is not None and not isinstance(model, (str, os.PathLike)) and tokenizer is None:
            raise UserError(f"rlhf.{stage}(): a model given as an object needs its tokenizer too (tokenizer=...)")
        if model is not None:
            keywords["model"] = _model_handle(model, tokenizer, "model", held)
        for label in ("data", "eval_data"):
            if given.get(label) is not None:
                keywords[label] = _data_handle(given[label], label, held)
        for label in ("reward_model", "ref_model"):
            if given.get(label) is not None:
                keywords[label] = _with_tokenizer(given[label], label, tokenizer, model, held)
        env = given.get("env")
        if env is not None and not isinstance(env, str):
            if not callable(env):
                raise UserError(f"rlhf.{stage}(): env= takes a factory (a callable returning an environment) or "
                                f"'module:factory', got {type(env).__name__}")
            env = handles.register(env, "env " + getattr(env, "__name__", type(env).__name__))
            held.append(env)
        if env is not None:
            keywords["env"] = env
        spec = _reward_fn_spec(given.get("reward_fns"), held)
        if spec:
            keywords["reward_fn"] = ",".join(x for x in (keywords.get("reward_fn"), spec) if x)
        callbacks = given.get("callbacks") or []
        callbacks = [callbacks] if callable(callbacks) else list(callbacks)
        for i, fn in enumerate(callbacks):
            if not callable(fn):
                raise UserError(f"callbacks[{i}]: expected a callable fn(step, metrics), got {type(fn).__name__}")
        cfg = from_keywords(module.Config, keywords, stage)
        return train(stage, cfg, callbacks)
    finally:
        handles.release(held)


def _option_lines(cls, taken: set[str]) -> tuple[list[inspect.Parameter], str]:
    """Keyword-only parameters (for the signature) and ``help()`` lines, from the Config's fields
    (less the ``taken`` ones, which are objects here)."""
    from rlhf.training.options import field_docs

    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    params, lines = [], []
    for f in [f for f in dataclasses.fields(cls) if f.name not in taken]:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=hints[f.name]))
        lines.append(f"    {f.name} (default {default!r}): {docs.get(f.name, '')}")
    return params, "\n".join(lines)


_OBJECT_DOCS = {
    "model": "a path, a hub id, or a loaded transformers PreTrainedModel (then with tokenizer=), trained in place "
             "(with lora=True peft adds the adapters to it).",
    "tokenizer": "the tokenizer of a loaded model= (TRL's processing_class=).",
    "data": "(TRL's train_dataset=) a path (JSONL, JSON, CSV, Parquet, a saved datasets directory, hf:NAME), a list of dicts, or a "
            "datasets.Dataset (one split); records are checked as a file's are, a bad one named data[i].",
    "eval_data": "held-out data, in the same forms as data= (PPO and GRPO: preference pairs, prompt/chosen/rejected, "
                 "for the monitor's implicit preference accuracy).",
    "ref_model": "the frozen reference: a path, a hub id, or a loaded model alone or as (model, tokenizer); its "
                 "tokenizer must be the policy's (default: a frozen copy of model=; with LoRA its base, adapters off).",
    "reward_model": "a reward-model directory or ensemble (rlhf rm), or a loaded sequence classifier (scored as a "
                    "copy), alone or as (model, tokenizer).",
    "reward_fns": "(TRL's reward_funcs=) reward functions: callables with TRL's signature fn(prompts, completions, **columns) -> "
                  "list[float], 'module:function[:weight]' strings, or (callable, weight) pairs; named in "
                  "metrics (rewards/NAME) and errors by __name__.",
    "env": "(TRL's environment_factory=) multi-turn episodes: a factory returning one environment per episode "
           "(reset(row) -> messages, step(message) -> (observations, reward, done); rlhf.rollout.env.ToolEnv for "
           "plain-function tools), or 'module:factory'.",
    "callbacks": "a callable or a list: fn(step, metrics) is called with every logged row on every process; "
                 "True from one (on any process) stops the run after that step, and the model is saved as at a "
                 "normal end (rm with ensemble=K: each member is a run of its own, steps from 1).",
}


def _stage(stage: str) -> Callable[..., Result]:
    objects = ["model", "tokenizer", "data", "eval_data", *(["ref_model"] if stage in WITH_REFERENCE else []),
               *(["reward_model", "reward_fns"] if stage in ONLINE else []), *(["env"] if stage == "grpo" else []),
               "callbacks"]

    def run_stage(model=None, **keywords) -> Result:
        given, options = {"model": model}, {}
        for key, value in keywords.items():
            name = TRAINER_ALIASES.get(key, key)
            if name not in objects:
                options[key] = value
            elif given.get(name) is not None:
                raise UserError(f"rlhf.{stage}(): {key}= and {name}= both given; use {name}=")
            else:
                given[name] = value
        if stage not in ONLINE and ("reward_fns" in options or "reward_funcs" in options):
            raise UserError(f"rlhf.{stage}(): reward_fns= is for rlhf.ppo and rlhf.grpo")
        return _call(stage, objects, given, options)

    cls = importlib.import_module(config_module(stage)).Config
    taken = set(objects)
    params, lines = _option_lines(cls, taken)
    head = [inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)]
    head += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in objects[1:]]
    run_stage.__signature__ = inspect.Signature([*head, *params],
                                                return_annotation=Result)
    run_stage.__name__ = run_stage.__qualname__ = stage
    run_stage.__module__ = "rlhf"
    objects_doc = "\n".join(f"    {n}: {_OBJECT_DOCS[n]}" for n in objects)
    run_stage.__doc__ = (f"{STAGES[stage][1]}\n\nReturns a :class:`rlhf.Result`; a bad input raises :class:`rlhf.UserError`."
                         f"\n\nObjects:\n{objects_doc}\n\nOptions (rlhf {stage} --help; TRL's names work too):\n{lines}\n")
    return run_stage


sft = _stage("sft")
rm = _stage("rm")
ppo = _stage("ppo")
dpo = _stage("dpo")
grpo = _stage("grpo")
distill = _stage("distill")
