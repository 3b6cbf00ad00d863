"""Evaluate policies on the held-out complaints: gold reward, reward-model score, KL to SFT,
distinct-2 and the fraction of responses without EOS."""

from __future__ import annotations

import statistics

import torch

from rlhf.data import Encoder
from rlhf.demo.world import gold_score, parse_complaint
from rlhf.models import sequence_scores
from rlhf.recipes.logprobs import model_response_logprobs
from rlhf.rollout import HFRollout, SamplingParams


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Unique n-grams over all n-grams of the responses (Li et al. 2016): low means repetitive text."""
    grams = [tuple(t.split()[i : i + n]) for t in texts for i in range(max(len(t.split()) - n + 1, 0))]
    return len(set(grams)) / max(len(grams), 1)


def distinct_n_per_response(texts: list[str], n: int = 2) -> float:
    """Mean over responses of each one's own distinct-n: low means a response repeats itself."""
    return sum(distinct_n([t], n) for t in texts) / max(len(texts), 1)


@torch.no_grad()
def evaluate_policy(policy, sft, reward_model, tokenizer, complaints: list[str], *, samples: int = 2,
                    max_new_tokens: int = 72, temperature: float = 0.7, batch_size: int = 64, seed: int = 0) -> dict:
    """Sample ``samples`` responses per complaint and measure them."""
    torch.manual_seed(seed)
    policy.eval()
    encoder = Encoder(tokenizer, max_length=4096)
    rollout = HFRollout(policy, tokenizer.pad_token_id, tokenizer.eos_token_id)
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, num_samples=samples)
    gold, rm, kl, texts, no_eos = [], [], [], [], []
    for i in range(0, len(complaints), batch_size):
        chunk = complaints[i : i + batch_size]
        batch = rollout.generate([encoder.prompt_ids([{"role": "user", "content": c}]) for c in chunk], params)
        ids, mask, P = batch.input_ids, batch.attention_mask, batch.prompt_ids.shape[1]
        lp, _ = model_response_logprobs(policy, ids, mask, P, temperature)
        lp_sft, _ = model_response_logprobs(sft, ids, mask, P, temperature)
        kl += ((lp - lp_sft) * batch.response_mask).sum(1).tolist()  # k1 per response, sampled from the policy
        rm += sequence_scores(reward_model, ids, mask).tolist()
        out = tokenizer.batch_decode(batch.response_ids.masked_fill(batch.response_mask == 0, tokenizer.pad_token_id),
                                     skip_special_tokens=True)
        for j, text in enumerate(out):
            texts.append(text.strip())
            gold.append(gold_score(parse_complaint(chunk[j // samples]), text))
        no_eos += (~batch.finished).float().tolist()
    return {"gold_reward_mean": statistics.fmean(gold), "gold_reward_std": statistics.pstdev(gold),
            "rm_score_mean": statistics.fmean(rm), "kl_to_sft": statistics.fmean(kl), "distinct2": distinct_n(texts),
            "distinct2_per_response": distinct_n_per_response(texts),
            "no_eos_fraction": statistics.fmean(no_eos)}


@torch.no_grad()
def answer(policy, tokenizer, complaint: str, max_new_tokens: int = 72) -> str:
    """The greedy reply to one complaint."""
    encoder = Encoder(tokenizer, max_length=4096)
    rollout = HFRollout(policy.eval(), tokenizer.pad_token_id, tokenizer.eos_token_id)
    batch = rollout.generate([encoder.prompt_ids([{"role": "user", "content": complaint}])],
                             SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
    out = batch.response_ids.masked_fill(batch.response_mask == 0, tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True).strip()
