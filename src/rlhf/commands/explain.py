"""``rlhf explain``: the seeds' Part 5 walkthrough (seed 002) on one real rollout.

For each sampled token it prints the old and reference log-probabilities, the KL term, the
per-token reward R_t, the value V(s_t), the TD error delta_t, the GAE advantage A_t and the
value target, then takes one PPO step on this rollout and shows each token's new ratio and
whether it was clipped. The arithmetic is spelled out here step by step, as in the seed;
a test checks it against :func:`rlhf.algos.gae`.
"""

from __future__ import annotations

import argparse
import csv
import io
import os

import torch

from rlhf.algos import kl_estimate, ppo_loss, ppo_policy_loss, value_loss
from rlhf.models import (
    ModelLoadError, PolicyWithValueHead, Reference, disable_dropout, freeze, load_causal_lm, load_reward_models,
    load_tokenizer,
)
from rlhf.models.heads import VALUE_HEAD_FILE
from rlhf.errors import UserError
from rlhf.recipes.logprobs import model_response_logprobs
from rlhf.recipes.logprobs import policy_forward
from rlhf.recipes.rewards import in_prompt_form, load_reward_fns
from rlhf.recipes.scoring import Scorer
from rlhf.rollout import HFRollout, SamplingParams

COLUMNS = ["t", "token", "logp_old", "logp_ref", "kl", "R_t", "V(s_t)", "delta_t", "A_t", "V_target",
           "ratio_new", "clipped"]


def td_and_gae(rewards: list[float], values: list[float], gamma: float, lam: float):
    """delta_t = R_t + gamma V(s_{t+1}) - V(s_t) with V after the last token = 0, then
    A_t = delta_t + gamma lam A_{t+1}, backwards: seed 002 Part 5, Step 3, by hand."""
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    advantages = [0.0] * n
    running = 0.0
    for t in reversed(range(n)):
        running = deltas[t] + gamma * lam * running
        advantages[t] = running
    return deltas, advantages


def explain_rollout(model: PolicyWithValueHead, ref: Reference, scorer: Scorer, tokenizer, prompt_ids: list[int],
                    prompt, *, kl_coef=0.02, gamma=0.99, lam=0.95, clip_eps=0.2, vf_coef=0.5, ent_coef=0.01,
                    lr=1e-4, max_new_tokens=32, temperature=1.0) -> tuple[list[dict], dict]:
    """Sample one response and build the Part 5 table for it. Returns (rows, summary)."""
    rollout = HFRollout(model.policy, tokenizer.pad_token_id, tokenizer.eos_token_id)
    batch = rollout.generate([prompt_ids], SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens))
    P, n = batch.prompt_ids.shape[1], int(batch.response_mask.sum())
    ids, mask = batch.input_ids[:, : P + n], batch.attention_mask[:, : P + n]
    response_mask = batch.response_mask[:, :n]
    # Step 2: record old log-probs, values and reference log-probs.
    model.eval()
    with torch.no_grad():
        old_lp, values, _ = policy_forward(model, None, ids, mask, P, temperature)
        ref_lp, _ = model_response_logprobs(ref, ids, mask, P, temperature)
    completion = tokenizer.decode(ids[0, P:], skip_special_tokens=True)
    score = float(scorer(batch, [prompt], [in_prompt_form(prompt, completion)], {})[0][0])
    # Step 3: R_t = r_t - beta (log pi_old - log pi_ref), r only at the last token.
    kl = kl_estimate(old_lp, ref_lp)[0].tolist()
    rewards = [-kl_coef * k for k in kl]
    rewards[-1] += score
    v = values[0].tolist()
    deltas, advantages = td_and_gae(rewards, v, gamma, lam)
    targets = [a + val for a, val in zip(advantages, v)]
    # Part C: one PPO step on this rollout, then the new ratio of every token.
    adv_t, ret_t = torch.tensor([advantages]), torch.tensor([targets])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    logprobs, new_values, entropy = policy_forward(model, None, ids, mask, P, temperature, with_entropy=True)
    pg, _ = ppo_policy_loss(logprobs, old_lp, adv_t, response_mask, clip_eps=clip_eps)
    vf, _ = value_loss(new_values, values, ret_t, response_mask)
    loss = ppo_loss(pg, vf, (entropy * response_mask).sum() / n, vf_coef, ent_coef)
    loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        new_lp, _, _ = policy_forward(model, None, ids, mask, P, temperature)
    ratios = torch.exp(new_lp - old_lp)[0].tolist()
    tokens = tokenizer.convert_ids_to_tokens(ids[0, P:].tolist())
    rows = [{"t": t, "token": tokenizer.convert_tokens_to_string([tok]), "logp_old": old_lp[0, t].item(),
             "logp_ref": ref_lp[0, t].item(), "kl": kl[t], "R_t": rewards[t], "V(s_t)": v[t], "delta_t": deltas[t],
             "A_t": advantages[t], "V_target": targets[t], "ratio_new": ratios[t],
             "clipped": (ratios[t] > 1 + clip_eps and advantages[t] > 0) or (ratios[t] < 1 - clip_eps and advantages[t] < 0)}
            for t, tok in enumerate(tokens)]
    summary = {"completion": completion, "score": score, "kl_coef": kl_coef, "gamma": gamma, "lam": lam,
               "clip_eps": clip_eps, "loss": float(loss.detach())}
    return rows, summary


def render(rows: list[dict], summary: dict, fmt: str) -> str:
    def cell(value):
        return f"{value:.4f}" if isinstance(value, float) else ("yes" if value is True else "no" if value is False else str(value))

    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: cell(r[k]) for k in COLUMNS})
        return buf.getvalue()
    head = (f"Response: {summary['completion']!r}\n\nScore r = {summary['score']:.4f} at the last token; "
            f"beta = {summary['kl_coef']}, gamma = {summary['gamma']}, lambda = {summary['lam']}, "
            f"epsilon = {summary['clip_eps']}.\n\n")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(cell(r[k]).replace("|", "\\|").replace("\n", "\\n") for k in COLUMNS) + " |")
    return head + "\n".join(lines) + f"\n\nOne PPO step on this rollout: loss {summary['loss']:.4f}.\n"


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--model", required=True, help="Policy directory (a PPO output uses its value head).")
    p.add_argument("--prompt", required=True, help="The user's message.")
    p.add_argument("--ref-model", help="Reference policy (default: --model itself, so KL starts at 0).")
    p.add_argument("--reward-model", help="Reward model directory.")
    p.add_argument("--reward-fn", help="module:function reward, as in rlhf ppo.")
    p.add_argument("--kl-coef", type=float, default=0.02, help="beta (seed: 0.02).")
    p.add_argument("--gamma", type=float, default=0.99, help="Discount (seed: 0.99).")
    p.add_argument("--lam", type=float, default=0.95, help="GAE lambda (seed: 0.95).")
    p.add_argument("--clip-eps", type=float, default=0.2, help="PPO clip (seed: 0.2).")
    p.add_argument("--lr", type=float, default=1e-4, help="Learning rate of the one PPO step.")
    p.add_argument("--max-new-tokens", type=int, default=32, help="Longest response.")
    p.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature.")
    p.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    p.add_argument("--raw", action="store_true", help="Use the prompt as raw text, without the chat template.")
    p.add_argument("--format", choices=["markdown", "csv"], default="markdown", help="Output format.")


def main(args, name: str = "explain") -> int:
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model)
    model = PolicyWithValueHead(disable_dropout(load_causal_lm(args.model)))
    if os.path.exists(os.path.join(args.model, VALUE_HEAD_FILE)):
        model.load_value_head(args.model)
    ref = Reference(freeze(load_causal_lm(args.ref_model or args.model)), share_lora_base=False)
    reward_model = None
    if args.reward_model:
        try:
            reward_model = [freeze(m) for m in load_reward_models(args.reward_model)]  # all members of an ensemble
        except ModelLoadError as e:
            raise UserError(f"--reward-model {e}") from None
    if reward_model is None and not args.reward_fn:
        raise UserError("give a reward: --reward-model DIR or --reward-fn module:function")
    scorer = Scorer(reward_model, load_reward_fns(args.reward_fn))
    from rlhf.data import Encoder

    prompt = args.prompt if args.raw or not tokenizer.chat_template else [{"role": "user", "content": args.prompt}]
    rows, summary = explain_rollout(model, ref, scorer, tokenizer, Encoder(tokenizer, 4096).prompt_ids(prompt), prompt,
                                    kl_coef=args.kl_coef, gamma=args.gamma, lam=args.lam, clip_eps=args.clip_eps,
                                    lr=args.lr, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    print(render(rows, summary, args.format), end="")
    return 0
