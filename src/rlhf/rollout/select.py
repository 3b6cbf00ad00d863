"""Which rollout engine a recipe gets: measured on an H100 (BENCHMARKS.md, "On a GPU")."""

from __future__ import annotations

from typing import Literal

import torch

from rlhf.rollout.hf import HFRollout
from rlhf.rollout.static import StaticRollout

Engine = Literal["auto", "static", "loop", "generate"]


def make_rollout(engine: Engine, policy: torch.nn.Module, pad_id: int, eos_id: int, device, sharded: bool = False):
    """The ``engine`` named, or for ``"auto"``: the CUDA-graph static-cache engine on a CUDA device
    (the fastest there), our sampling loop elsewhere (the fastest on CPU, where graphs do not exist).

    ``sharded`` (FSDP, ZeRO-3) keeps ``auto`` on the loop: the static engine copies whole weights.
    """
    device = torch.device(device)
    if engine == "auto":
        encoder_decoder = bool(getattr(policy.config, "is_encoder_decoder", False))
        engine = "static" if device.type == "cuda" and not sharded and not encoder_decoder else "loop"
    if engine == "static":
        return StaticRollout(policy, pad_id, eos_id, device)
    return HFRollout(policy, pad_id, eos_id, device, use_generate=engine == "generate")
