"""The last hidden states of a causal LM and its LM head as a function, for log-probs computed
over chunks of positions (:func:`rlhf.algos.head_logprobs`) instead of from the whole
``(B, L, V)`` logits, which at a vocabulary of 150k dominate the memory of RL and DPO.

The model still runs through its own forward (its wrappers, peft's adapters, DDP's hooks, a
:class:`~rlhf.models.lora.Reference`'s frozen mode), asked for the logits of one position only;
a hook on its decoder keeps the hidden states that the LM head would have read.
"""

from __future__ import annotations

from typing import Callable

import torch

from rlhf.models.lora import causal_logits

# Config fields through which a model changes its logits after the LM head in ways not done here
# (Cohere's logit_scale, Granite's logits_scaling, ...): such models keep the plain path.
_OTHER_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "output_multiplier_scale", "mup_width_multiplier")


def lm_head(model) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``h -> logits`` as the model computes them from its last hidden states (the output
    embedding, then Gemma's final softcapping), or None where that cannot be done outside its
    forward: unknown logit transforms, or an LM head sharded by FSDP or ZeRO-3 (its weights exist whole
    only inside the forward)."""
    from rlhf.models.packing import _inner, _text_config

    inner = _inner(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    config = _text_config(model)
    if head is None or not hasattr(inner, "get_decoder") or any(getattr(config, k, None) for k in _OTHER_LOGIT_TRANSFORMS):
        return None
    weight = getattr(head, "weight", None)
    if (weight is None or type(weight).__name__ == "DTensor" or type(model).__name__.startswith("FullyShardedDataParallel")
            or hasattr(weight, "ds_id")):  # DeepSpeed ZeRO-3's partitioned parameter
        return None
    cap = getattr(config, "final_logit_softcapping", None)
    if not cap:
        return head
    return lambda h: torch.tanh(head(h) / cap) * cap


def causal_hidden(model, input_ids: torch.Tensor, attention_mask, position_ids: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]] | None:
    """The last hidden states of :func:`causal_logits`'s forward, and :func:`lm_head`; None where
    the model has no such split (then use :func:`causal_logits`).

    Shape:
        input_ids: (B, L) -> (B, L, H).
    """
    from rlhf.models.packing import _decoder

    head = lm_head(model)
    if head is None:
        return None
    seen: list[torch.Tensor] = []

    def keep_hidden(module, args, output):
        seen.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = _decoder(model).register_forward_hook(keep_hidden)
    try:
        causal_logits(model, input_ids, attention_mask, keep=1, position_ids=position_ids)
    finally:
        handle.remove()
    return seen[-1], head
