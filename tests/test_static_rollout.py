"""The static-cache engine (CUDA graphs on a GPU, eager here): same law as generate, follows the policy."""

import json

import pytest
import torch

from rlhf.models import apply_lora, load_causal_lm
from rlhf.recipes.logprobs import model_response_logprobs
from rlhf.rollout import HFRollout, SamplingParams, StaticRollout, make_rollout, merged_named_weights

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [15]]  # different lengths: left padding


def greedy(rollout, params=SamplingParams(temperature=0, max_new_tokens=10, num_samples=2)):
    return rollout.generate(PROMPTS, params)


@pytest.mark.parametrize("bucket", [4, 128])  # a cache just long enough, and one with unused slots
def test_static_greedy_equals_generate_token_for_token(tiny_dir, tokenizer, bucket):
    model = load_causal_lm(tiny_dir)
    ours = greedy(StaticRollout(model, tokenizer.pad_token_id, tokenizer.eos_token_id, length_bucket=bucket))
    theirs = greedy(HFRollout(model, tokenizer.pad_token_id, tokenizer.eos_token_id, use_generate=True))
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "finished"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


def test_static_samples_the_policy_distribution(tiny_dir, tokenizer):
    """First token: empirical law of 6000 draws against softmax(logits / T) under top-k; later
    tokens: the log-prob the engine sampled each token with equals the training forward's."""
    model = load_causal_lm(tiny_dir)
    engine = StaticRollout(model, tokenizer.pad_token_id, tokenizer.eos_token_id)
    torch.manual_seed(0)
    n, k, temperature = 6000, 20, 0.7
    first = engine.generate([[5, 6, 7]], SamplingParams(temperature=temperature, top_k=k, max_new_tokens=1,
                                                        num_samples=n)).response_ids[:, 0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits[0, -1] / temperature
    top = logits.topk(k)
    p = torch.zeros_like(logits).scatter(0, top.indices, torch.softmax(top.values, -1))
    freq = torch.bincount(first, minlength=p.numel()).float() / n
    assert freq[p == 0].sum() == 0  # never outside the top k
    assert 0.5 * (freq - p).abs().sum() < 0.04  # total variation

    engine.record_logprobs = True
    batch = engine.generate(PROMPTS, SamplingParams(temperature=temperature, max_new_tokens=12, num_samples=3))
    with torch.no_grad():
        recomputed, _ = model_response_logprobs(model, batch.input_ids, batch.attention_mask, batch.prompt_ids.shape[1],
                                                temperature)
    on = batch.response_mask.bool()
    torch.testing.assert_close(engine.last_logprobs[on], recomputed[on], atol=1e-4, rtol=1e-4)


def test_static_engine_samples_from_updated_weights_after_load_weights(tiny_dir, tokenizer):
    """The engine holds its own copy: an update is invisible until load_weights, then matches exactly."""
    policy = load_causal_lm(tiny_dir)
    engine = StaticRollout(policy, tokenizer.pad_token_id, tokenizer.eos_token_id)
    reference = HFRollout(policy, tokenizer.pad_token_id, tokenizer.eos_token_id, use_generate=True)
    before = greedy(reference).response_ids
    with torch.no_grad():  # an "update" that changes the greedy continuation
        torch.manual_seed(1)
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    after = greedy(reference).response_ids
    assert not torch.equal(before, after)
    assert torch.equal(greedy(engine).response_ids, before)  # still the old weights
    engine.load_weights(merged_named_weights(policy))
    assert torch.equal(greedy(engine).response_ids, after)


def test_static_engine_merges_lora_and_follows_adapter_updates(tiny_dir, tokenizer):
    policy = apply_lora(load_causal_lm(tiny_dir), r=4, alpha=8)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that change the output (lora_B starts at 0)
    engine = StaticRollout(policy, tokenizer.pad_token_id, tokenizer.eos_token_id)
    reference = HFRollout(policy, tokenizer.pad_token_id, tokenizer.eos_token_id, use_generate=True)
    assert torch.equal(greedy(engine).response_ids, greedy(reference).response_ids)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_A" in name:
                p.normal_(0, 0.5)
    engine.load_weights(merged_named_weights(policy))
    assert torch.equal(greedy(engine).response_ids, greedy(reference).response_ids)
    with pytest.raises(KeyError, match="no parameter"):
        engine.load_weights([("value_head.weight", torch.zeros(1))])


def test_auto_engine_is_the_loop_on_cpu(tiny_dir, tokenizer):
    model = load_causal_lm(tiny_dir)
    assert isinstance(make_rollout("auto", model, 0, 2, "cpu"), HFRollout)
    assert isinstance(make_rollout("static", model, 0, 2, "cpu"), StaticRollout)
    assert make_rollout("generate", model, 0, 2, "cpu").use_generate


def test_grpo_with_the_static_engine_raises_the_rule_reward(tiny_dir, tmp_path):
    """Rewards are measured on the engine's samples: they rise only if the engine follows the policy."""
    from rlhf.recipes import grpo

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about item {i}."}) + "\n" for i in range(32)))
    grpo.run(grpo.Config(model=tiny_dir, data=str(prompts), reward_fn="rule_rewards:vowel_fraction",
                         output_dir=str(tmp_path / "g"), max_steps=25, rollout_batch_size=8, num_generations=4,
                         mini_batch_size=16, batch_size=16, max_new_tokens=16, lr=3e-3, beta=0.01, ppo_epochs=2,
                         report_to="none", seed=0, rollout_engine="static"))
    rows = [json.loads(x) for x in open(tmp_path / "g" / "metrics.jsonl") if '"reward"' in x]
    first, last = sum(r["reward"] for r in rows[:3]) / 3, sum(r["reward"] for r in rows[-3:]) / 3
    assert last > first + 0.1, (first, last)


def test_engine_copy_drops_a_wrapped_forward(tiny_dir, tokenizer):
    """accelerate's bf16 autocast wrapper sits on the prepared model's instance: the copy runs the class forward."""
    import types

    model = load_causal_lm(tiny_dir)
    plain = greedy(StaticRollout(model, tokenizer.pad_token_id, tokenizer.eos_token_id)).response_ids
    model._original_forward = model.forward
    model.forward = types.MethodType(lambda self, *a, **k: 1 / 0, model)
    assert torch.equal(greedy(StaticRollout(model, tokenizer.pad_token_id, tokenizer.eos_token_id)).response_ids, plain)


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_ppo_with_the_static_engine_first_ratio_is_one(tiny_dir, tmp_path, critic):
    """The losses score the engine's samples with the training forward, so the first ratio is 1 whatever the engine."""
    from rlhf.recipes import ppo

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about item {i}."}) + "\n" for i in range(16)))
    cfg = ppo.Config(model=tiny_dir, data=str(prompts), reward_fn="rule_rewards:vowel_fraction", critic=critic,
                     output_dir=str(tmp_path / "p"), max_steps=2, rollout_batch_size=8, mini_batch_size=8, batch_size=4,
                     ppo_epochs=1, max_new_tokens=8, report_to="none", seed=0, rollout_engine="static")
    ppo.run(cfg)
    rows = [json.loads(x) for x in open(tmp_path / "p" / "metrics.jsonl") if "policy/ratio_mean" in x]
    assert len(rows) == 2 and abs(rows[0]["policy/ratio_mean"] - 1) < 1e-5, rows[0]


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_static_engine_refuses_windows_and_soft_capping(arch, tokenizer):
    """Its decode step attends to the whole cache with its own attention function: a sliding
    window (Mistral) or soft-capped scores (Gemma 2) would be lost, so it is refused, not used."""
    from rlhf.models import tiny_causal_lm
    from rlhf.rollout import HFRollout, make_rollout

    model = tiny_causal_lm(tokenizer, arch, sliding_window=4)
    with pytest.raises(ValueError, match="cannot sample this model exactly"):
        make_rollout("static", model, tokenizer.pad_token_id, tokenizer.eos_token_id, "cpu")
    assert isinstance(make_rollout("auto", model, tokenizer.pad_token_id, tokenizer.eos_token_id, "cpu"), HFRollout)
