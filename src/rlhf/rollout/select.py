"""Which rollout engine a recipe gets.

``auto`` is where the measured winner goes. On CPU that is our sampling loop (BENCHMARKS.md).
On CUDA, ``benchmarks/gpu.py`` measures ``generate``, the loop, transformers' continuous
batching and :class:`StaticRollout` on one card; it has not run on a card yet, so ``auto``
stays on the loop there too until it has (set :data:`CUDA_DEFAULT` from its table).
"""

from __future__ import annotations

from typing import Literal

import torch

from rlhf.rollout.hf import HFRollout
from rlhf.rollout.static import StaticRollout

Engine = Literal["auto", "static", "loop", "generate"]
CUDA_DEFAULT: Engine = "loop"
"""The engine ``auto`` picks on a CUDA device: unchanged until benchmarks/gpu.py has measured the others."""


def static_unsupported(config) -> str | None:
    """Why :class:`StaticRollout` cannot sample exactly from a model of ``config`` (None: it can).

    Its decode step attends to every filled cache slot under its own mask and its own attention
    function, so a sliding window, chunked attention or attention soft-capping would be lost.
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = set(getattr(config, "layer_types", None) or
                (["sliding_attention"] if getattr(config, "sliding_window", None) else ["full_attention"]))
    if types - {"full_attention"}:
        return f"layers of type {', '.join(sorted(types - {'full_attention'}))}"
    if getattr(config, "attention_chunk_size", None):
        return "chunked attention"
    if getattr(config, "attn_logit_softcapping", None):
        return "attention soft-capping"
    return None


def make_rollout(engine: Engine, policy: torch.nn.Module, pad_id: int, eos_id: int, device, sharded: bool = False):
    """The ``engine`` named, or for ``"auto"``: :data:`CUDA_DEFAULT` on a CUDA device, the loop elsewhere.

    ``sharded`` (FSDP, ZeRO-3), encoder-decoder models and models the static engine cannot serve
    exactly (:func:`static_unsupported`) keep ``auto`` on the loop; naming ``static`` for one of
    the latter raises ``ValueError`` saying why.
    """
    device = torch.device(device)
    why = static_unsupported(policy.config)
    if engine == "auto":
        encoder_decoder = bool(getattr(policy.config, "is_encoder_decoder", False))
        engine = CUDA_DEFAULT if device.type == "cuda" and not sharded and not encoder_decoder else "loop"
        if engine == "static" and why:
            engine = "loop"
    if engine == "static":
        if why:
            raise ValueError(f"--rollout-engine static cannot sample this model exactly ({why}: its decode step "
                             "attends to the whole cache); use --rollout-engine loop")
        return StaticRollout(policy, pad_id, eos_id, device)
    return HFRollout(policy, pad_id, eos_id, device, use_generate=engine == "generate")
