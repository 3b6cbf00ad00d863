"""Aggregating a reward-model ensemble's scores into one score per sequence.

Coste et al. 2023 ("Reward Model Ensembles Help Mitigate Overoptimization") and Eisenstein et
al. 2023 ("Helping or Herding?") optimise a conservative reward built from K reward models
trained from the same start with different seeds: the mean, the mean minus lambda times the
members' standard deviation (a standard-deviation form of Coste et al.'s uncertainty-weighted
optimisation, UWO, which subtracts lambda times the variance), or the minimum (worst-case
optimisation, WCO). The members' disagreement is also a signal of over-optimisation on its own:
where the policy exploits one member's flaw, the others do not follow it.

The standard deviation across members is the *population* one (divide by K, as ``numpy.std``):
it describes the K members we have rather than estimating a wider population, and it is 0, not
NaN, for a single member, so every aggregation of one reward model is that model's score.
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("mean", "mean_minus_std", "min")


def ensemble_std(member_scores: torch.Tensor) -> torch.Tensor:
    """Population standard deviation of each row across the K members (0 when K = 1).

    Shape:
        member_scores: (B, K) -> (B,).
    """
    return member_scores.float().std(dim=1, unbiased=False)


def aggregate_scores(member_scores: torch.Tensor, aggregation: str = "mean", uncertainty_coef: float = 1.0
                     ) -> torch.Tensor:
    """One score per sequence from K members' scores.

    ``mean``: the average; ``mean_minus_std``: ``mean - uncertainty_coef * std`` with the
    population std of :func:`ensemble_std` (UWO with the std where Coste et al. take the
    variance: the penalty keeps the scores' units); ``min``: the lowest member's
    score (WCO).

    Shape:
        member_scores: (B, K) -> (B,).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
    if uncertainty_coef < 0:
        raise ValueError(f"uncertainty_coef must be 0 or more, got {uncertainty_coef}")
    scores = member_scores.float()
    if aggregation == "min":
        return scores.min(dim=1).values
    mean = scores.mean(dim=1)
    if aggregation == "mean_minus_std":
        return mean - uncertainty_coef * ensemble_std(scores)
    return mean
