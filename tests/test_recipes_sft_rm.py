"""Tier 3: SFT and reward-model recipes for a few steps on CPU, asserting that learning happened,
plus resume, atomic checkpoints, NaN skipping and config precedence."""

import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf.training.options import ConfigError, build_config
from rlhf.recipes import reward, sft
from rlhf.errors import UserError
from rlhf.training.checkpoints import Checkpointer

COLORS = ["red", "blue", "green", "yellow", "black", "white", "pink", "gray"]
THINGS = ["car", "cup", "hat", "door", "box", "pen", "bag", "lamp", "shoe", "ball"]


def sft_rows(seed, n):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        thing, color = rng.choice(THINGS), rng.choice(COLORS)
        rows.append({"prompt": f"Paint the {thing} {color}.", "completion": f" The {thing} is now {color}."})
    return rows


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sft_config(tmp_path, tiny_dir, **over):
    cfg = dict(model=tiny_dir, data=write(tmp_path / "train.jsonl", sft_rows(0, 64)),
               eval_data=write(tmp_path / "eval.jsonl", sft_rows(1, 16)), output_dir=str(tmp_path / "out"),
               batch_size=8, lr=1e-2, max_steps=40, max_length=48, report_to="none", seed=0)
    cfg.update(over)
    return sft.Config(**cfg)


def test_sft_lowers_held_out_loss(tmp_path, tiny_dir):
    cfg = sft_config(tmp_path, tiny_dir, max_steps=1, lr=1e-9)
    before = sft.run(cfg)["eval/loss"]
    after_metrics = sft.run(sft_config(tmp_path, tiny_dir, output_dir=str(tmp_path / "out2")))
    # Stated margin: 40 steps at least halve the held-out loss.
    assert after_metrics["eval/loss"] < 0.5 * before, (before, after_metrics["eval/loss"])
    out = tmp_path / "out2"
    assert AutoModelForCausalLM.from_pretrained(str(out)) is not None
    for name in ("README.md", "metrics.jsonl", "tokenizer.json", "model.safetensors", "config.json"):
        assert (out / name).exists(), name
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "train/lr", "train/grad_norm"} <= set(lines[0])
    assert "eval/loss" in (out / "README.md").read_text()


def test_sft_packing_matches_padding_and_lora_trains(tmp_path, tiny_dir):
    padded = sft.run(sft_config(tmp_path, tiny_dir, max_steps=5, output_dir=str(tmp_path / "a")))
    packed = sft.run(sft_config(tmp_path, tiny_dir, max_steps=5, packing=True, output_dir=str(tmp_path / "b")))
    # Same examples, same order, no cross-example attention: the same training, to float precision.
    assert packed["eval/loss"] == pytest.approx(padded["eval/loss"], abs=1e-4)
    start = sft.run(sft_config(tmp_path, tiny_dir, max_steps=1, lr=1e-9, output_dir=str(tmp_path / "c")))["eval/loss"]
    lora = sft.run(sft_config(tmp_path, tiny_dir, lora=True, lora_r=8, max_steps=10, output_dir=str(tmp_path / "d")))
    assert lora["eval/loss"] < start - 0.25  # stated margin: 0.25 nats in 10 LoRA steps
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "d"))  # adapters merged on save
    assert not any("lora" in n for n, _ in merged.named_parameters())


@pytest.mark.parametrize("packing", [False, True])
def test_sft_loss_over_head_chunks_equals_whole_logits(tiny_dir, monkeypatch, packing):
    """Where a batch's logits exceed one chunk (a real vocabulary), SFT's loss runs the LM head over
    chunks of the labelled positions: loss, accuracy and gradients equal those of the whole logits."""
    import rlhf.algos.tokens as tokens
    from rlhf.data import collate_packed, collate_sft
    from rlhf.models import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(tiny_dir), load_causal_lm(tiny_dir)
    examples = []
    for r in sft_rows(3, 5):
        p, c = tok(r["prompt"])["input_ids"], tok(r["completion"])["input_ids"]
        examples.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
    batch = (collate_packed if packing else collate_sft)(examples, tok.pad_token_id)
    results = []
    for chunk in (1 << 30, 3 * model.config.vocab_size):  # whole logits, then chunks of 3 positions
        monkeypatch.setattr(tokens, "_CHUNK_ELEMENTS", chunk)
        model.zero_grad()
        loss, m = sft.loss_fn(model, batch)
        loss.backward()
        results.append((loss.detach(), m["train/token_accuracy"], [p.grad.clone() for p in model.parameters()]))
    (l1, a1, g1), (l2, a2, g2) = results
    torch.testing.assert_close(l2, l1, rtol=1e-6, atol=0)
    assert float(a2) == float(a1)
    a, b = torch.cat([g.flatten() for g in g2]), torch.cat([g.flatten() for g in g1])
    assert torch.linalg.vector_norm(a - b) <= 1e-6 * torch.linalg.vector_norm(b)


def _weights(d):
    return load_file(os.path.join(d, "model.safetensors"))


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, tiny_dir, monkeypatch):
    # Dropout on, so the restored RNG state matters as well as data position and optimizer.
    import rlhf.training.logs as common

    full = sft_config(tmp_path, tiny_dir, output_dir=str(tmp_path / "full"), max_steps=6, save_every=2,
                      grad_accum=2, batch_size=4, warmup_ratio=0.3)
    sft.run(full)

    killed = sft_config(tmp_path, tiny_dir, output_dir=str(tmp_path / "killed"), max_steps=6, save_every=2,
                        grad_accum=2, batch_size=4, warmup_ratio=0.3)
    real_log = common.RunLogger.log

    def die_at_step_5(self, step, metrics):
        if step == 5:
            raise KeyboardInterrupt  # killed after step 5's update, before its checkpoint
        return real_log(self, step, metrics)

    monkeypatch.setattr(common.RunLogger, "log", die_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        sft.run(killed)
    monkeypatch.setattr(common.RunLogger, "log", real_log)
    assert sorted(os.listdir(tmp_path / "killed" / "checkpoints")) == ["step-00000002", "step-00000004"]
    killed.resume = "auto"
    sft.run(killed)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in x]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path, tiny_dir, monkeypatch):
    import rlhf.training.checkpoints as checkpoints

    cfg = sft_config(tmp_path, tiny_dir, max_steps=4, save_every=2)
    real = checkpoints._fsync_tree

    def crash_on_second_save(root):
        if ".tmp-step-00000004" in root:
            raise KeyboardInterrupt  # killed with the step-4 files half-written
        return real(root)

    monkeypatch.setattr(checkpoints, "_fsync_tree", crash_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        sft.run(cfg)
    ckpts = tmp_path / "out" / "checkpoints"
    assert sorted(os.listdir(ckpts)) == [".tmp-step-00000004", "step-00000002"]
    monkeypatch.setattr(checkpoints, "_fsync_tree", real)
    cfg.resume, cfg.max_steps = "auto", 4
    sft.run(cfg)  # resumes from step 2 and finishes
    assert sorted(os.listdir(ckpts))[-1] == "step-00000004"


def test_nan_steps_are_skipped_counted_and_stop_the_run(tmp_path, tiny_dir, monkeypatch):
    real = sft.sft_loss
    state = {"calls": 0}

    def nan_on_step_2(logits, labels, **kw):
        state["calls"] += 1
        loss, m = real(logits, labels, **kw)
        return (loss * float("nan"), m) if state["calls"] == 2 else (loss, m)

    monkeypatch.setattr(sft, "sft_loss", nan_on_step_2)
    cfg = sft_config(tmp_path, tiny_dir, max_steps=4, save_every=2, eval_data=None)
    metrics = sft.run(cfg)
    assert metrics["train/skipped_steps"] == 1
    events = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines() if "event" in x]
    assert events[0]["step"] == 2 and len(events[0]["examples"]) == 8 and ".jsonl:" in events[0]["examples"][0]
    # Step 2 was skipped, so no checkpoint was written right after it; step 4's was.
    assert [os.path.basename(p) for p in Checkpointer(None, str(tmp_path / "out"), 2).list()] == ["step-00000004"]
    for v in load_file(str(tmp_path / "out" / "model.safetensors")).values():
        assert torch.isfinite(v).all()

    monkeypatch.setattr(sft, "sft_loss", lambda logits, labels, **kw: (real(logits, labels, **kw)[0] * float("nan"),
                                                                      real(logits, labels, **kw)[1]))
    cfg = sft_config(tmp_path, tiny_dir, max_steps=10, max_consecutive_skips=3, output_dir=str(tmp_path / "o2"),
                     eval_data=None)
    with pytest.raises(UserError, match="3 consecutive steps with a non-finite loss"):
        sft.run(cfg)


def pref_rows(seed, n):
    rng = random.Random(seed)
    good = ["Thank you, I am happy to help you with that.", "Of course, here is the fix for you.",
            "Sorry for the trouble, I will help right away."]
    bad = ["Go away.", "Not my problem.", "Whatever, figure it out."]
    return [{"prompt": f"Please help with my {rng.choice(THINGS)}.", "chosen": " " + rng.choice(good),
             "rejected": " " + rng.choice(bad)} for _ in range(n)]


def test_reward_model_separates_held_out_pairs(tmp_path, tiny_dir):
    cfg = reward.Config(model=tiny_dir, data=write(tmp_path / "p.jsonl", pref_rows(0, 64)),
                        eval_data=write(tmp_path / "pe.jsonl", pref_rows(1, 32)), output_dir=str(tmp_path / "rm"),
                        batch_size=8, lr=2e-3, max_steps=25, max_length=48, report_to="none")
    m = reward.run(cfg)
    assert m["eval/accuracy"] > 0.9, m
    rm = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm"))
    assert rm.config.rlhf_score_mean == pytest.approx(m["train/reward_mean"])
    assert rm.config.rlhf_score_std == pytest.approx(m["train/reward_std"]) and m["train/reward_std"] > 0


def test_config_precedence_defaults_yaml_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model: from-yaml\nlr: 0.5\nbatch_size: 3\n")
    cfg = build_config(sft.Config, str(y), {"lr": "0.25"})
    assert (cfg.model, cfg.lr, cfg.batch_size, cfg.grad_accum) == ("from-yaml", 0.25, 3, 1)
    y.write_text("model: m\nbatch_sise: 3\n")
    with pytest.raises(ConfigError, match="unknown field 'batch_sise'"):
        build_config(sft.Config, str(y), {})
    with pytest.raises(ConfigError, match="--batch-size: expected an integer, got 'many'"):
        build_config(sft.Config, None, {"model": "m", "batch_size": "many"})
