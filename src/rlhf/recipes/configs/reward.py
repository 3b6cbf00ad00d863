"""Options of ``rlhf rm`` (:mod:`rlhf.recipes.reward`): a Bradley-Terry reward model or an ensemble of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.errors import UserError
from rlhf.training.config import TrainConfig


@dataclass
class Config(TrainConfig):
    """Reward-model options."""

    lr: float = 1e-5
    """Peak learning rate of AdamW."""
    normalize_scores: bool = True
    """Store the mean and std of the trained model's scores on the training data in its config."""
    ensemble: int = 1
    """Train K reward models from the same --model, one after another, member i with seed --seed + i (its
    score-head init and data order), saved as one ensemble directory (ensemble.json, member-0 ... member-K-1,
    each a plain transformers model) for rlhf ppo/grpo --reward-model with --reward-aggregation. Seeds alone
    make the members differ, as in Coste et al. 2023. K members cost K times the training time and disk, and
    K times the reward model's memory and scoring time in PPO/GRPO."""
    ensemble_bootstrap: bool = False
    """Also train each ensemble member on its own bootstrap resample of the pairs (as many pairs drawn with
    replacement, seeded by the member's seed): more diverse members, each seeing about 63% of the distinct
    pairs. Off by default: seed diversity alone already gives disagreement and keeps every pair."""

    def check(self) -> None:
        super().check()
        if self.ensemble < 1:
            raise UserError(f"--ensemble must be at least 1 (1: one reward model), got {self.ensemble}")
        if self.ensemble_bootstrap and self.ensemble < 2:
            raise UserError("--ensemble-bootstrap resamples the pairs of each ensemble member; it needs --ensemble 2 "
                            "or more")
