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


def make_rollout(engine: Engine, policy: torch.nn.Module, pad_id: int, eos_id: int, device, sharded: bool = False):
    """The ``engine`` named, or for ``"auto"``: :data:`CUDA_DEFAULT` on a CUDA device, the loop elsewhere.

    ``sharded`` (FSDP, ZeRO-3) and encoder-decoder models keep ``auto`` on the loop: the static
    engine copies whole weights of a decoder-only model.
    """
    device = torch.device(device)
    if engine == "auto":
        encoder_decoder = bool(getattr(policy.config, "is_encoder_decoder", False))
        engine = CUDA_DEFAULT if device.type == "cuda" and not sharded and not encoder_decoder else "loop"
    if engine == "static":
        return StaticRollout(policy, pad_id, eos_id, device)
    return HFRollout(policy, pad_id, eos_id, device, use_generate=engine == "generate")
