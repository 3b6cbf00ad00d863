"""LoRA through peft, gradient checkpointing, and the reference policy."""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn

from rlhf.models.heads import position_ids_from_mask
from rlhf.models.loading import frozen_copy


def apply_lora(model: nn.Module, r: int = 16, alpha: int = 32, dropout: float = 0.0,
               target_modules: str | list[str] = "all-linear", task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with LoRA adapters (Hu et al. 2021): only the low-rank matrices train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type=task_type)
    return get_peft_model(model, config)


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` carries peft adapters; without importing peft (a quarter second on CPU)
    when nothing has imported it yet, since no model can be a ``PeftModel`` then."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Trade compute for memory: recompute activations in the backward pass."""
    if enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if is_peft_model(model):
            model.enable_input_require_grads()
    elif getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and return the plain transformers model."""
    return model.merge_and_unload() if is_peft_model(model) else model


def causal_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int = 0,
                  position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of a causal LM (or a :class:`Reference`), positions counted from the first real token.

    ``keep > 0`` computes the LM head on the last ``keep`` positions only (transformers'
    ``logits_to_keep``): a response's log-probs need ``R + 1`` of them, not the prompt's.
    Packed batches pass their own ``position_ids`` and a (B, 1, L, L) boolean ``attention_mask``.

    Shape:
        input_ids: (B, L), attention_mask: (B, L) or (B, 1, L, L) -> (B, L, V), or (B, keep, V).
    """
    if isinstance(model, Reference):
        return model(input_ids, attention_mask, position_ids, keep=keep)
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                 logits_to_keep=keep).logits


class Reference:
    """The frozen reference policy pi_ref (seed 002 Part 4: "a frozen copy of the SFT model").

    For a LoRA policy it is the same base with the adapters disabled, so no second copy of
    the weights sits in memory; otherwise a frozen deep copy taken now, before training, or
    ``model``, a reference of its own. Call it like a model to get logits.
    """

    def __init__(self, policy: nn.Module, share_lora_base: bool = True, model: nn.Module | None = None):
        self.policy = policy
        self.shares_base = model is None and share_lora_base and is_peft_model(policy)
        if model is not None:  # a reference model of its own (TRL's ref_model), frozen in place
            self.model = model.eval().requires_grad_(False)
        else:
            self.model = None if self.shares_base else frozen_copy(policy)

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask, position_ids=None, keep: int = 0) -> torch.Tensor:
        model = self.model if not self.shares_base else self.policy
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        was_training = model.training
        model.eval()
        try:
            with self.policy.disable_adapter() if self.shares_base else contextlib.nullcontext():
                return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False, logits_to_keep=keep).logits
        finally:
            model.train(was_training)

    def to(self, device) -> "Reference":
        if self.model is not None:
            self.model.to(device)
        return self


@contextlib.contextmanager
def eval_mode(*models: nn.Module):
    """Dropout off inside the block (rollout forwards), restored after."""
    states = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, s in zip(models, states):
            m.train(s)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout off for good (TRL and OpenRLHF do this for RL): rollout and training forwards
    then compute the same function, so the first PPO ratio is exactly 1."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    return model
