"""Advantage estimators: GAE for PPO, group baselines for GRPO (and Dr. GRPO's unscaled one) and
RLOO, and REINFORCE++'s batch-whitened returns.

All estimators are registered under one calling signature (:func:`compute_advantages`).
GAE does not whiten: the recipe decides (seed 002 Part 5 whitens after GAE). REINFORCE++
whitens, because the batch mean is its baseline: that is the estimator, not a step hidden in it.
"""

from __future__ import annotations

from typing import Callable

import torch

from rlhf.algos.stats import masked_whiten


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016), seed 002 Parts 3 and 5.

    ``delta_t = R_t + gamma V(s_{t+1}) - V(s_t)`` and ``A_t = delta_t + gamma lam A_{t+1}``,
    computed backwards. The value after the last valid token is 0 (the episode ends there);
    masked positions are skipped, so right padding (and holes) never leak in.
    ``returns = advantages + values`` is the seeds' V_target. Raw: no whitening.

    Shape:
        rewards, values, response_mask: (B, T) -> two (B, T) tensors, 0 outside the mask.
    """
    rewards, values, mask = rewards.float(), values.float(), response_mask.float()
    next_value = torch.zeros_like(values[:, 0])
    last_adv = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * last_adv
        next_value = values[:, t] * m + (1 - m) * next_value
        last_adv = adv_t * m + (1 - m) * last_adv
        advantages[:, t] = adv_t * m
    returns = (advantages + values) * mask
    return advantages, returns


def gae_matrix(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE in closed form, ``A = delta @ D`` with ``D[s, t] = (gamma lam)^(s - t)`` for s >= t.

    The vectorised twin of :func:`gae` for right-padded batches (no holes in the mask); it
    uses a (T, T) matrix, so it suits short responses. Used to cross-check the loop.

    Shape:
        rewards, values, response_mask: (B, T) -> two (B, T) tensors.
    """
    rewards, values, mask = rewards.float(), values.float(), response_mask.float()
    values = values * mask
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    delta = (rewards + gamma * next_values - values) * mask  # (B, T)
    t = torch.arange(values.shape[1], device=values.device)
    power = (t[:, None] - t[None, :]).float()  # (T, T): s - t
    discount = torch.where(power >= 0, (gamma * lam) ** power.clamp(min=0), torch.zeros(()))
    advantages = (delta @ discount) * mask
    return advantages, (advantages + values) * mask


def group_advantages(
    scores: torch.Tensor,
    group_size: int,
    scale: str | None = "group",
    eps: float = 1e-4,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """GRPO's group-relative advantage (Shao et al. 2024, DeepSeekMath eq. 3).

    ``A_i = (r_i - mean(group)) / (std + eps)``, the std by ``scale`` (TRL's ``scale_rewards``):
        ``group``  the std of the prompt's G scores (the GRPO paper);
        ``batch``  the std of every score of the batch, across processes when ``reduce_sum`` (a
                   sum over processes) is given (Hu et al. 2025, "PPO Lite");
        ``None``   no division: Dr. GRPO (Liu et al. 2025), which finds the std a difficulty bias.

    The G samples of one prompt must be contiguous. The std is unbiased (``torch.std``), as in
    TRL. ``eps`` is TRL's 1e-4 by default: in a near-tied group (0.3, 0.3, 0.3, 0.3001) it gives
    advantages of +-0.5 where 1e-6 gives +-1.47, so noise below ``eps`` does not become full-size
    advantages. Needs ``group_size >= 2`` (with one sample the std is NaN and every advantage 0).

    Shape:
        scores: (B,) with B = n_prompts * G -> (B,).
    """
    if group_size < 2:
        raise ValueError("group advantages need group_size >= 2")
    if scores.isnan().any():  # unscorable completions (TRL: no reward function applied)
        return _nan_group_advantages(scores, group_size, scale, eps, reduce_sum)
    grouped = scores.float().view(-1, group_size)  # (n_prompts, G)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        total = reduce_sum or (lambda t: t)
        flat = scores.float().view(-1)
        n, s = total(torch.stack([torch.tensor(float(flat.numel()), device=flat.device), flat.sum()]))
        var = total(((flat - s / n) ** 2).sum()) / (n - 1).clamp(min=1.0)
        centered = centered / (var.sqrt() + eps)
    elif scale is not None:
        raise ValueError(f"unknown group scale {scale!r}; valid: 'group', 'batch', None")
    return centered.view(-1)


def _nan_group_advantages(scores, group_size, scale, eps, reduce_sum) -> torch.Tensor:
    """:func:`group_advantages` where some scores are NaN: the means and (unbiased) stds leave them out, as
    TRL's ``nanmean``/``nanstd`` do, and their advantages are 0."""
    grouped = scores.float().view(-1, group_size)
    valid = ~grouped.isnan()
    n = valid.sum(1, keepdim=True).float()
    x = grouped.nan_to_num(0.0)
    mean = (x * valid).sum(1, keepdim=True) / n.clamp(min=1)
    centered = (grouped - mean).nan_to_num(0.0) * valid
    if scale == "group":
        std = ((centered**2).sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
        centered = centered / (std + eps)
    elif scale == "batch":
        total = reduce_sum or (lambda t: t)
        flat, ok = scores.float().view(-1), ~scores.float().view(-1).isnan()
        count, s = total(torch.stack([ok.sum().float(), flat.nan_to_num(0.0).sum()]))
        var = total((((flat - s / count).nan_to_num(0.0) * ok) ** 2).sum()) / (count - 1).clamp(min=1.0)
        centered = centered / (var.sqrt() + eps)
    elif scale is not None:
        raise ValueError(f"unknown group scale {scale!r}; valid: 'group', 'batch', None")
    return centered.view(-1)


def reinforce_pp_advantages(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 1.0,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025, eqs. 5-7): the return ``G_t = sum_{s >= t} gamma^(s-t) R_s`` of the
    per-token rewards (the score at the last token minus the KL penalty on every token), whitened
    over every response token of the global batch (``reduce_sum``: a sum over processes).

    No critic and no group: the batch is the baseline. ``G_t`` is GAE with ``lam = 1`` and zero
    values (:func:`gae`).

    Shape:
        rewards, response_mask: (B, T) -> two (B, T) tensors ``(advantages, returns)``, 0 outside the mask.
    """
    returns, _ = gae(rewards, torch.zeros_like(rewards, dtype=torch.float), response_mask, gamma=gamma, lam=1.0)
    return masked_whiten(returns, response_mask.float(), reduce_sum=reduce_sum), returns


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): ``A_i = r_i - mean_{j != i} r_j``.

    Sums to zero within each group. Needs ``group_size >= 2``.

    Shape:
        scores: (B,) with B = n_prompts * G -> (B,).
    """
    if group_size < 2:
        raise ValueError("RLOO needs group_size >= 2")
    grouped = scores.float().view(-1, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).view(-1)


# ---- one registry, one signature -------------------------------------------------------

AdvantageFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _gae_estimator(*, rewards, values, response_mask, gamma, lam, **_):
    return gae(rewards, values, response_mask, gamma=gamma, lam=lam)


def _outcome(per_seq: torch.Tensor, response_mask: torch.Tensor):
    # Outcome supervision: every token of a response gets its sequence's advantage.
    adv = per_seq[:, None] * response_mask.float()
    return adv, adv


def _grpo_estimator(*, scores, response_mask, group_size, scale, eps, reduce_sum, **_):
    return _outcome(group_advantages(scores, group_size, scale=scale, eps=eps, reduce_sum=reduce_sum), response_mask)


def _rloo_estimator(*, scores, response_mask, group_size, **_):
    return _outcome(rloo_advantages(scores, group_size), response_mask)


def _reinforce_pp_estimator(*, rewards, response_mask, gamma, reduce_sum, **_):
    return reinforce_pp_advantages(rewards, response_mask, gamma=gamma, reduce_sum=reduce_sum)


ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {
    "gae": _gae_estimator,
    "grpo": _grpo_estimator,
    "rloo": _rloo_estimator,
    "reinforce_pp": _reinforce_pp_estimator,
}


def compute_advantages(
    name: str,
    *,
    response_mask: torch.Tensor,
    scores: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    group_size: int = 1,
    gamma: float = 1.0,
    lam: float = 0.95,
    scale: str | None = "group",
    eps: float = 1e-4,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the advantage estimator registered as ``name``.

    ``gae`` reads ``rewards`` and ``values``; ``reinforce_pp`` reads ``rewards`` (and whitens
    across processes with ``reduce_sum``); the group estimators read ``scores`` and
    ``group_size`` (``grpo`` also ``scale``, ``eps`` and, for ``scale="batch"``, ``reduce_sum``).
    Every estimator returns per-token ``(advantages, returns)``; for the group ones ``returns``
    equals ``advantages``.

    Shape:
        response_mask, rewards, values: (B, T); scores: (B,) -> two (B, T) tensors.
    """
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"unknown advantage estimator {name!r}; valid: {', '.join(sorted(ADVANTAGE_ESTIMATORS))}"
        )
    return ADVANTAGE_ESTIMATORS[name](
        response_mask=response_mask, scores=scores, rewards=rewards, values=values,
        group_size=group_size, gamma=gamma, lam=lam, scale=scale, eps=eps, reduce_sum=reduce_sum,
    )
