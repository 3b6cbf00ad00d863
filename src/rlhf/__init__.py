"""rlhf: the whole RLHF pipeline (SFT, reward model, PPO, DPO, GRPO/RLOO), readable and real.

Layers import downward only: ``algos`` (pure math on tensors) -> ``models`` / ``data`` /
``rollout`` (transformers, peft, datasets) -> ``recipes`` (training loops) -> ``cli``.
"""

__version__ = "0.1.0"
