"""Tier 3: the PPO recipe on a tiny model with a rule reward, and its experience tensors."""

import json

import pytest
import torch

from rlhf.models import PolicyWithValueHead, causal_logits, load_causal_lm
from rlhf.recipes import ppo
from rlhf.rollout import HFRollout, RolloutBatch, SamplingParams, response_mask_from_ids


def config(tiny_dir, prompts_file, tmp_path, **over):
    kw = dict(model=tiny_dir, data=prompts_file, reward_fn="rule_rewards:vowel_fraction", output_dir=str(tmp_path / "o"),
              max_steps=30, rollout_batch_size=16, mini_batch_size=8, batch_size=8, ppo_epochs=2, max_new_tokens=16,
              lr=3e-3, kl_coef=0.01, report_to="none", seed=0)
    kw.update(over)
    return ppo.Config(**kw)


def metrics_rows(path):
    return [json.loads(x) for x in open(path) if "objective/scores" in x]


def test_ppo_raises_rule_reward(tiny_dir, prompts_file, tmp_path):
    ppo.run(config(tiny_dir, prompts_file, tmp_path))
    rows = metrics_rows(tmp_path / "o" / "metrics.jsonl")
    first = sum(r["objective/scores"] for r in rows[:3]) / 3
    last = sum(r["objective/scores"] for r in rows[-3:]) / 3
    # Stated margin: 30 steps raise the mean vowel fraction by at least 0.15 (about 0.13 -> 0.45 here).
    assert last > first + 0.15, (first, last)
    assert all(abs(r["objective/kl"]) < 1e3 for r in rows)
    assert (tmp_path / "o" / "value_head.safetensors").exists() and (tmp_path / "o" / "model.safetensors").exists()
    for key in ("objective/rlhf_reward", "objective/entropy", "policy/clipfrac", "policy/approxkl", "val/loss",
                "val/clipfrac", "val/explained_variance", "val/mean", "response/length_mean",
                "response/no_eos_fraction", "speed/tokens_per_second", "time/generate", "time/score", "time/train"):
        assert key in rows[-1], key
    from test_dpo_grpo import assert_timers_add_up

    assert_timers_add_up(rows[-1], "time/policy_value_pass", "time/reference_pass", "time/generate", "time/train")


def test_first_step_ratio_is_exactly_one(tiny_dir, prompts_file, tmp_path):
    # One epoch, one minibatch (of two micro-batches): the first update's forward must reproduce
    # the rollout forward exactly, so the ratio is 1 and nothing is clipped.
    ppo.run(config(tiny_dir, prompts_file, tmp_path, max_steps=1, ppo_epochs=1, mini_batch_size=16, batch_size=8))
    row = metrics_rows(tmp_path / "o" / "metrics.jsonl")[0]
    assert row["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert row["policy/approxkl"] == pytest.approx(0.0, abs=1e-6)
    assert row["policy/clipfrac"] == 0.0


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_one_pass_update_equals_a_rollout_forward_then_the_update(critic, tiny_dir, prompts_file, tmp_path,
                                                                 monkeypatch):
    """One epoch of one minibatch in one micro-batch: the update's forward also gives the old log-probs and
    values (one forward fewer a step, ``ppo.single_pass``). Every logged number and the saved weights equal
    those of the rollout's own forward without gradient followed by the update, to the bit."""
    from safetensors.torch import load_file

    kw = dict(max_steps=2, ppo_epochs=1, mini_batch_size=16, batch_size=16, critic=critic)
    calls = []
    monkeypatch.setattr(ppo, "single_pass", lambda *a, real=ppo.single_pass: calls.append(real(*a)) or calls[-1])
    ppo.run(config(tiny_dir, prompts_file, tmp_path / "one", **kw))
    assert calls == [True] * 2
    monkeypatch.setattr(ppo, "single_pass", lambda *a: False)  # as before: step 4's forward, then the update
    ppo.run(config(tiny_dir, prompts_file, tmp_path / "two", **kw))
    one, two = (metrics_rows(tmp_path / d / "o" / "metrics.jsonl") for d in ("one", "two"))
    for a, b in zip(one, two):
        assert {k: v for k, v in a.items() if not k.startswith(("time/", "speed/"))} == \
               {k: v for k, v in b.items() if not k.startswith(("time/", "speed/"))}
    assert one[0]["policy/ratio_mean"] == 1.0 and one[0]["policy/clipfrac"] == 0.0
    w1, w2 = (load_file(str(tmp_path / d / "o" / "model.safetensors")) for d in ("one", "two"))
    assert all(torch.equal(w1[k], w2[k]) for k in w2)


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_both_critics_train(critic, tiny_dir, prompts_file, tmp_path):
    ppo.run(config(tiny_dir, prompts_file, tmp_path, critic=critic, max_steps=12, critic_lr=1e-2))
    rows = metrics_rows(tmp_path / "o" / "metrics.jsonl")
    assert rows[-1]["val/loss"] < 0.5 * rows[0]["val/loss"], (rows[0]["val/loss"], rows[-1]["val/loss"])
    if critic == "separate":
        assert (tmp_path / "o" / "critic" / "model.safetensors").exists()


def test_response_mask_with_eos_midway_and_no_eos():
    eos, pad = 2, 0
    ids = torch.tensor([[5, 2, 7, 8], [5, 6, 7, 8], [2, 9, 9, 9]])
    mask, finished = response_mask_from_ids(ids, eos)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert finished.tolist() == [True, False, True]


def test_experience_tensors_with_left_padding_and_mixed_endings(tiny_dir, tokenizer):
    policy = load_causal_lm(tiny_dir).eval()
    model = PolicyWithValueHead(policy).eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rollout = HFRollout(policy, pad, eos)
    batch = rollout.generate([[5, 6, 7, 8, 9], [10, 11]], SamplingParams(max_new_tokens=6, num_samples=2))
    assert batch.prompt_ids.shape == (4, 5) and batch.prompt_mask.tolist()[2] == [0, 0, 0, 1, 1]
    assert batch.response_ids.shape[1] <= 6 and batch.response_mask.shape == batch.response_ids.shape
    # A hand-built batch: row 0 stops midway (EOS), row 1 never stops; prompts left-padded.
    prompt = torch.tensor([[5, 6, 7], [pad, 10, 11]])
    prompt_mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    response = torch.tensor([[12, eos, pad], [13, 14, 15]])
    rmask, finished = response_mask_from_ids(torch.tensor([[12, eos, 99], [13, 14, 15]]), eos)
    b = RolloutBatch(prompt, prompt_mask, response, rmask, finished)
    logprobs, values, entropy = ppo.policy_forward(model, None, b.input_ids, b.attention_mask, 3, 1.0, True)
    assert logprobs.shape == values.shape == entropy.shape == (2, 3)
    # Row 1 scored alone, without padding, gives the same numbers: padding changes nothing.
    alone = torch.tensor([[10, 11, 13, 14, 15]])
    lp_alone = torch.log_softmax(causal_logits(policy, alone, torch.ones_like(alone))[:, 1:-1], -1)
    expected = lp_alone.gather(-1, alone[:, 2:, None])[..., 0]
    torch.testing.assert_close(logprobs[1], expected[0], atol=1e-5, rtol=1e-5)
    assert finished.tolist() == [True, False] and rmask.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_reward_model_with_another_tokenizer_is_one_clear_error(tiny_dir, prompts_file, tmp_path):
    from rlhf.models import save_pretrained, tiny_causal_lm, train_tokenizer
    from rlhf.errors import UserError

    other = train_tokenizer(["completely different words here"] * 10, vocab_size=280)
    save_pretrained(tiny_causal_lm(other, "llama", hidden_size=32), other, str(tmp_path / "rm"))
    with pytest.raises(UserError, match="its tokenizer differs from the policy's"):
        ppo.run(config(tiny_dir, prompts_file, tmp_path, reward_model=str(tmp_path / "rm"), max_steps=1))


def test_killed_ppo_run_resumes_to_the_same_weights(tiny_dir, prompts_file, tmp_path, monkeypatch, caplog):
    # Sampling, minibatch shuffles, optimizer, scheduler and the adaptive beta all come back;
    # the tied LM head too, so accelerate's "Removed shared tensor" note at each save is not shown.
    from safetensors.torch import load_file

    import rlhf.training.logs as common

    over = dict(max_steps=4, save_every=2, adaptive_kl=True, kl_target=0.5, kl_horizon=100)
    ppo.run(config(tiny_dir, prompts_file, tmp_path, output_dir=str(tmp_path / "full"), **over))
    real = common.RunLogger.log

    def die_at_step_3(self, step, metrics):
        if step == 3:
            raise KeyboardInterrupt
        return real(self, step, metrics)

    monkeypatch.setattr(common.RunLogger, "log", die_at_step_3)
    killed = config(tiny_dir, prompts_file, tmp_path, output_dir=str(tmp_path / "killed"), **over)
    with pytest.raises(KeyboardInterrupt):
        ppo.run(killed)
    monkeypatch.setattr(common.RunLogger, "log", real)
    killed.resume = "auto"
    ppo.run(killed)
    for name in ("model.safetensors", "value_head.safetensors"):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "killed" / name))
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    kl_coefs = [[r["objective/kl_coef"] for r in metrics_rows(tmp_path / d / "metrics.jsonl")] for d in ("full", "killed")]
    assert kl_coefs[0] == kl_coefs[1]
    # The monitor's step-0 baseline comes back with the checkpoint: its signals and drifts match, and the
    # resumed run still measures against step 1 (a lost baseline would be step 3's batch).
    signals = [[{k: v for k, v in r.items() if k.startswith("monitor/")} for r in metrics_rows(tmp_path / d / "metrics.jsonl")]
               for d in ("full", "killed")]
    assert signals[0] == signals[1] and "monitor/length_vs_start" in signals[0][-1]
    summary = [json.loads(x) for x in open(tmp_path / "killed" / "metrics.jsonl") if "monitor_warnings" in x]
    assert [s["monitor_baseline_step"] for s in summary] == [1]
    assert not [r for r in caplog.records if "Removed shared tensor" in r.getMessage()]


def test_sampling_uses_the_full_softmax_unless_asked(tiny_dir, tokenizer, monkeypatch):
    """generate must not slip in the model's default top_k=50: the losses score the full softmax."""
    import transformers.generation.logits_process as lp

    seen = []
    original = lp.TopKLogitsWarper.__call__
    monkeypatch.setattr(lp.TopKLogitsWarper, "__call__", lambda self, *a: seen.append(self.top_k) or original(self, *a))
    rollout = HFRollout(load_causal_lm(tiny_dir), tokenizer.pad_token_id, tokenizer.eos_token_id)
    rollout.generate([[5, 6, 7]], SamplingParams(temperature=1.0, max_new_tokens=3))
    assert seen == []
    rollout.generate([[5, 6, 7]], SamplingParams(temperature=1.0, max_new_tokens=3, top_k=5))
    assert seen and set(seen) == {5}
