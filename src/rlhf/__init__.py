"""rlhf: the whole RLHF pipeline (SFT, reward model, PPO, DPO, GRPO/RLOO), readable and real.

Layers, each importing only from the layers above it in this list (``tests/test_layout.py``):

1. ``errors``: :class:`UserError`, the one exception of a bad input (standard library only).
2. ``algos``: the seeds' math as pure functions on tensors (torch only).
3. ``models``, ``data``, ``rollout``: models, datasets and generation (transformers, peft, datasets).
4. ``training``: the machinery every loop shares: run config and options, accelerator setup, the
   step loop, checkpoints, the final save, logs and trackers.
5. ``watch``: the tools that watch a run: monitor, stopping, samples, the report and its plots.
6. ``recipes``: the training loops (sft, reward, ppo, dpo, grpo) and what only they share.
7. ``commands``: generate, chat, explain.
8. ``demo``: the built-in worlds and the pipeline ``rlhf demo`` runs.
9. ``cli``: argument parsing over the rest.
"""

__version__ = "0.1.0"
