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
from rlhf.rollout.static import StaticRollout, static_unsupported

Engine = Literal["auto", "static", "loop", "generate"]
CUDA_DEFAULT: Engine = "loop"
"""The engine ``auto`` picks on a CUDA device: unchanged until benchmarks/gpu.py has measured the others."""


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
        return StaticRollout(policy, pad_id, eos_id, device)  # refuses, saying why, a model it cannot serve
    return HFRollout(policy, pad_id, eos_id, device, use_generate=engine == "generate", synced=sharded)
