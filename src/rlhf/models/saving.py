"""Save models in HF format (safetensors), loadable by transformers alone."""

from __future__ import annotations

import os

from torch import nn

from rlhf.models.lora import is_peft_model, merge_lora


def save_pretrained(model: nn.Module, tokenizer, directory: str, merge_adapters: bool = True) -> None:
    """Write ``model`` and ``tokenizer`` to ``directory`` as an HF checkpoint.

    A LoRA model is merged first (``merge_adapters``) so the output loads with
    ``AutoModelForCausalLM``; with ``merge_adapters=False`` only the adapters are written.
    Merging works on a copy: the live model keeps its adapters.
    """
    import copy

    os.makedirs(directory, exist_ok=True)
    if is_peft_model(model) and merge_adapters:
        model = merge_lora(copy.deepcopy(model))
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
