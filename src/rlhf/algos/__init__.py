"""The seeds' math as pure functions on tensors. Imports torch only.

Nothing here hides whitening or aggregation inside another function: recipes call them.
"""

from rlhf.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    gae,
    gae_matrix,
    group_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from rlhf.algos.distill import generalized_jsd, teacher_top_k_mass
from rlhf.algos.ensemble import AGGREGATIONS, aggregate_scores, ensemble_std
from rlhf.algos.kl import (
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_penalized_rewards,
    last_token_index,
)
from rlhf.algos.losses import (
    bradley_terry_loss,
    dpo_loss,
    ppo_loss,
    ppo_policy_loss,
    value_loss,
)
from rlhf.algos.policy_losses import (
    LOSS_TYPES,
    LossType,
    importance_log_ratio,
    normalise_policy_loss,
    policy_loss_terms,
    vespo_weights,
)
from rlhf.algos.shaping import overlong_penalty, tied_groups
from rlhf.algos.monitor import distinct_n, kl_reward_fraction, relative_drift, repetition_fraction, reward_length
from rlhf.algos.preference import implicit_preference_accuracy
from rlhf.algos.stats import agg_loss, masked_mean, masked_sum, masked_var, masked_whiten
from rlhf.algos.tokens import entropy_from_logits, head_logprobs, head_token_stats, logprobs_from_logits, sft_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS", "AGGREGATIONS", "AdaptiveKLController", "FixedKLController", "agg_loss", "aggregate_scores",
    "bradley_terry_loss", "compute_advantages", "distinct_n", "dpo_loss", "ensemble_std", "entropy_from_logits", "gae",
    "gae_matrix", "group_advantages", "implicit_preference_accuracy", "kl_estimate", "kl_penalized_rewards", "kl_reward_fraction",
    "head_logprobs", "head_token_stats", "last_token_index", "logprobs_from_logits", "masked_mean", "masked_sum", "masked_var", "masked_whiten",
    "ppo_loss", "ppo_policy_loss", "relative_drift", "repetition_fraction", "reward_length", "rloo_advantages",
    "sft_loss", "value_loss", "LOSS_TYPES", "LossType", "importance_log_ratio", "normalise_policy_loss",
    "policy_loss_terms", "vespo_weights", "overlong_penalty", "tied_groups", "reinforce_pp_advantages",
    "generalized_jsd", "teacher_top_k_mass",
]
