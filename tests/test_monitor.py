"""The over-optimisation monitor: its math by hand (tier 1), then the signals, warnings and
--no-monitor in the PPO and GRPO recipes on the tiny model (tier 3)."""

import json
import math

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


def test_reward_length_correlation_is_undefined_without_variance():
    """Issue 22, item 6: defined only where the lengths and the scores vary, over 3 responses or more; it was 0
    there, which reads as "no correlation"."""
    corr, _ = reward_length(T([0.5, 0.5, 0.5]), MASK)  # equal scores
    assert math.isnan(corr.item())
    corr, mean_length = reward_length(T([1.0, 2.0, 3.0]), T([[1, 1, 0], [1, 1, 0], [1, 1, 0]]))  # equal lengths
    assert math.isnan(corr.item()) and mean_length.item() == 2.0
    corr, _ = reward_length(T([1.0, 2.0]), T([[1, 1, 0], [1, 0, 0]]))  # two points: r = -1 whatever they are
    assert math.isnan(corr.item())


def test_monitor_leaves_an_undefined_correlation_out_and_says_so_once():
    """Issue 22, item 6: reward_length_corr on equal lengths was logged (as 0; the user saw 1.00) instead of
    being left out with a line saying why; it is no warning."""
    from types import SimpleNamespace

    from rlhf.watch.monitor import Monitor

    class Log:
        def __init__(self):
            self.events = []

        def event(self, step, message, **fields):
            self.events.append((step, message, fields))

    cfg = SimpleNamespace(monitor_distinct_drop=0.3, monitor_length_growth=0.5, monitor_reward_length_corr=0.7,
                          monitor_kl_fraction=0.5)
    monitor, log, ids = Monitor(cfg, {}), Log(), torch.arange(16).view(4, 4)
    same_length, scores = torch.ones(4, 4), T([0.0, 1.0, 0.0, 1.0])
    for step in (1, 2):  # every response 4 tokens: undefined, said at step 1 only
        signals = monitor.measure(step, ids, same_length, scores)
        assert "monitor/reward_length_corr" not in signals and "monitor/length_mean" in signals
        monitor.warn(step, signals, log)
    assert log.events == [(1, "over-optimisation monitor: monitor/reward_length_corr is not measured at step 1: "
                              "every response has 4 tokens; it is logged at the steps where the lengths and the "
                              "scores both vary", {})]
    varied = T([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    signals = monitor.measure(3, ids, varied, scores)
    assert signals["monitor/reward_length_corr"] == pytest.approx(float(reward_length(scores, varied)[0]))
    signals = monitor.measure(4, ids, varied, torch.zeros(4))  # scores that tie: why is named (once a run: not now)
    assert monitor.why_unmeasured == {"monitor/reward_length_corr": "every response has the score 0"}


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


# ---- tier 3: the monitor in the PPO and GRPO recipes ------------------------------------

SIGNALS = ("monitor/distinct2_within", "monitor/distinct2_across", "monitor/distinct2_across_vs_start",
           "monitor/distinct2_within_vs_start", "monitor/repeat3_fraction", "monitor/length_mean",
           "monitor/length_vs_start", "monitor/reward_length_corr", "monitor/kl_penalty", "monitor/kl_reward_fraction")
NEVER = dict(monitor_distinct_drop=None, monitor_length_growth=None, monitor_reward_length_corr=None,
             monitor_kl_fraction=None)


def ppo_config(tiny_dir, prompts_file, tmp_path, **over):
    from rlhf.recipes import ppo

    kw = dict(model=tiny_dir, data=prompts_file, reward_fn="rule_rewards:vowel_fraction", output_dir=str(tmp_path / "o"),
              max_steps=3, rollout_batch_size=8, mini_batch_size=8, batch_size=8, ppo_epochs=1, max_new_tokens=16,
              lr=3e-3, kl_coef=0.05, report_to="none", seed=0)
    return ppo.Config(**{**kw, **over})


def grpo_config(tiny_dir, prompts_file, tmp_path, **over):
    from rlhf.recipes import grpo

    kw = dict(model=tiny_dir, data=prompts_file, reward_fn="rule_rewards:vowel_fraction", output_dir=str(tmp_path / "o"),
              max_steps=3, rollout_batch_size=4, num_generations=4, mini_batch_size=16, batch_size=16,
              max_new_tokens=16, lr=3e-3, beta=0.05, report_to="none", seed=0)
    return grpo.Config(**{**kw, **over})


def read_log(tmp_path):
    lines = [json.loads(x) for x in open(tmp_path / "o" / "metrics.jsonl")]
    return [r for r in lines if "event" not in r], [r for r in lines if "event" in r]


def check_signals(rows, events, length_key):
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in SIGNALS:  # the correlation where it is defined; the first step without it says so
            assert key in r or key == "monitor/reward_length_corr" and any(
                f"{key} is not measured at step" in e["event"] and e["step"] <= r["step"] for e in events), (r["step"], key)
        assert r["monitor/length_mean"] == pytest.approx(r[length_key])  # one definition of length
    assert any("monitor/reward_length_corr" in r for r in rows)
    # The baseline is step 1's rollout, sampled by the SFT model before any update: no drift there.
    assert rows[0]["monitor/length_vs_start"] == 0.0 and rows[0]["monitor/distinct2_across_vs_start"] == 0.0
    # ... and the policy equals the reference, so its KL penalty is 0.
    assert rows[0]["monitor/kl_penalty"] == pytest.approx(0.0, abs=1e-6)
    # Later drifts are measured against step 1's values.
    start = rows[0]["monitor/length_mean"]
    assert rows[-1]["monitor/length_vs_start"] == pytest.approx((rows[-1]["monitor/length_mean"] - start) / start)


def test_ppo_logs_the_monitor_signals_every_step(tiny_dir, prompts_file, tmp_path):
    from rlhf.recipes import ppo

    ppo.run(ppo_config(tiny_dir, prompts_file, tmp_path))
    rows, events = read_log(tmp_path)
    check_signals(rows, events, "response/length_mean")
    # A PPO update at lr 3e-3 moves the policy off the reference: the penalty becomes non-zero.
    assert rows[-1]["monitor/kl_penalty"] != 0.0
    assert "over-optimisation monitor:" in events[-1]["event"] and events[-1]["step"] == 3


@pytest.mark.parametrize("kl_in_reward", [False, True])
def test_grpo_logs_the_monitor_signals_every_step(kl_in_reward, tiny_dir, prompts_file, tmp_path):
    from rlhf.recipes import grpo

    grpo.run(grpo_config(tiny_dir, prompts_file, tmp_path, kl_in_reward=kl_in_reward))
    rows, events = read_log(tmp_path)
    check_signals(rows, events, "completions/mean_length")
    # KL in the loss (k3, read from the update's single pass) or in the reward (k1 of the rollout):
    # either way the moved policy's penalty shows up. k3 is never negative.
    assert rows[-1]["monitor/kl_penalty"] != 0.0
    if not kl_in_reward:
        assert all(r["monitor/kl_penalty"] >= 0.0 for r in rows)
    assert "over-optimisation monitor:" in events[-1]["event"]


def test_a_crossed_threshold_is_one_warning_naming_the_signal_and_step(tiny_dir, prompts_file, tmp_path):
    from rlhf.recipes import ppo

    # The length can never fall by more than 100%, so a growth threshold of -1 is crossed at step 1
    # and at every step after it; the warning must still be given once.
    ppo.run(ppo_config(tiny_dir, prompts_file, tmp_path, **{**NEVER, "monitor_length_growth": -1.0}))
    rows, events = read_log(tmp_path)
    warnings = [e for e in events if e["event"].startswith("warning: over-optimisation")]
    assert len(warnings) == 1, warnings
    w = warnings[0]
    assert w["step"] == 1 and w["signal"] == "monitor/length_vs_start" and w["threshold"] == -1.0
    assert w["value"] == 0.0
    assert "monitor/length_vs_start = 0 crossed --monitor-length-growth -1 at step 1" in w["event"]
    assert all(r["monitor/length_vs_start"] >= -1.0 for r in rows)  # it stayed crossed
    summary = events[-1]
    assert summary["monitor_warnings"] == {"monitor/length_vs_start": 1}
    assert "1 warning(s): monitor/length_vs_start (first at step 1)" in summary["event"]


def test_quiet_run_says_no_warnings(tiny_dir, prompts_file, tmp_path):
    from rlhf.recipes import grpo

    grpo.run(grpo_config(tiny_dir, prompts_file, tmp_path, max_steps=2, **NEVER))
    _, events = read_log(tmp_path)
    assert [e["event"] for e in events] == ["over-optimisation monitor: no warnings"]


def test_no_monitor_computes_nothing(tiny_dir, prompts_file, tmp_path, monkeypatch):
    import rlhf.watch.monitor as monitor
    from rlhf.cli import build_parser
    from rlhf.recipes import grpo, ppo

    args = build_parser("grpo").parse_args(["grpo", "--model", "m", "--no-monitor"])
    assert args.monitor is False

    def fail(*a, **k):
        raise AssertionError("the monitor ran under --no-monitor")

    for name in ("distinct_n", "repetition_fraction", "reward_length", "kl_reward_fraction"):
        monkeypatch.setattr(monitor, name, fail)
    for recipe, cfg in ((grpo, grpo_config(tiny_dir, prompts_file, tmp_path, max_steps=2, monitor=False)),
                        (ppo, ppo_config(tiny_dir, prompts_file, tmp_path, max_steps=2, monitor=False,
                                         overwrite_output_dir=True))):
        recipe.run(cfg)
        text = open(tmp_path / "o" / "metrics.jsonl").read()
        assert "monitor" not in text, recipe.__name__


def test_monitor_flags_may_change_on_resume():
    # They change what is reported, not what is trained: --resume must not refuse a checkpoint for them.
    from rlhf.recipes import ppo
    from rlhf.training.checkpoints import run_record

    changed = dict(monitor=False, monitor_distinct_drop=0.1, monitor_length_growth=None, monitor_reward_length_corr=0.9,
                   monitor_kl_fraction=2.0)
    assert run_record(ppo.Config(model="m")) == run_record(ppo.Config(model="m", **changed))


def test_kl_fraction_of_scores_near_zero_is_no_false_alarm():
    """Issue 22, item 6: reward 0 and a KL of 4e-7 read 'kl_reward_fraction = 10.13 (1013% of the mean |score|)'."""
    from rlhf.algos import kl_reward_fraction

    scores, mask = torch.zeros(4), torch.ones(4, 8)
    fraction, penalty = kl_reward_fraction(scores, torch.full((4, 8), 4e-7), mask, kl_coef=0.04)
    assert fraction.item() < 1e-3 and penalty.item() == pytest.approx(0.04 * 8 * 4e-7)
    # A sizeable penalty against scores near 0 still reads as large.
    fraction, _ = kl_reward_fraction(scores, torch.full((4, 8), 0.5), mask, kl_coef=0.04)
    assert fraction.item() > 1.0
