"""Implicit preference accuracy on --eval-data pairs and --stop-on-overoptimisation (issue 15):
the math by hand (tier 1), then PPO and GRPO through the CLI on the tiny model (tier 3)."""

import json
import os

import pytest
import torch

T = torch.tensor


def test_implicit_preference_accuracy_by_hand():
    from rlhf.algos import implicit_preference_accuracy

    # Log-ratios chosen / rejected per pair: (-1 - -2) = 1 vs (-3 - -3) = 0 -> margin 1, right;
    # (-2 - -1) = -1 vs (-1 - -1.5) = 0.5 -> margin -1.5, wrong; (-4 - -4) = 0 vs (-5 - -5) = 0 -> tie, half.
    # accuracy = (1 + 0 + 0.5) / 3 = 0.5; margin = (1 - 1.5 + 0) / 3 = -1/6.
    chosen, rejected = T([-1.0, -2.0, -4.0]), T([-3.0, -1.0, -5.0])
    ref_chosen, ref_rejected = T([-2.0, -1.0, -4.0]), T([-3.0, -1.5, -5.0])
    accuracy, margin = implicit_preference_accuracy(chosen, rejected, ref_chosen, ref_rejected)
    assert accuracy.item() == pytest.approx(0.5)
    assert margin.item() == pytest.approx(-1 / 6)
    # The policy is its reference (step 0): every margin 0, accuracy 0.5 (chance), margin 0.
    accuracy, margin = implicit_preference_accuracy(chosen, rejected, chosen, rejected)
    assert accuracy.item() == 0.5 and margin.item() == 0.0
    # beta > 0 does not change the ordering: scaling every log-prob by 2 keeps the accuracy.
    accuracy, _ = implicit_preference_accuracy(2 * chosen, 2 * rejected, 2 * ref_chosen, 2 * ref_rejected)
    assert accuracy.item() == pytest.approx(0.5)
