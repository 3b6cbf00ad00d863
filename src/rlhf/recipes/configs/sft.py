"""Options of ``rlhf sft`` (:mod:`rlhf.recipes.sft`): supervised fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.training.config import TrainConfig


@dataclass
class Config(TrainConfig):
    """SFT options."""

    lr: float = 2e-5
    """Peak learning rate of AdamW."""
    packing: bool = False
    """Pack each micro-batch into one padding-free row (positions restart per example; off where a probe
    finds the model's result differs from the padded one)."""
    completion_only_loss: bool = True
    """Loss on the response tokens only (every assistant turn of a conversation); off: on the prompt tokens too."""
