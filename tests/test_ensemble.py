"""Reward-model ensembles (issue 15 item 2): the aggregation math by hand, the ensemble directory
trained through the CLI and loaded by plain transformers, PPO/GRPO on it, and the monitor's
disagreement warning."""

import json
import os
import types

import pytest
import torch
from test_recipes_sft_rm import pref_rows, write
from transformers import AutoModelForSequenceClassification

from rlhf.algos import aggregate_scores, ensemble_std
from rlhf.cli import main
from rlhf.models import load_reward_models, member_scores

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


# ---- the ensemble directory, trained through the CLI -------------------------------------------

RM_FLAGS = ["--batch-size", "8", "--lr", "2e-3", "--max-steps", "6", "--max-length", "48", "--report-to", "none"]


def rm_args(tiny_dir, d, out, *extra):
    data = write(d / "pairs.jsonl", pref_rows(0, 64))
    held_out = write(d / "held_out.jsonl", pref_rows(1, 16))
    return ["rm", "--model", tiny_dir, "--data", data, "--eval-data", held_out, "--output-dir", str(out),
            *RM_FLAGS, *extra]


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("ensemble")
    assert main(rm_args(tiny_dir, d, d / "rm", "--ensemble", "2")) == 0
    return str(d / "rm")


def test_cli_ensemble_is_k_members_each_loadable_by_transformers(ensemble_dir, tokenizer):
    with open(os.path.join(ensemble_dir, "ensemble.json")) as f:
        manifest = json.load(f)
    assert manifest["members"] == ["member-0", "member-1"] and manifest["aggregation"] == "mean"
    assert manifest["trained"]["seeds"] == [42, 43] and manifest["trained"]["diversity"] == "seed"
    metrics = manifest["metrics"]
    for key in ("eval/member-0/accuracy", "eval/member-1/accuracy", "eval/accuracy", "eval/member_std",
                "train/member-0/reward_std"):
        assert key in metrics, key
    assert os.path.exists(os.path.join(ensemble_dir, "tokenizer.json"))
    assert not os.path.exists(os.path.join(ensemble_dir, "config.json"))  # no single model at the top

    ours = load_reward_models(ensemble_dir)
    assert len(ours) == 2
    batch = tokenizer(["Please help with my car. Thank you, I am happy to help.", "Go away."], padding=True,
                      return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    scores = member_scores(ours, ids, mask)  # (B, K)
    for i, name in enumerate(manifest["members"]):
        plain = AutoModelForSequenceClassification.from_pretrained(os.path.join(ensemble_dir, name)).eval()
        with torch.no_grad():
            logits = plain(input_ids=ids, attention_mask=mask).logits[:, 0]
        torch.testing.assert_close(scores[:, i], logits, atol=1e-5, rtol=1e-5)
        assert plain.config.rlhf_score_std > 0  # each member stores its own normalisation stats
    # Different seeds give different members (score-head init and data order).
    assert not torch.allclose(scores[:, 0], scores[:, 1])


def test_bootstrap_resample_is_seeded_and_with_replacement():
    from rlhf.recipes.reward import bootstrap

    examples, where = [{"i": i} for i in range(50)], [f"f:{i}" for i in range(50)]
    a, wa = bootstrap(examples, where, 7)
    assert a == bootstrap(examples, where, 7)[0] and a != bootstrap(examples, where, 8)[0]
    assert len(a) == 50 and len({e["i"] for e in a}) < 50  # some pairs drawn twice
    assert all(w == f"f:{e['i']}" for e, w in zip(a, wa))


# ---- PPO and GRPO on the ensemble --------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["ppo", "grpo"])
@pytest.mark.parametrize("aggregation", ["mean", "mean_minus_std", "min"])
def test_one_step_with_each_aggregation_logs_the_ensemble_metrics(recipe, aggregation, ensemble_dir, tiny_dir,
                                                                   prompts_file, tmp_path):
    out = tmp_path / "o"
    shape = (["--rollout-batch-size", "4", "--num-generations", "2", "--mini-batch-size", "8"] if recipe == "grpo"
             else ["--rollout-batch-size", "8", "--mini-batch-size", "8"])
    code = main([recipe, "--model", tiny_dir, "--data", prompts_file, "--reward-model", ensemble_dir,
                 "--output-dir", str(out), "--max-steps", "1", "--batch-size", "8", "--max-new-tokens", "8",
                 "--reward-aggregation", aggregation, "--reward-uncertainty-coef", "2.0", "--report-to", "none",
                 *shape])
    assert code == 0
    row = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "objective/rm_score" in x][-1]
    mean, std, score = row["objective/rm_score_mean"], row["objective/rm_std"], row["objective/rm_score"]
    assert std > 0 and row["monitor/rm_disagreement"] == pytest.approx(std)
    assert row["monitor/rm_disagreement_vs_start"] == 0.0  # step 1 is the baseline
    if aggregation == "mean":
        assert score == pytest.approx(mean)
    elif aggregation == "mean_minus_std":  # means over the batch of mean - 2 std
        assert score == pytest.approx(mean - 2.0 * std, abs=1e-5)
    else:
        assert score < mean


# ---- the monitor's disagreement signal ---------------------------------------------------------

class Events:
    def __init__(self):
        self.lines = []

    def event(self, step, message, **fields):
        self.lines.append((step, message, fields))


def monitor(growth=0.5):
    from rlhf.watch.monitor import Monitor

    cfg = types.SimpleNamespace(monitor_distinct_drop=None, monitor_length_growth=None,
                                monitor_reward_length_corr=None, monitor_kl_fraction=None,
                                monitor_disagreement_growth=growth)
    return Monitor(cfg, {})


def batch_of(member):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    return ids, torch.ones_like(ids), member.mean(1)


def test_disagreement_warning_fires_when_it_grows_past_the_threshold():
    m, log = monitor(0.5), Events()
    # Step 1: stds 1 and 0 (by hand) -> disagreement 0.5, the baseline.
    s1 = m.measure(1, *batch_of(torch.tensor([[1.0, 3.0], [2.0, 2.0]])), member_scores=torch.tensor([[1.0, 3.0],
                                                                                                     [2.0, 2.0]]))
    assert s1["monitor/rm_disagreement"] == 0.5 and s1["monitor/rm_disagreement_vs_start"] == 0.0
    m.warn(1, s1, log)
    # Step 2: stds 0.5 and 0.2 -> 0.35, a fall of 30%: quiet.
    two = torch.tensor([[0.0, 1.0], [0.0, 0.4]])
    s2 = m.measure(2, *batch_of(two), member_scores=two)
    assert s2["monitor/rm_disagreement_vs_start"] == pytest.approx(-0.3)
    m.warn(2, s2, log)
    warnings = lambda: [line for line in log.lines if line[2].get("signal")]  # noqa: E731 (not the info lines)
    assert warnings() == []
    # Step 3: stds 1 and 0.5 -> 0.75, 50% above step 1: crosses 0.5, one warning naming signal and step.
    three = torch.tensor([[0.0, 2.0], [1.0, 2.0]])
    s3 = m.measure(3, *batch_of(three), member_scores=three)
    assert s3["monitor/rm_disagreement_vs_start"] == pytest.approx(0.5)
    m.warn(3, s3, log)
    m.warn(4, s3, log)  # once per signal
    assert len(warnings()) == 1
    step, message, fields = warnings()[0]
    assert step == 3 and "monitor/rm_disagreement_vs_start" in message and "--monitor-disagreement-growth" in message
    assert fields["signal"] == "monitor/rm_disagreement_vs_start"


def test_no_ensemble_no_disagreement_signal():
    m = monitor()
    single = torch.tensor([[1.0], [2.0]])
    for member in (None, single):
        signals = m.measure(1, *batch_of(single), member_scores=member)
        assert not any(k.startswith("monitor/rm_") for k in signals)


def test_disagreement_growth_flag_may_change_on_resume():
    from rlhf.recipes import ppo
    from rlhf.training.checkpoints import run_record

    assert run_record(ppo.Config(model="m")) == run_record(ppo.Config(model="m", monitor_disagreement_growth=0.1))


# ---- bad input: one line naming what and where -------------------------------------------------

def one_line_error(capsys, argv, *expected):
    assert main(argv) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("rlhf ")]  # besides transformers' loading bars
    assert len(errors) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in errors[0], errors[0]


def test_bad_ensemble_flags_are_one_line(tiny_dir, prompts_file, tmp_path, capsys):
    one_line_error(capsys, rm_args(tiny_dir, tmp_path, tmp_path / "a", "--ensemble", "0"), "--ensemble must be at least 1")
    one_line_error(capsys, rm_args(tiny_dir, tmp_path, tmp_path / "a", "--ensemble-bootstrap"),
                   "--ensemble-bootstrap", "--ensemble 2")
    one_line_error(capsys, ["ppo", "--model", tiny_dir, "--data", prompts_file, "--reward-fn", "rule_rewards:vowel_fraction",
                            "--reward-uncertainty-coef", "-1", "--output-dir", str(tmp_path / "p")],
                   "--reward-uncertainty-coef must be 0 or more")


def test_broken_ensemble_directory_is_one_line_naming_it(ensemble_dir, tiny_dir, prompts_file, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(ensemble_dir, broken)
    argv = ["ppo", "--model", tiny_dir, "--data", prompts_file, "--reward-model", str(broken), "--max-steps", "1",
            "--output-dir", str(tmp_path / "p"), "--report-to", "none"]
    (broken / "ensemble.json").write_text('{"members": ["member-0", ')
    one_line_error(capsys, argv, f"{broken}/ensemble.json", "not valid JSON")
    (broken / "ensemble.json").write_text(json.dumps({"members": ["member-0", "member-1", "member-2"]}))
    one_line_error(capsys, argv, f"{broken}/ensemble.json", "'member-2'", f"{broken}/member-2")
    (broken / "ensemble.json").write_text(json.dumps({"members": []}))
    one_line_error(capsys, argv, f"{broken}/ensemble.json", "non-empty list")


def test_resumed_ensemble_ends_with_the_same_members(tiny_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from rlhf.training import logs as common

    def argv(name):
        return rm_args(tiny_dir, tmp_path, tmp_path / name, "--ensemble", "2", "--max-steps", "4", "--save-every", "2")

    assert main(argv("full")) == 0
    real_log = common.RunLogger.log

    def die_in_member_1_at_step_3(self, step, metrics):
        if step == 3 and "member-1" in self.path:
            raise KeyboardInterrupt  # killed after member 1's step 3, past its step-2 checkpoint
        return real_log(self, step, metrics)

    monkeypatch.setattr(common.RunLogger, "log", die_in_member_1_at_step_3)
    assert main(argv("killed")) == 130
    monkeypatch.setattr(common.RunLogger, "log", real_log)
    killed = tmp_path / "killed"
    assert not (killed / "ensemble.json").exists()  # an unfinished ensemble is not loadable as one
    assert main(argv("killed")) == 1  # without --resume: refused, the partial run is kept
    assert main([*argv("killed"), "--resume"]) == 0
    for name in ("member-0", "member-1"):
        a = load_file(str(tmp_path / "full" / name / "model.safetensors"))
        b = load_file(str(killed / name / "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    assert json.loads((killed / "ensemble.json").read_text())["members"] == ["member-0", "member-1"]


# ---- review fixes: an ensemble directory is never read or reused as something else ------------

def test_a_single_reward_model_into_an_ensemble_directory_is_refused(ensemble_dir, tiny_dir, tmp_path, capsys):
    """Before: exit 0, and PPO then scored with the old members, not the new model."""
    import shutil

    out = tmp_path / "ens"
    shutil.copytree(ensemble_dir, out)
    one_line_error(capsys, rm_args(tiny_dir, tmp_path, out), f"--output-dir {out} holds another run's results",
                   "ensemble.json")
    assert main([*rm_args(tiny_dir, tmp_path, out), "--overwrite-output-dir"]) == 0
    assert not (out / "ensemble.json").exists() and not (out / "member-0").exists()  # the old ensemble is gone
    assert (out / "config.json").exists()


def test_resume_checks_finished_members_and_needs_something_to_resume(ensemble_dir, tiny_dir, tmp_path, capsys):
    """Before: --resume with other data or another --lr reused the finished members, exit 0, and
    rewrote ensemble.json to name the new data; --resume of an empty directory started afresh."""
    import shutil

    from pathlib import Path

    data_dir = Path(ensemble_dir).parent  # the ensemble's own data files
    out = tmp_path / "ens"
    shutil.copytree(ensemble_dir, out)
    one_line_error(capsys, [*rm_args(tiny_dir, data_dir, out, "--ensemble", "2", "--lr", "1e-3"), "--resume"],
                   "--resume", "--lr 0.002 there, 0.001 now")
    one_line_error(capsys, [*rm_args(tiny_dir, tmp_path, out, "--ensemble", "2"), "--resume"],  # other data files
                   "--resume", "--data")
    before = (out / "ensemble.json").read_text()
    assert main([*rm_args(tiny_dir, data_dir, out, "--ensemble", "2"), "--resume"]) == 0  # the same config: done
    assert json.loads((out / "ensemble.json").read_text())["members"] == json.loads(before)["members"]
    one_line_error(capsys, [*rm_args(tiny_dir, tmp_path, tmp_path / "empty", "--ensemble", "2"), "--resume"],
                   "--resume: no member of an ensemble", "to resume")


def test_explain_scores_with_every_member(ensemble_dir, tiny_dir, capsys):
    """Before: rlhf explain loaded member-0 alone, silently. Now the members' mean (the default)."""
    from rlhf.models import ModelLoadError, load_sequence_classifier

    assert main(["explain", "--model", tiny_dir, "--reward-model", ensemble_dir, "--prompt", "Hello",
                 "--max-new-tokens", "4"]) == 0
    with pytest.raises(ModelLoadError, match="a reward-model ensemble"):
        load_sequence_classifier(ensemble_dir)  # no caller gets one member unawares
    assert load_sequence_classifier(ensemble_dir, first_member=True) is not None  # a critic's start
