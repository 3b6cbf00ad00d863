"""Tier 3: DPO (sigmoid, IPO, hinge) and GRPO/RLOO recipes on tiny models."""

import json
import os
import random

import pytest
import torch

from rlhf.recipes import dpo

GOOD = ["Thank you, I am happy to help you with that.", "Of course, here is the fix for you.",
        "Sorry for the trouble, I will help right away."]
BAD = ["Go away.", "Not my problem.", "Whatever, figure it out."]


def pref_file(tmp_path, n=32, seed=0):
    rng = random.Random(seed)
    rows = [{"prompt": f"Please help with my order {rng.randint(1, 99)}.", "chosen": " " + rng.choice(GOOD),
             "rejected": " " + rng.choice(BAD)} for _ in range(n)]
    path = tmp_path / f"pref{seed}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def dpo_config(tiny_dir, tmp_path, **over):
    kw = dict(model=tiny_dir, data=pref_file(tmp_path), eval_data=pref_file(tmp_path, 16, 1),
              output_dir=str(tmp_path / "dpo"), batch_size=8, lr=1e-3, max_steps=20, beta=0.1, max_length=48,
              report_to="none", seed=0)
    kw.update(over)
    return dpo.Config(**kw)


def train_accuracy(cfg):
    """Implicit-reward accuracy on the training pairs, measured after training."""
    from rlhf.data import Encoder, collate_preference, prepare
    from rlhf.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(cfg.model)
    pairs = prepare(cfg.data, "preference", Encoder(tok, cfg.max_length)).examples
    batch = collate_preference(pairs, tok.pad_token_id)
    with torch.no_grad():
        pc, pr = dpo.pair_logps(load_causal_lm(cfg.output_dir).eval(), batch)
        rc, rr = dpo.pair_logps(load_causal_lm(cfg.model).eval(), batch)
    return float(((pc - rc) > (pr - rr)).float().mean())


def test_dpo_reaches_high_training_accuracy_and_margin_grows(tiny_dir, tmp_path):
    cfg = dpo_config(tiny_dir, tmp_path)
    m = dpo.run(cfg)
    assert train_accuracy(cfg) > 0.9
    rows = [json.loads(x) for x in open(tmp_path / "dpo" / "metrics.jsonl") if "train/loss" in x]
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"] + 0.5
    assert m["eval/rewards/accuracies"] > 0.9
    assert os.path.exists(tmp_path / "dpo" / "ref_logps.safetensors")
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert key in rows[-1]


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_ipo_and_hinge_train(loss_type, tiny_dir, tmp_path):
    cfg = dpo_config(tiny_dir, tmp_path, loss_type=loss_type, precompute_ref=False)
    dpo.run(cfg)
    assert train_accuracy(cfg) > 0.9


def test_dpo_with_lora_reference_is_the_base(tiny_dir, tmp_path):
    cfg = dpo_config(tiny_dir, tmp_path, lora=True, lora_r=8, lr=1e-2, max_steps=20)
    m = dpo.run(cfg)
    rows = [json.loads(x) for x in open(tmp_path / "dpo" / "metrics.jsonl") if "train/loss" in x]
    assert abs(rows[0]["rewards/margins"]) < 1e-6  # before any update the policy is its own base
    assert m["eval/rewards/accuracies"] > 0.8


from rlhf.recipes import grpo  # noqa: E402


@pytest.fixture
def prompts_file(tmp_path):
    rows = [{"prompt": f"Say something about item {i}.", "answer": "e"} for i in range(32)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def grpo_config(tiny_dir, prompts_file, tmp_path, **over):
    kw = dict(model=tiny_dir, data=prompts_file, reward_fn="rule_rewards:vowel_fraction", output_dir=str(tmp_path / "g"),
              max_steps=25, rollout_batch_size=8, num_generations=4, mini_batch_size=32, batch_size=16,
              max_new_tokens=16, lr=3e-3, beta=0.01, report_to="none", seed=0)
    kw.update(over)
    return grpo.Config(**kw)


@pytest.mark.parametrize("estimator, loss_type, over", [
    ("grpo", "dapo", {}), ("rloo", "grpo", {}), ("grpo", "dr_grpo", {"scale_rewards": "none", "lr": 2e-2}),
    ("reinforce_pp", "cispo", {"clip_eps_high": 5.0}),
])
def test_grpo_family_raises_rule_reward(estimator, loss_type, over, tiny_dir, prompts_file, tmp_path):
    grpo.run(grpo_config(tiny_dir, prompts_file, tmp_path, estimator=estimator, loss_type=loss_type, ppo_epochs=2,
                         mini_batch_size=16, **over))
    rows = [json.loads(x) for x in open(tmp_path / "g" / "metrics.jsonl") if '"reward"' in x]
    first, last = sum(r["reward"] for r in rows[:3]) / 3, sum(r["reward"] for r in rows[-3:]) / 3
    # Stated margin: 25 steps (2 epochs x 2 minibatches each, sampling the full softmax) raise the mean
    # vowel fraction by at least 0.1.
    assert last > first + 0.1, (estimator, first, last)
    kl_and_clip = ("cispo_clip_ratio",) if loss_type == "cispo" else ("kl", "clip_ratio", "clip_ratio/high_mean")
    for key in ("reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
                "completions/min_length", "completions/max_length", "loss", "learning_rate", "epoch",  # TRL's (issue 22)
                "entropy", "grad_norm", "rewards/rule_rewards:vowel_fraction", *kl_and_clip):
        assert key in rows[-1], key  # REINFORCE++ has its KL in the reward, not the loss


def test_grpo_kl_in_reward_and_several_weighted_rewards(tiny_dir, prompts_file, tmp_path):
    m = grpo.run(grpo_config(tiny_dir, prompts_file, tmp_path, max_steps=3, kl_in_reward=True, ppo_epochs=2,
                             mini_batch_size=16, reward_fn="rule_rewards:vowel_fraction:1.0,rule_rewards:has_answer:0.5"))
    assert "rewards/rule_rewards:has_answer" in m and "kl" not in m
    assert_timers_add_up(m, "time/old_logprob_pass", "time/reference_pass", "time/generate", "time/train")


def assert_timers_add_up(m: dict, *needed: str) -> None:
    """Every second of a step is under a named timer: the laps add up to time/step."""
    laps = {k: v for k, v in m.items() if k.startswith("time/") and k != "time/step"}
    assert set(needed) <= set(laps), laps
    assert sum(laps.values()) == pytest.approx(m["time/step"], rel=1e-9, abs=1e-9) and m["time/step"] > 0


def test_shared_prompt_packing_gives_the_concatenated_logps(tiny_dir, tokenizer):
    from rlhf.data import collate_preference, collate_preference_shared
    from rlhf.models import load_causal_lm

    model = load_causal_lm(tiny_dir).eval()
    rng = random.Random(0)
    pairs = [{"prompt_ids": [rng.randint(3, 250) for _ in range(rng.randint(1, 6))],
              "chosen_ids": [rng.randint(3, 250) for _ in range(rng.randint(1, 7))],
              "rejected_ids": [rng.randint(3, 250) for _ in range(rng.randint(1, 7))]} for _ in range(6)]
    with torch.no_grad():
        c1, r1 = dpo.pair_logps(model, collate_preference(pairs, tokenizer.pad_token_id))
        shared = collate_preference_shared(pairs, tokenizer.pad_token_id, row_tokens=24)  # forces several rows
        assert shared["input_ids"].shape[0] > 1
        c2, r2 = dpo.pair_logps(model, shared)
    torch.testing.assert_close(c2, c1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(r2, r1, atol=1e-4, rtol=1e-4)


def test_pack_shared_prefixes_layout_by_hand(tiny_dir):
    from rlhf.data import pack_shared_prefixes
    from rlhf.models import load_causal_lm, shared_prefix_mask

    b = pack_shared_prefixes([([1, 2], [[3], [4, 5]])], pad_id=0, row_tokens=6)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 2, 3]]  # both replies continue the prefix's positions
    assert b["segment_ids"].tolist() == [[0, 0, 0, 0, 0]] and b["branch_ids"].tolist() == [[0, 0, 1, 2, 2]]
    # transformers' create_causal_mask, given the layout, writes the SDPA mask:
    model = load_causal_lm(tiny_dir)
    mask = shared_prefix_mask(model, b["position_ids"], b["segment_ids"], b["branch_ids"])
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0],
                                         [1, 1, 0, 0, 0],
                                         [1, 1, 1, 0, 0],   # reply 1 sees the prefix and itself
                                         [1, 1, 0, 1, 0],   # reply 2 does not see reply 1
                                         [1, 1, 0, 1, 1]]
    assert b["src"].tolist() == [1, 1, 3]  # the prefix's last token predicts both replies' first tokens
    assert b["tgt"].tolist() == [2, 3, 4]
    assert b["owner"].tolist() == [0, 1, 1] and b["col"].tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="empty prefix"):
        pack_shared_prefixes([([], [[3]])], pad_id=0)
    # two groups in one row, then row padding: another group and the padding are never seen
    b = pack_shared_prefixes([([1], [[2]]), ([3], [[4], [5]])], pad_id=0, row_tokens=6)
    assert b["input_ids"].tolist() == [[3, 4, 5, 1, 2]]
    assert b["segment_ids"].tolist() == [[0, 0, 0, 1, 1]] and b["position_ids"].tolist() == [[0, 1, 1, 0, 1]]
    mask = shared_prefix_mask(model, b["position_ids"], b["segment_ids"], b["branch_ids"])
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0, 0, 0, 1, 0],
                                         [0, 0, 0, 1, 1]]
    plain = pack_shared_prefixes([([1], [[2]]), ([3], [[4]])], pad_id=0, row_tokens=6)  # two plain sequences
    assert plain["position_ids"].tolist() == [[0, 1, 0, 1]] and plain["segment_ids"].tolist() == [[0, 0, 1, 1]]


@pytest.mark.parametrize("max_row_tokens", [1024, 12])  # 12: some groups are cut into rows that repeat the prompt
def test_packed_response_logprobs_match_the_padded_batch(tiny_dir, max_row_tokens):
    """G samples per prompt, left-padded prompts, EOS-shortened replies: same log-probs,
    entropies and gradients as the padded forward, on the response mask."""
    from rlhf.data import pad
    from rlhf.models import Reference, load_causal_lm
    from rlhf.recipes.logprobs import model_response_logprobs, packed_response_logprobs

    model = load_causal_lm(tiny_dir)
    rng = random.Random(0)
    prompts = [[rng.randint(3, 250) for _ in range(rng.randint(1, 6))] for _ in range(3)]
    replies = [[rng.randint(3, 250) for _ in range(rng.randint(1, 7))] for _ in range(3 * 2)]
    prompt_ids = pad([p for p in prompts for _ in range(2)], 0, side="left")
    prompt_mask = pad([[1] * len(p) for p in prompts for _ in range(2)], 0, side="left")
    ids = torch.cat([prompt_ids, pad(replies, 0)], 1)
    mask = torch.cat([prompt_mask, pad([[1] * len(r) for r in replies], 0)], 1)
    P, on = prompt_ids.shape[1], pad([[1] * len(r) for r in replies], 0).bool()
    results = []
    for fn in (model_response_logprobs, lambda *a, **k: packed_response_logprobs(*a, max_row_tokens=max_row_tokens, **k)):
        model.zero_grad()
        lp, ent = fn(model, ids, mask, P, 0.7, with_entropy=True)
        (lp[on].sum() + ent[on].sum()).backward()
        results.append((lp.detach(), ent.detach(), model.model.embed_tokens.weight.grad.clone()))
    (lp1, e1, g1), (lp2, e2, g2) = results
    torch.testing.assert_close(lp2[on], lp1[on], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e2[on], e1[on], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g2, g1, atol=1e-5, rtol=1e-4)
    assert (lp2[~on] == 0).all()
    ref = Reference(model)
    torch.testing.assert_close(packed_response_logprobs(ref, ids, mask, P)[0][on], model_response_logprobs(ref, ids, mask, P)[0][on],
                               atol=1e-5, rtol=1e-5)
