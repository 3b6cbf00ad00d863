"""Signals of reward over-optimisation that need no gold labeller (issue 15).

A policy that exploits a reward model's flaw often shows it in its samples before anyone reads
them: responses grow longer (the seeds' example of reward hacking is verbosity), the reward
starts to follow the length, the samples repeat themselves and look alike, and the KL penalty
eats a growing share of the reward. Each function measures one of these on a rollout batch;
the recipes compare them with their values on the SFT model's own samples at step 0.

Token sequences are response token ids with a ``response_mask`` that is 1 on the response's
tokens (EOS included where one was sampled) and 0 on padding; the mask is a prefix of each
row, and n-grams are read from the masked tokens in order.
"""

from __future__ import annotations

import torch


def _ngrams(response_ids: torch.Tensor, response_mask: torch.Tensor, n: int) -> list[list[tuple[int, ...]]]:
    """The n-grams of each response, one list of n-tuples per row (empty when shorter than n).

    Counted in Python: a rollout batch holds a few thousand tokens, and one ``tolist`` of the batch
    costs less than a ``torch.unique(dim=0)`` a row (about 150 us each on CPU)."""
    rows = []
    for ids, mask in zip(response_ids.tolist(), response_mask.bool().tolist()):
        tokens = [t for t, m in zip(ids, mask) if m]
        rows.append([tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)])
    return rows


def _n_unique(grams: list[tuple[int, ...]]) -> int:
    return len(set(grams))


def distinct_n(response_ids: torch.Tensor, response_mask: torch.Tensor, n: int = 2
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct-n of a batch of responses, within and across responses (Li et al. 2016).

    ``within`` is the mean over responses of (unique n-grams / n-grams) of each response alone:
    low when a response repeats itself. ``across`` pools the batch: unique n-grams over all
    n-grams of all responses: low when the responses look alike (the demo's distinct-2). A
    response shorter than n holds no n-gram and counts 0 in ``within``; a batch with no n-gram
    at all gives 0 for both (as ``rlhf.demo.evaluate.distinct_n`` does).

    Shape:
        response_ids, response_mask: (B, T) -> two scalars.
    """
    rows = _ngrams(response_ids, response_mask, n)
    within = [(_n_unique(g) / len(g)) if g else 0.0 for g in rows]
    pooled = [g for row in rows for g in row]
    across = _n_unique(pooled) / max(len(pooled), 1)
    return torch.tensor(sum(within) / max(len(within), 1)), torch.tensor(across)


def repetition_fraction(response_ids: torch.Tensor, response_mask: torch.Tensor, n: int = 3) -> torch.Tensor:
    """Fraction of responses in which some n-gram occurs at least twice.

    With n = 3 this catches a phrase said twice ("I am sorry ... I am sorry") and loops of the
    same few tokens; a response shorter than n + 1 tokens cannot repeat. All B rows count in the
    denominator.

    Shape:
        response_ids, response_mask: (B, T) -> scalar.
    """
    rows = _ngrams(response_ids, response_mask, n)
    repeats = [_n_unique(g) < len(g) for g in rows]
    return torch.tensor(sum(repeats) / max(len(repeats), 1))


def reward_length(scores: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pearson correlation between the scores and the response lengths, and the mean length.

    The length of a response is its number of tokens under ``response_mask``. The correlation is
    defined only where the lengths vary and the scores vary, over at least 3 responses (any two
    varying points give r = +-1); elsewhere it is NaN, not 0, which would read as "no correlation".

    Shape:
        scores: (B,), response_mask: (B, T) -> two scalars.
    """
    lengths = response_mask.float().sum(1)
    x, y = scores.float() - scores.float().mean(), lengths - lengths.mean()
    denom = torch.sqrt((x * x).sum() * (y * y).sum())
    corr = (x * y).sum() / denom if denom > 0 and len(lengths) >= 3 else torch.full((), float("nan"))
    return corr.detach(), lengths.mean()


def kl_reward_fraction(scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float,
                       eps: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """How much of the reward the KL penalty gives back.

    ``penalty = mean_i(kl_coef * sum_t KL_{i,t})``, the mean over responses of the penalty
    summed over each response's tokens (seed 002 Part 5: ``R_t = r_t - beta KL_t``), and
    ``fraction = penalty / max(mean_i |score_i|, eps)``. With the k1 estimator a response's
    summed KL can be negative, so the fraction is signed: positive when the penalty takes reward
    away. A fraction near 1 means the policy pays in KL about as much as it earns in score. ``eps``
    (0.01) floors the score scale: with scores near 0 (a rule reward nobody earns yet) a KL of 4e-7
    read as 1013% of the mean |score| (issue 22); against the floor it is the penalty itself, a
    fraction that warns only when the penalty itself is sizeable.

    Shape:
        scores: (B,), kl, response_mask: (B, T) -> two scalars ``(fraction, penalty)``.
    """
    penalty = kl_coef * (kl.float() * response_mask.float()).sum(1).mean()
    scale = scores.float().abs().mean().clamp(min=eps)
    return (penalty / scale).detach(), penalty.detach()


def relative_drift(value: float, start: float, eps: float = 1e-8) -> float:
    """``(value - start) / max(|start|, eps)``: the change of a signal since its step-0 value.

    -0.3 is a 30% fall, +0.5 a 50% rise; a start of 0 makes any change large and no change 0.
    """
    return (float(value) - float(start)) / max(abs(float(start)), eps)
