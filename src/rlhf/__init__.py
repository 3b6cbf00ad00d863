"""rlhf: the whole RLHF pipeline (SFT, reward model, PPO, DPO, GRPO/RLOO, distillation), readable and real.

Layers, each importing only from the layers above it in this list (``tests/test_layout.py``):

1. ``errors``: :class:`UserError`, the one exception of a bad input (standard library only).
2. ``algos``: the seeds' math as pure functions on tensors (torch only).
3. ``models``, ``data``, ``rollout``: models, datasets and generation (transformers, peft, datasets).
4. ``training``: the machinery every loop shares: run config and options, accelerator setup, the
   step loop, checkpoints, the final save, logs and trackers.
5. ``watch``: the tools that watch a run: monitor, stopping, samples, the report and its plots.
6. ``recipes``: the training loops (sft, reward, ppo, dpo, grpo, distill) and what only they share.
7. ``commands`` (generate, chat, explain) and ``api`` (``rlhf.sft`` ... ``rlhf.grpo``).
8. ``demo``: the built-in worlds and the pipeline ``rlhf demo`` runs.
9. ``cli``: argument parsing over the rest.
"""

from rlhf.errors import UserError

__version__ = "0.1.0"
__all__ = ["Result", "UserError", "distill", "dpo", "grpo", "ppo", "rm", "sft"]


def __getattr__(name: str):
    """``rlhf.sft`` ... ``rlhf.grpo`` and ``rlhf.Result`` from :mod:`rlhf.api`, imported on first use
    (``import rlhf`` and ``rlhf --help`` stay light: no torch until a stage is asked for)."""
    if name in ("sft", "rm", "ppo", "dpo", "grpo", "distill", "Result"):
        from rlhf import api

        return getattr(api, name)
    raise AttributeError(f"module 'rlhf' has no attribute {name!r}")
