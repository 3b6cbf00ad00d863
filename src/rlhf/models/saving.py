"""Save models in HF format (safetensors), loadable by transformers alone."""

from __future__ import annotations

import os

from torch import nn

from rlhf.models.lora import is_peft_model, merge_lora


def unsharded_copy(model: nn.Module, state_dict: dict) -> nn.Module:
    """A plain CPU copy of ``model`` (a transformers model, or a peft model over one) that holds
    ``state_dict``: the full weights gathered from a model that FSDP shards, whose own
    parameters are shards (it cannot be deep-copied, merged or saved as it is). Built on the meta
    device, then given the gathered tensors."""
    import torch

    base = model.get_base_model() if is_peft_model(model) else model
    with torch.device("meta"):
        copy = type(base)._from_config(base.config)
        if is_peft_model(model):
            from peft import get_peft_model

            name = model.active_adapter
            copy = get_peft_model(copy, model.peft_config[name], adapter_name=name)
    copy.load_state_dict(state_dict, assign=True)
    (copy.get_base_model() if is_peft_model(copy) else copy).tie_weights()
    return copy.eval()


def save_pretrained(model: nn.Module, tokenizer, directory: str, merge_adapters: bool = True,
                    state_dict: dict | None = None) -> None:
    """Write ``model`` and ``tokenizer`` to ``directory`` as an HF checkpoint.

    A LoRA model is merged first (``merge_adapters``) so the output loads with
    ``AutoModelForCausalLM``; with ``merge_adapters=False`` only the adapters are written.
    Merging works on a copy: the live model keeps its adapters. ``state_dict``: the model's full
    weights gathered from its shards (:func:`unsharded_copy`), written in place of its own.
    """
    import copy

    os.makedirs(directory, exist_ok=True)
    if state_dict is not None:
        model = unsharded_copy(model, state_dict)
    elif is_peft_model(model) and merge_adapters:
        model = copy.deepcopy(model)
    if is_peft_model(model) and merge_adapters:
        model = merge_lora(model)
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
