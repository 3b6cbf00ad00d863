"""Options of ``rlhf ppo`` (:mod:`rlhf.recipes.ppo`): actor-critic RLHF.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlhf.errors import UserError
from rlhf.recipes.configs.rl import RLConfig


@dataclass
class Config(RLConfig):
    """PPO options (defaults: seed 002 Part 5 and Huang et al. 2024)."""

    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    """How per-token losses are averaged (verl's agg_loss modes): token-mean (every token of the minibatch
    weighs the same), seq-mean-token-mean (each sequence's token mean, then the mean), seq-mean-token-sum."""
    critic: Literal["shared", "separate"] = "shared"
    """Value head on the policy's body (the seeds' design) or a separate critic model (OpenRLHF, verl)."""
    critic_model: str | None = None
    """Initialise the separate critic from this model (default: the reward model, else the policy)."""
    critic_lr: float | None = None
    """Learning rate of the critic (default: --lr)."""
    rollout_batch_size: int = 16
    """Prompts sampled per PPO step, across all processes."""
    mini_batch_size: int = 8
    """Sequences per optimizer step inside the PPO epochs (micro-batches of --batch-size accumulate)."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    kl_coef: float = 0.05
    """beta: weight of the per-token KL penalty in the reward."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """KL estimator in the reward: k1 = log pi - log pi_ref (the seeds), k3 = Schulman's non-negative one."""
    adaptive_kl: bool = False
    """Adapt beta towards --kl-target (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    """Target KL per sequence of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 over the batch."""
    clip_eps: float = 0.2
    """PPO ratio clip epsilon."""
    clip_eps_value: float | None = 0.2
    """Value clip around the old values (none: unclipped value loss)."""
    vf_coef: float = 0.5
    """c1: weight of the value loss."""
    ent_coef: float = 0.01
    """c2: weight of the entropy bonus."""

    def check(self) -> None:
        super().check()
        if self.rollout_batch_size % self.mini_batch_size:
            raise UserError("--rollout-batch-size must be a multiple of --mini-batch-size")
