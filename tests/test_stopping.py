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


# ---- tier 3: PPO and GRPO through the CLI ---------------------------------------------------

GOOD = ["I am so sorry about the delay, I will check your order now.", "Thank you for your patience."]
BAD = ["Your order is delayed.", "This is unacceptable."]


@pytest.fixture
def pairs_file(tmp_path):
    """Six preference pairs in the format rlhf dpo reads."""
    rows = [{"prompt": f"My order {i} is late.", "chosen": " " + GOOD[i % 2], "rejected": " " + BAD[i % 2]}
            for i in range(6)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cli(recipe, tiny_dir, prompts_file, out, *extra):
    from rlhf.cli import main

    common = ["--model", tiny_dir, "--data", prompts_file, "--reward-fn", "rule_rewards:vowel_fraction",
              "--output-dir", str(out), "--max-new-tokens", "16", "--lr", "3e-3", "--report-to", "none", "--seed", "0"]
    shape = {"ppo": ["--rollout-batch-size", "8", "--mini-batch-size", "8", "--batch-size", "8", "--ppo-epochs", "1"],
             "grpo": ["--rollout-batch-size", "4", "--num-generations", "4", "--mini-batch-size", "16",
                      "--batch-size", "16"]}[recipe]
    return main([recipe, *common, *shape, *map(str, extra)])


def read(out):
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    return [r for r in lines if "event" not in r], [r for r in lines if "event" in r]


def weights(directory, prefix=""):
    from safetensors.torch import load_file

    state = load_file(os.path.join(directory, "model.safetensors"))
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


NEVER = ["--monitor-distinct-drop", "none", "--monitor-length-growth", "none", "--monitor-reward-length-corr", "none",
         "--monitor-kl-fraction", "none", "--monitor-pref-accuracy-drop", "none"]


def assert_same_weights(got: dict, want: dict):
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_ppo_logs_implicit_preference_accuracy_at_step_0_and_the_end(tiny_dir, prompts_file, pairs_file, tmp_path):
    # With --stop-on-overoptimisation but no threshold that can trip: the run goes to --max-steps,
    # the final model is the last step's, and best/ is still written.
    out = tmp_path / "o"
    code = cli("ppo", tiny_dir, prompts_file, out, "--max-steps", 3, "--eval-data", pairs_file,
               "--stop-on-overoptimisation", "--save-every", 3, *NEVER)
    assert code == 0
    rows, events = read(out)
    evals = [r for r in rows if "eval/implicit_pref_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 3]
    # Step 0: the policy is its reference, so every margin is 0 and the accuracy is chance.
    assert evals[0]["eval/implicit_pref_accuracy"] == 0.5 and evals[0]["eval/implicit_margin"] == 0.0
    # Three updates at lr 3e-3 move the policy: the margins are no longer 0.
    assert evals[1]["eval/implicit_margin"] != 0.0
    assert 0.0 <= evals[1]["eval/implicit_pref_accuracy"] <= 1.0
    assert max(r["step"] for r in rows) == 3 and not any("stopping" in e["event"] for e in events)
    best = json.load(open(out / "best" / "best.json"))
    scores = {r["step"]: r["objective/scores"] for r in rows if "objective/scores" in r}
    assert best["step"] == max(scores, key=scores.get) - 1 and best["value"] == pytest.approx(max(scores.values()))
    assert os.path.exists(out / "best" / "value_head.safetensors")
    assert_same_weights(weights(out), weights(out / "checkpoints" / "step-00000003", "policy."))


@pytest.mark.parametrize("beta", [0.05, 0.0])
def test_grpo_logs_implicit_preference_accuracy_at_step_0_and_the_end(beta, tiny_dir, prompts_file, pairs_file,
                                                                     tmp_path):
    # beta 0: no reference model; the step-0 policy's log-probs serve as the reference.
    out = tmp_path / "o"
    code = cli("grpo", tiny_dir, prompts_file, out, "--max-steps", 2, "--beta", beta, "--eval-data", pairs_file)
    assert code == 0
    rows, _ = read(out)
    evals = [r for r in rows if "eval/implicit_pref_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert evals[0]["eval/implicit_pref_accuracy"] == 0.5 and evals[0]["eval/implicit_margin"] == 0.0
    assert evals[1]["eval/implicit_margin"] != 0.0


def check_stopped_at_first_warning(out, score_key, max_steps):
    """The run stopped at the monitor's first warning; best/ is the highest-scoring rollout's policy
    before it; return (warning step, best step)."""
    rows, events = read(out)
    warnings = [e for e in events if e["event"].startswith("warning: over-optimisation")]
    assert warnings, "the forced warning did not come"
    first = warnings[0]["step"]
    assert first < max_steps and max(r["step"] for r in rows) == first
    assert any(e["event"].startswith("stopping (--stop-on-overoptimisation)") and e["step"] == first for e in events)
    # The score logged at step s is of the samples of the policy after s - 1 updates.
    scores = {r["step"]: r[score_key] for r in rows if score_key in r and r["step"] < first}
    best = json.load(open(out / "best" / "best.json"))
    assert best["step"] == max(scores, key=scores.get) - 1
    assert best["value"] == pytest.approx(max(scores.values()))
    return first, best["step"]


def test_ppo_stops_at_the_first_warning_and_keeps_the_best_policy(tiny_dir, prompts_file, pairs_file, tmp_path):
    # Forced: the accuracy on the pairs counts as "fallen" as soon as it is less than 0.1 above its start.
    out = tmp_path / "o"
    code = cli("ppo", tiny_dir, prompts_file, out, "--max-steps", 6, "--eval-data", pairs_file, "--eval-every", 2,
               "--stop-on-overoptimisation", "--save-every", 1, "--save-total-limit", 0,
               *NEVER[:-2], "--monitor-pref-accuracy-drop", -0.1)
    assert code == 0  # an intended stop
    first, best = check_stopped_at_first_warning(out, "objective/scores", 6)
    rows, _ = read(out)
    assert "eval/implicit_pref_accuracy" in [r for r in rows if r["step"] == first][-1]  # evaluated at the end too
    # The final model (and its value head) is best/, which is the policy after `best` updates.
    assert_same_weights(weights(out), weights(out / "best"))
    at_best = weights(out / "checkpoints" / f"step-{best:08d}", "policy.") if best else weights(tiny_dir)
    assert_same_weights(weights(out), at_best)
    from safetensors.torch import load_file

    assert_same_weights(load_file(out / "value_head.safetensors"), load_file(out / "best" / "value_head.safetensors"))
    assert "best.json" not in os.listdir(out)


def test_grpo_stops_at_the_first_warning_and_keeps_the_best_policy(tiny_dir, prompts_file, tmp_path):
    # Forced: any fall of distinct-2 across responses warns.
    out = tmp_path / "o"
    code = cli("grpo", tiny_dir, prompts_file, out, "--max-steps", 6, "--stop-on-overoptimisation",
               "--save-every", 1, "--save-total-limit", 0, *NEVER[2:], "--monitor-distinct-drop", 0.0001)
    assert code == 0
    _, best = check_stopped_at_first_warning(out, "reward", 6)
    at_best = weights(out / "checkpoints" / f"step-{best:08d}") if best else weights(tiny_dir)
    assert_same_weights(weights(out), at_best)
    assert_same_weights(weights(out), weights(out / "best"))


@pytest.mark.parametrize("flags, message", [
    (["--eval-every", "2"], "--eval-every: grpo evaluates --eval-data"),
    (["--stop-on-overoptimisation", "--no-monitor"], "--stop-on-overoptimisation stops at the monitor's"),
])
def test_online_eval_and_stop_flags_are_checked(flags, message, tiny_dir, prompts_file, tmp_path, capsys):
    code = cli("grpo", tiny_dir, prompts_file, tmp_path / "o", *flags)
    assert code == 1 and message in capsys.readouterr().err


def test_the_best_policy_survives_resume(tiny_dir, prompts_file, tmp_path):
    out = tmp_path / "o"
    assert cli("grpo", tiny_dir, prompts_file, out, "--max-steps", 2, "--stop-on-overoptimisation", "--save-every", 2,
               *NEVER[:-2]) == 0
    assert cli("grpo", tiny_dir, prompts_file, out, "--max-steps", 3, "--stop-on-overoptimisation", "--save-every", 2,
               *NEVER[:-2], "--resume") == 0
    rows, _ = read(out)
    scores = {r["step"]: r["reward"] for r in rows}
    assert sorted(scores) == [1, 2, 3]
    # The best over all three rollouts, those before the resume included (their best lives in the checkpoint).
    best = json.load(open(out / "best" / "best.json"))
    assert best["step"] == max(scores, key=scores.get) - 1
    assert best["value"] == pytest.approx(max(scores.values()))
