"""Load policies, reward models and tokenizers from a local directory or a hub id.

``trust_remote_code`` is off unless asked. Weights are read as safetensors by transformers.
"""

from __future__ import annotations

import copy
import json
import os

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf import handles
from rlhf.errors import UserError

DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(UserError):
    """A model or tokenizer could not be loaded; the message names which and why."""


# What a broken model directory raises from transformers: a missing or unreadable file (OSError),
# a bad config (ValueError), a truncated or corrupt safetensors file (SafetensorError).
LOAD_ERRORS = (OSError, ValueError, SafetensorError)
# One of these makes a directory hold a tokenizer (fast, SentencePiece, BPE vocabularies).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt")


# A reward-model ensemble directory (``rlhf rm --ensemble K``): this file names the members, each a
# plain AutoModelForSequenceClassification directory beside it; the tokenizer is at the top.
ENSEMBLE_FILE = "ensemble.json"


def _why(e: Exception) -> str:
    """The first line of a loading error; a corrupt safetensors file says so."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"a safetensors file is truncated or corrupt: {first}" if isinstance(e, SafetensorError) else first


def resolve_dtype(dtype: str | torch.dtype | None):
    """Map ``"bf16"``/``"float32"``/... to a torch dtype (``None`` means float32)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _check_local(path: str) -> None:
    """Fail at once, without hub retries, on a path that looks local and does not exist.

    A hub id is ``name`` or ``org/name``. A path is local when it starts with ``.``, ``/`` or
    ``~``, has more than one ``/``, or its first component is a directory here (``runs/sft``
    next to a ``runs`` directory); an ``org/name`` whose ``org`` is no directory here is a hub id.
    """
    if os.path.exists(os.path.expanduser(path)):
        return
    first = path.split("/", 1)[0]
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or ("/" in path and os.path.isdir(first)):
        raise ModelLoadError(f"{path}: no such model directory")
    if handles.lookup(path) is None and not _in_hub_cache(path) and not _hub_reachable():
        host = _hub_host()
        raise ModelLoadError(f"{path}: no such local directory, and the hub ({host}) cannot be reached to look for "
                             "it as a hub id (nor is it in the hub cache)")


def _hub_host() -> str:
    from urllib.parse import urlparse

    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


_REACHABLE: dict[str, bool] = {}


def _hub_reachable() -> bool:
    """Whether the hub answers a TCP connection within 3 s (asked once a process); offline mode says no.
    Without it a mistyped ``runs/sft-typo`` ran into a minute of hub retries before its error."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = _hub_host()
    if host not in _REACHABLE:
        import socket

        try:
            socket.create_connection((host, 443), timeout=3).close()
            _REACHABLE[host] = True
        except OSError:
            _REACHABLE[host] = False
    return _REACHABLE[host]


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the hub cache holds ``repo_id`` (a config or tokenizer file), so it loads without the hub."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return any(isinstance(try_to_load_from_cache(repo_id, name), str)
                   for name in ("config.json", "tokenizer_config.json"))
    except Exception:  # not a valid repo id, no cache: not cached
        return False


def _loaded(path: str) -> handles.Loaded | None:
    """The model (and tokenizer) a Python caller handed in under ``path``, if ``path`` is such a handle."""
    loaded = handles.lookup(path)
    return loaded if isinstance(loaded, handles.Loaded) else None


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """Load a tokenizer (a handed-in model's own, :mod:`rlhf.handles`); give it a PAD token (EOS) if it has none."""
    loaded = _loaded(path)
    if loaded is not None:
        if loaded.tokenizer is None:
            raise ModelLoadError(f"{path}: a model given as an object needs its tokenizer too (tokenizer=...)")
        return _checked_tokenizer(loaded.tokenizer, path)
    _check_local(path)
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, n)) for n in TOKENIZER_FILES):
        raise ModelLoadError(f"{path}: no tokenizer in this directory (none of {', '.join(TOKENIZER_FILES)}); "
                             "save the tokenizer beside the model (tokenizer.save_pretrained)")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
    return _checked_tokenizer(tok, path)


def _checked_tokenizer(tok, path: str):
    if tok.eos_token is None:
        where = os.path.join(path, "tokenizer_config.json") if os.path.isdir(path) else "its tokenizer_config.json"
        raise ModelLoadError(f"{path}: its tokenizer has no EOS token, so no response could end; set eos_token "
                             f"in {where}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _attn(attn_implementation: str | None) -> dict:
    return {"attn_implementation": attn_implementation} if attn_implementation else {}


def load_causal_lm(path: str, dtype=None, device: str | None = None, trust_remote_code: bool = False,
                   attn_implementation: str | None = None):
    """``AutoModelForCausalLM.from_pretrained`` with our dtype/device/attention-kernel options.

    A model handed in from Python (:mod:`rlhf.handles`) is returned as it is, not copied: training
    changes it in place, as TRL's trainers change the model they are given.
    """
    loaded = _loaded(path)
    if loaded is not None:
        return loaded.model.to(device) if device else loaded.model
    _check_local(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype),
                                                     trust_remote_code=trust_remote_code, **_attn(attn_implementation))
    except LOAD_ERRORS as e:
        raise ModelLoadError(f"{path}: cannot load causal LM ({_why(e)})") from None
    return model.to(device) if device else model


def load_sequence_classifier(path: str, dtype=None, device: str | None = None, trust_remote_code: bool = False,
                             attn_implementation: str | None = None, require_score_head: bool = False,
                             first_member: bool = False):
    """A one-label ``AutoModelForSequenceClassification``: a reward model, or a critic body.

    Loading a causal-LM checkpoint this way keeps its body and adds a fresh scalar head
    (seed 003: "its final language modeling head is replaced with a scalar regression head").
    An ensemble directory (:func:`is_ensemble`) is refused, so that no caller scores with one
    member unawares: score with all of them through :func:`load_reward_models`, or pass
    ``first_member`` to start from member 0 (a critic initialised from it). With ``require_score_head`` (a reward model to score with), a checkpoint lacking any of
    the weights, such as a causal LM's missing score head, is refused instead.

    A model handed in from Python (:mod:`rlhf.handles`) is copied when it is a sequence classifier
    (a reward model scores with the copy, a critic trains it, and the caller's stays as it was);
    a causal LM is written to a temporary directory and loaded from there like a checkpoint.
    """
    loaded = _loaded(path)
    if loaded is not None and _is_classifier(loaded.model):
        model = copy.deepcopy(loaded.model)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = model.config.eos_token_id
        return model.to(device) if device else model
    if loaded is not None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="rlhf-model-") as tmp:
            loaded.model.save_pretrained(tmp)
            return load_sequence_classifier(tmp, dtype, device, trust_remote_code, attn_implementation,
                                            require_score_head)
    _check_local(path)
    if is_ensemble(path):
        if not first_member:
            raise ModelLoadError(f"{path}: a reward-model ensemble ({len(read_ensemble(path)['members'])} members, "
                                 f"{ENSEMBLE_FILE}); load one member directory, {ensemble_members(path)[0]}")
        path = ensemble_members(path)[0]
    from transformers.utils import logging as hf_logging

    # From a causal-LM checkpoint a new score head is expected: no "newly initialized" report.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code,
            output_loading_info=True, **_attn(attn_implementation))
    except LOAD_ERRORS as e:
        raise ModelLoadError(f"{path}: cannot load reward model ({_why(e)})") from None
    finally:
        hf_logging.set_verbosity(level)
    missing = sorted(info.get("missing_keys") or [])
    if require_score_head and missing:
        saved_as = ", ".join(getattr(model.config, "architectures", None) or ["no architecture"])
        raise ModelLoadError(f"{path}: not a reward model: it has no trained score head ({', '.join(missing[:3])} "
                             f"missing; its config names {saved_as}); train one with rlhf rm")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model.to(device) if device else model


def _is_classifier(model) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def is_ensemble(path: str) -> bool:
    """Whether ``path`` is a reward-model ensemble directory (it holds ``ensemble.json``)."""
    return os.path.isfile(os.path.join(os.path.expanduser(path), ENSEMBLE_FILE))


def read_ensemble(path: str) -> dict:
    """The checked ``ensemble.json`` of an ensemble directory.

    It must be a JSON object whose ``members`` is a non-empty list of distinct sub-directory
    names of ``path``, each present; ``aggregation`` (optional) names the default aggregation.
    Anything else is a :class:`ModelLoadError` naming the file and what is wrong.
    """
    from rlhf.algos import AGGREGATIONS

    where = os.path.join(path, ENSEMBLE_FILE)
    try:
        with open(where) as f:
            manifest = json.load(f)
    except OSError as e:
        raise ModelLoadError(f"{where}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{where}: not valid JSON (line {e.lineno}: {e.msg})") from None
    members = manifest.get("members") if isinstance(manifest, dict) else None
    if (not isinstance(members, list) or not members or not all(isinstance(m, str) and m for m in members)
            or len(set(members)) != len(members)):
        raise ModelLoadError(f"{where}: 'members' must be a non-empty list of distinct member directory names")
    for m in members:
        if os.path.isabs(m) or ".." in m.split("/") or not os.path.isdir(os.path.join(path, m)):
            raise ModelLoadError(f"{where}: member {m!r} has no directory {os.path.join(path, m)}")
    if manifest.get("aggregation", "mean") not in AGGREGATIONS:
        raise ModelLoadError(f"{where}: aggregation {manifest['aggregation']!r} is not one of "
                             f"{', '.join(AGGREGATIONS)}")
    return manifest


def ensemble_members(path: str) -> list[str]:
    """The member directories of an ensemble directory, in ``ensemble.json``'s order."""
    return [os.path.join(path, m) for m in read_ensemble(path)["members"]]


def load_reward_models(path: str, dtype=None, device: str | None = None, trust_remote_code: bool = False,
                       attn_implementation: str | None = None) -> list:
    """The reward model(s) of ``path``: one for a reward-model directory, K for an ensemble.

    Each must have a trained score head (``require_score_head``). K members take K times the
    memory and K forward passes per scored batch.
    """
    paths = ensemble_members(path) if is_ensemble(path) else [path]
    return [load_sequence_classifier(p, dtype, device, trust_remote_code, attn_implementation,
                                     require_score_head=True) for p in paths]


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode (dropout off) and no gradients: for the reference and the reward model."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen deep copy (the usual reference policy)."""
    return freeze(copy.deepcopy(model))
