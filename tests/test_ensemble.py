"""Reward-model ensembles (issue 15 item 2): the aggregation math by hand, the ensemble directory
trained through the CLI and loaded by plain transformers, PPO/GRPO on it, and the monitor's
disagreement warning."""

import pytest
import torch

from rlhf.algos import aggregate_scores, ensemble_std

# Rows: K = 2 members. By hand: means 2, 0, 0; population stds 1, 0, 2; minima 1, 0, -2.
TWO = torch.tensor([[1.0, 3.0], [0.0, 0.0], [2.0, -2.0]])


def test_aggregations_by_hand():
    assert ensemble_std(TWO).tolist() == [1.0, 0.0, 2.0]
    assert aggregate_scores(TWO, "mean").tolist() == [2.0, 0.0, 0.0]
    assert aggregate_scores(TWO, "mean_minus_std", 1.0).tolist() == [1.0, 0.0, -2.0]
    assert aggregate_scores(TWO, "mean_minus_std", 0.5).tolist() == [1.5, 0.0, -1.0]
    assert aggregate_scores(TWO, "min").tolist() == [1.0, 0.0, -2.0]


def test_std_is_the_population_std():
    # [0, 0, 2, 2]: mean 1, squared deviations 1 each: population variance 4/4 = 1 (sample: 4/3).
    four = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    assert ensemble_std(four).item() == pytest.approx(1.0)
    assert aggregate_scores(four, "mean_minus_std", 2.0).item() == pytest.approx(1.0 - 2.0)


def test_one_member_every_aggregation_is_its_score():
    one = torch.tensor([[0.5], [-1.5]])
    assert ensemble_std(one).tolist() == [0.0, 0.0]  # not NaN
    for aggregation in ("mean", "mean_minus_std", "min"):
        assert aggregate_scores(one, aggregation, 3.0).tolist() == [0.5, -1.5]


def test_bad_aggregation_or_negative_coef_is_refused():
    with pytest.raises(ValueError, match="unknown aggregation 'max'"):
        aggregate_scores(TWO, "max")
    with pytest.raises(ValueError, match="0 or more"):
        aggregate_scores(TWO, "mean_minus_std", -1.0)
