"""Issue 13, "Smaller defects": one recipe-level test per defect, on tiny models (no hub)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from rlhf.recipes import grpo, ppo


@pytest.fixture
def prompts_file(tmp_path):
    rows = [{"prompt": f"Say something about item {i}."} for i in range(16)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rl_kwargs(tiny_dir, prompts_file, tmp_path, **over):
    kw = dict(model=tiny_dir, data=prompts_file, reward_fn="rule_rewards:vowel_fraction", output_dir=str(tmp_path / "o"),
              max_steps=1, rollout_batch_size=8, mini_batch_size=8, batch_size=8, max_new_tokens=8, lr=1e-2,
              report_to="none", seed=0)
    kw.update(over)
    return kw


def moved(before_dir, after_dir) -> float:
    """Largest absolute change of any weight between two saved models."""
    a, b = load_file(f"{before_dir}/model.safetensors"), load_file(f"{after_dir}/model.safetensors")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ---- 1. --max-grad-norm 0 means no clipping ---------------------------------------------------

@pytest.mark.parametrize("recipe", ["ppo", "grpo"])
def test_max_grad_norm_0_is_no_clipping_and_the_weights_move(recipe, tiny_dir, prompts_file, tmp_path):
    """0 used to clip every gradient to norm 0: one step left every weight where it was."""
    if recipe == "ppo":
        ppo.run(ppo.Config(**rl_kwargs(tiny_dir, prompts_file, tmp_path, max_grad_norm=0)))
    else:
        grpo.run(grpo.Config(**rl_kwargs(tiny_dir, prompts_file, tmp_path, max_grad_norm=0, num_generations=4,
                                         rollout_batch_size=4, mini_batch_size=16, batch_size=16)))
    assert moved(tiny_dir, tmp_path / "o") > 1e-3


@pytest.mark.parametrize("recipe", ["sft", "ppo", "grpo", "dpo"])
def test_negative_max_grad_norm_is_one_clear_error(recipe, tiny_dir, tmp_path, capsys):
    from rlhf.cli import main

    code = main([recipe, "--model", tiny_dir, "--data", "x.jsonl", "--max-grad-norm", "-1",
                 "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "--max-grad-norm" in err[0], err


# ---- 2. DPO turns dropout off in the policy ---------------------------------------------------

def pref_file(tmp_path, n=8, name="pref.jsonl"):
    rows = [{"prompt": f"Please help with my order {i}.", "chosen": " Of course, here is the fix for you.",
             "rejected": " Not my problem."} for i in range(n)]
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def dpo_kwargs(model_dir, tmp_path, **over):
    kw = dict(model=model_dir, data=pref_file(tmp_path), output_dir=str(tmp_path / "dpo"), batch_size=8, lr=1e-3,
              max_steps=1, beta=0.1, max_length=48, report_to="none", seed=0)
    kw.update(over)
    return kw


@pytest.fixture
def gpt2_dropout_dir(tmp_path, tokenizer):
    """A tiny GPT-2 with GPT-2's dropout of 0.1 (embeddings, attention, residual)."""
    from rlhf.models import save_pretrained, tiny_causal_lm

    model = tiny_causal_lm(tokenizer, "gpt2", hidden_size=32, num_layers=2)
    assert model.config.resid_pdrop == model.config.attn_pdrop == model.config.embd_pdrop == 0.1
    save_pretrained(model, tokenizer, str(tmp_path / "gpt2"))
    return str(tmp_path / "gpt2")


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_dpo_first_step_loss_is_exact_with_a_dropout_model(loss_type, gpt2_dropout_dir, tmp_path):
    """Policy == reference at step 1, so h = 0: sigmoid gives ln 2 and hinge 1, unless dropout
    perturbs the policy (it used to: 0.69 but not ln 2 to 1e-6)."""
    from rlhf.recipes import dpo

    dpo.run(dpo.Config(**dpo_kwargs(gpt2_dropout_dir, tmp_path, loss_type=loss_type)))
    row = [json.loads(x) for x in open(tmp_path / "dpo" / "metrics.jsonl") if "train/loss" in x][0]
    assert row["train/loss"] == pytest.approx(math.log(2) if loss_type == "sigmoid" else 1.0, abs=1e-6)
    assert row["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


# ---- 3. IPO on per-token mean log-probs -------------------------------------------------------

@pytest.mark.parametrize("share_prompt", [True, False])
def test_ipo_is_fed_per_token_mean_logprobs(share_prompt, tiny_dir, tmp_path, monkeypatch):
    """What reaches the IPO loss is, per reply, the mean log-prob of its tokens (policy and
    reference), computed here the naive way: one reply at a time, its log-probs averaged."""
    from rlhf.algos import logprobs_from_logits
    from rlhf.data import Encoder, prepare
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.recipes import dpo

    rows = [{"prompt": f"Please help with order {i}.", "chosen": " Of course" + ", here is the fix" * (i % 4),
             "rejected": " No" + " way" * i} for i in range(8)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fed = []
    real_loss = dpo.dpo_loss

    def spy(chosen, rejected, ref_c, ref_r, *args, **kw):
        n_c, n_r = kw.get("chosen_lengths", 1.0), kw.get("rejected_lengths", 1.0)  # no lengths: summed log-probs
        fed.append([t.detach().float() for t in (chosen / n_c, rejected / n_r, ref_c / n_c, ref_r / n_r)])
        return real_loss(chosen, rejected, ref_c, ref_r, *args, **kw)

    monkeypatch.setattr(dpo, "dpo_loss", spy)
    dpo.run(dpo.Config(**dpo_kwargs(tiny_dir, tmp_path, data=str(data), loss_type="ipo", share_prompt=share_prompt)))

    model, tok = load_causal_lm(tiny_dir).eval(), load_tokenizer(tiny_dir)
    naive = {"chosen_ids": [], "rejected_ids": []}
    with torch.no_grad():
        for e in prepare(str(data), "preference", Encoder(tok, 48)).examples:
            for key in naive:
                ids = torch.tensor([e["prompt_ids"] + e[key]])
                lp = logprobs_from_logits(model(ids).logits[:, :-1], ids[:, 1:])[0, len(e["prompt_ids"]) - 1:]
                naive[key].append(float(lp.mean()))
    chosen, rejected, ref_c, ref_r = fed[0]
    for got, want in ((chosen, naive["chosen_ids"]), (ref_c, naive["chosen_ids"]), (rejected, naive["rejected_ids"]),
                      (ref_r, naive["rejected_ids"])):
        assert sorted(got.tolist()) == pytest.approx(sorted(want), abs=1e-4)


# ---- 4. top-k / top-p in PPO and GRPO: refused unless asked, and then a warning ----------------

@pytest.mark.parametrize("recipe,flags", [("ppo", ["--top-k", "5"]), ("grpo", ["--top-p", "0.9"]),
                                          ("grpo", ["--top-k", "5", "--top-p", "0.9"])])
def test_truncated_sampling_in_rl_is_refused_unless_asked(recipe, flags, tiny_dir, prompts_file, tmp_path, capsys):
    from rlhf.cli import main

    code = main([recipe, "--model", tiny_dir, "--data", prompts_file, "--reward-fn", "rule_rewards:vowel_fraction",
                 "--output-dir", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "--allow-truncated-sampling" in err[0] and "full softmax" in err[0] and flags[0] in err[0], err[0]


@pytest.mark.parametrize("recipe", ["ppo", "grpo"])
def test_truncated_sampling_when_asked_runs_with_one_warning(recipe, tiny_dir, prompts_file, tmp_path):
    from rlhf.errors import UserError

    module = ppo if recipe == "ppo" else grpo
    kw = rl_kwargs(tiny_dir, prompts_file, tmp_path, top_k=5)
    if recipe == "grpo":
        kw.update(num_generations=2, rollout_batch_size=4, mini_batch_size=8)
    with pytest.raises(UserError, match="--allow-truncated-sampling"):  # the Python API refuses it too
        module.run(module.Config(**kw))
    module.run(module.Config(**kw, allow_truncated_sampling=True))
    events = [json.loads(x)["event"] for x in open(tmp_path / "o" / "metrics.jsonl") if '"event"' in x]
    warnings = [e for e in events if "truncated" in e]
    assert len(warnings) == 1 and "off-policy" in warnings[0] and "\n" not in warnings[0], events


# ---- 5. GRPO needs a group: --num-generations 1 is one clear error -----------------------------

@pytest.mark.parametrize("estimator", ["grpo", "rloo"])  # REINFORCE++'s baseline is the batch: G 1 is fine
def test_one_generation_per_prompt_is_one_clear_error(estimator, tiny_dir, prompts_file, tmp_path, capsys):
    """G = 1 gave NaN advantages (grpo: the std of one score), every step skipped, exit 0."""
    from rlhf.cli import main

    code = main(["grpo", "--model", tiny_dir, "--data", prompts_file, "--reward-fn", "rule_rewards:vowel_fraction",
                 "--estimator", estimator, "--num-generations", "1", "--max-steps", "1", "--max-new-tokens", "4",
                 "--output-dir", str(tmp_path / "o"), "--report-to", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "--num-generations" in err[0] and "at least 2" in err[0], err


# ---- 6. DPO's reference-log-prob cache follows the reference's weights ----------------------

def test_reference_cache_is_not_reused_after_the_reference_is_retrained_in_place(tokenizer, tmp_path, monkeypatch):
    """Retrain the SFT model into the same directory: the cached log-probs (keyed on the path
    before) must be recomputed under the new weights; an unchanged rerun still reuses them."""
    from rlhf.data import Encoder, collate_preference, prepare
    from rlhf.models import load_causal_lm, save_pretrained, tiny_causal_lm
    from rlhf.recipes import dpo

    sft_dir = str(tmp_path / "sft")
    save_pretrained(tiny_causal_lm(tokenizer, "llama", seed=0, hidden_size=32), tokenizer, sft_dir)
    cfg = dpo.Config(**dpo_kwargs(sft_dir, tmp_path))
    dpo.run(cfg)
    cache = tmp_path / "dpo" / "ref_logps.safetensors"
    first = load_file(cache)["logps"]

    save_pretrained(tiny_causal_lm(tokenizer, "llama", seed=1, hidden_size=32), tokenizer, sft_dir)  # "retrained"
    cfg = dpo.Config(**dpo_kwargs(sft_dir, tmp_path), overwrite_output_dir=True)  # the cache file stays: its key decides
    dpo.run(cfg)
    second = load_file(cache)["logps"]
    examples = prepare(cfg.data, "preference", Encoder(tokenizer, cfg.max_length)).examples
    with torch.no_grad():
        chosen, rejected = dpo.pair_logps(load_causal_lm(sft_dir).eval(), collate_preference(examples, tokenizer.pad_token_id))
    expected = torch.stack([chosen, rejected], dim=1)
    assert (first - expected).abs().max() > 0.1  # the two references really differ
    torch.testing.assert_close(second, expected, atol=1e-4, rtol=1e-4)

    computed = []
    real = dpo.all_pair_logps
    monkeypatch.setattr(dpo, "all_pair_logps", lambda *a, **k: computed.append(1) or real(*a, **k))
    dpo.run(cfg)  # nothing changed: the cache serves
    assert computed == [] and torch.equal(load_file(cache)["logps"], second)
