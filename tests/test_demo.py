"""The demo pipeline, fast version: every stage produces its outputs, and the table is reproducible."""

import json
import os

from rlhf.demo.evaluate import distinct_n, distinct_n_per_response
from rlhf.demo import run as demo


def test_distinct_n_by_hand():
    # bigrams: (a b) (b a) (a b) | (a b): 2 unique of 4
    assert distinct_n(["a b a b", "a b"]) == 0.5
    assert distinct_n_per_response(["a b a b", "c d"]) == (2 / 3 + 1) / 2


def test_fast_demo_produces_every_output_and_repeats_exactly(tmp_path):
    from rlhf.cli import main

    assert main(["demo", "--fast", "--output-dir", str(tmp_path / "a")]) == 0  # the command line, as make demo runs it
    out = tmp_path / "a"
    s1 = json.loads((out / "summary.json").read_text())
    for d in ("sft", "rm", "ppo", "dpo"):
        assert (out / d / "model.safetensors").exists(), d
    for f in ("summary.json", "report.html", "ppo_curves.png", "frontier.png", "rm_vs_gold.png", "explain.md"):
        assert (out / f).exists(), f
    summary = json.loads((out / "summary.json").read_text())
    for name in ("sft", "ppo", "dpo"):
        assert set(summary[name]) >= {"gold_reward_mean", "gold_reward_std", "rm_score_mean", "kl_to_sft", "distinct2",
                                      "no_eos_fraction"}
    assert {"rm_heldout_accuracy", "gold_agreement_ceiling", "seconds"} <= set(summary)
    assert summary["sft"]["kl_to_sft"] == 0.0
    assert "<img" in (out / "report.html").read_text() and "V_target" in (out / "explain.md").read_text()
    s2 = demo.run(demo.Config(output_dir=str(tmp_path / "b"), fast=True))
    s1.pop("seconds"), s2.pop("seconds")
    assert s1 == s2  # the same seed gives the same table
