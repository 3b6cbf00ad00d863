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
