"""`rlhf explain`: its table's arithmetic equals gae() and the seed's worked numbers."""

import subprocess
import sys

import pytest
import torch

from rlhf.algos import gae, kl_penalized_rewards
from rlhf.models import PolicyWithValueHead, Reference, load_causal_lm
from rlhf.commands.explain import explain_rollout, render, td_and_gae
from rlhf.recipes.rewards import load_reward_fns
from rlhf.recipes.scoring import Scorer


def test_hand_arithmetic_reproduces_seed_part5():
    # Seed 002 Part 5: the five R_t and V(S_t); delta_t as printed in the seed.
    deltas, adv = td_and_gae([-0.001, 0.0, -0.0004, -0.003, -12.0], [-1.0, -1.5, -2.0, -3.0, -4.0], 0.99, 0.95)
    assert deltas == pytest.approx([-0.486, -0.48, -0.9704, -0.963, -8.0])
    assert adv[3] == pytest.approx(-8.487)


def test_explain_table_matches_gae(tiny_dir, tokenizer):
    torch.manual_seed(0)
    model = PolicyWithValueHead(load_causal_lm(tiny_dir))
    ref = Reference(load_causal_lm(tiny_dir), share_lora_base=False)
    # A reference that differs from the policy, so the KL column is not all zero.
    with torch.no_grad():
        for p in ref.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    scorer = Scorer(None, load_reward_fns("rule_rewards:vowel_fraction"))
    rows, summary = explain_rollout(model, ref, scorer, tokenizer, [1, 5, 6, 7], "x", max_new_tokens=8)
    n = len(rows)
    lp_old = torch.tensor([[r["logp_old"] for r in rows]])
    lp_ref = torch.tensor([[r["logp_ref"] for r in rows]])
    values = torch.tensor([[r["V(s_t)"] for r in rows]])
    rewards, _ = kl_penalized_rewards(torch.tensor([summary["score"]]), lp_old, lp_ref, torch.ones(1, n), 0.02)
    adv, ret = gae(rewards, values, torch.ones(1, n), gamma=0.99, lam=0.95)
    assert [r["R_t"] for r in rows] == pytest.approx(rewards[0].tolist(), abs=1e-5)
    assert [r["A_t"] for r in rows] == pytest.approx(adv[0].tolist(), abs=1e-5)
    assert [r["V_target"] for r in rows] == pytest.approx(ret[0].tolist(), abs=1e-5)
    assert any(abs(r["kl"]) > 0 for r in rows)
    assert render(rows, summary, "markdown").count("\n| ") == n + 1
    assert render(rows, summary, "csv").splitlines()[0].startswith("t,token,logp_old,logp_ref,kl,R_t")


def test_explain_cli(tiny_dir):
    out = subprocess.run([sys.executable, "-m", "rlhf.cli", "explain", "--model", tiny_dir, "--prompt",
                          "My order is late again! This is unacceptable.", "--reward-fn", "rule_rewards:vowel_fraction",
                          "--max-new-tokens", "5", "--format", "csv"], capture_output=True, text=True, cwd="tests")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "t,token,logp_old,logp_ref,kl,R_t,V(s_t),delta_t,A_t,V_target,ratio_new,clipped"
