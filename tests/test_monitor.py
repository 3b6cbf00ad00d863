"""The over-optimisation monitor: its math by hand (tier 1), then the signals, warnings and
--no-monitor in the PPO and GRPO recipes on the tiny model (tier 3)."""

import json

import pytest
import torch

from rlhf.algos import distinct_n, kl_reward_fraction, relative_drift, repetition_fraction, reward_length

T = torch.tensor

# Three responses; 0 is padding beyond each mask (a bigram (3, 0) must not count).
IDS = T([[1, 2, 1, 2, 0], [3, 3, 3, 0, 0], [5, 0, 0, 0, 0]])
MASK = T([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])


def test_distinct_2_within_and_across_by_hand():
    # Bigrams: row 0 (1,2) (2,1) (1,2): 2 unique of 3; row 1 (3,3) (3,3): 1 of 2; row 2 none: 0.
    # within = (2/3 + 1/2 + 0) / 3 = 7/18; across: {(1,2), (2,1), (3,3)} = 3 unique of 5 bigrams.
    within, across = distinct_n(IDS, MASK, n=2)
    assert within.item() == pytest.approx(7 / 18)
    assert across.item() == pytest.approx(3 / 5)
    # Unigrams: row 0 {1,2} of 4, row 1 {3} of 3, row 2 {5} of 1; pooled {1,2,3,5} of 8.
    within, across = distinct_n(IDS, MASK, n=1)
    assert within.item() == pytest.approx((2 / 4 + 1 / 3 + 1) / 3)
    assert across.item() == pytest.approx(4 / 8)


def test_distinct_n_of_a_batch_without_ngrams_is_zero():
    within, across = distinct_n(IDS[2:], MASK[2:], n=2)
    assert within.item() == 0.0 and across.item() == 0.0


def test_repetition_fraction_by_hand():
    # n=2: row 0 says (1,2) twice, row 1 (3,3) twice, row 2 is too short: 2 of 3 repeat.
    assert repetition_fraction(IDS, MASK, n=2).item() == pytest.approx(2 / 3)
    # n=3: row 0 (1,2,1) (2,1,2), row 1 (3,3,3) once: none repeats.
    assert repetition_fraction(IDS, MASK, n=3).item() == 0.0


def test_reward_length_correlation_by_hand():
    # Lengths 4, 3, 1 (mean 8/3); scores 1, 2, 3 (mean 2). Deviations: x = (-1, 0, 1),
    # y = (4/3, 1/3, -5/3). sum xy = -4/3 - 5/3 = -3; sum x^2 = 2; sum y^2 = 42/9.
    # r = -3 / sqrt(2 * 42/9) = -0.98198.
    corr, mean_length = reward_length(T([1.0, 2.0, 3.0]), MASK)
    assert corr.item() == pytest.approx(-3 / (2 * 42 / 9) ** 0.5)
    assert corr.item() == pytest.approx(-0.98198, abs=1e-5)
    assert mean_length.item() == pytest.approx(8 / 3)


def test_reward_length_correlation_without_variance_is_zero():
    corr, _ = reward_length(T([0.5, 0.5, 0.5]), MASK)  # equal scores
    assert corr.item() == 0.0
    corr, mean_length = reward_length(T([1.0, 2.0]), T([[1, 1, 0], [1, 1, 0]]))  # equal lengths
    assert corr.item() == 0.0 and mean_length.item() == 2.0


def test_kl_reward_fraction_by_hand():
    # Summed KL per response: 0.1 + 0.2 = 0.3 (the 9.0 is outside the mask) and 1.5; mean 0.9.
    # penalty = 0.5 * 0.9 = 0.45; mean |score| = (1 + 3) / 2 = 2; fraction = 0.45 / 2 = 0.225.
    kl = T([[0.1, 0.2, 9.0], [0.5, 0.5, 0.5]])
    mask = T([[1, 1, 0], [1, 1, 1]])
    fraction, penalty = kl_reward_fraction(T([1.0, -3.0]), kl, mask, kl_coef=0.5)
    assert penalty.item() == pytest.approx(0.45)
    assert fraction.item() == pytest.approx(0.225)
    # All scores 0 and no KL: 0, not NaN.
    fraction, _ = kl_reward_fraction(T([0.0, 0.0]), torch.zeros(2, 3), mask, kl_coef=0.5)
    assert fraction.item() == 0.0


def test_relative_drift_by_hand():
    assert relative_drift(0.45, 0.6) == pytest.approx(-0.25)  # a 25% fall
    assert relative_drift(3.0, 2.0) == pytest.approx(0.5)  # a 50% rise
    assert relative_drift(0.0, 0.0) == 0.0
