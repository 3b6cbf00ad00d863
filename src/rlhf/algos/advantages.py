"""Advantage estimators: GAE for PPO, group baselines for GRPO, Dr. GRPO and RLOO.

All estimators are registered under one calling signature (:func:`compute_advantages`).
Nothing here whitens: the recipe decides (seed 002 Part 5 whitens after GAE).
"""

from __future__ import annotations

from typing import Callable

import torch


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
    scores: torch.Tensor, group_size: int, scale: str | None = "std", eps: float = 1e-6
) -> torch.Tensor:
    """GRPO's group-relative advantage (Shao et al. 2024, DeepSeekMath eq. 3).

    ``A_i = (r_i - mean(group)) / (std(group) + eps)``; with ``scale=None`` the std division
    is dropped, which is Dr. GRPO (Liu et al. 2025). The G samples of one prompt must be
    contiguous. The std is unbiased (``torch.std``), as in TRL. Needs ``group_size >= 2``
    (with one sample the std is NaN and every advantage 0).

    Shape:
        scores: (B,) with B = n_prompts * G -> (B,).
    """
    if group_size < 2:
        raise ValueError("group advantages need group_size >= 2")
    grouped = scores.float().view(-1, group_size)  # (n_prompts, G)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "std":
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale is not None:
        raise ValueError(f"unknown group scale {scale!r}; valid: 'std', None")
    return centered.view(-1)


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


def _grpo_estimator(*, scores, response_mask, group_size, **_):
    return _outcome(group_advantages(scores, group_size, scale="std"), response_mask)


def _dr_grpo_estimator(*, scores, response_mask, group_size, **_):
    return _outcome(group_advantages(scores, group_size, scale=None), response_mask)


def _rloo_estimator(*, scores, response_mask, group_size, **_):
    return _outcome(rloo_advantages(scores, group_size), response_mask)


ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {
    "gae": _gae_estimator,
    "grpo": _grpo_estimator,
    "dr_grpo": _dr_grpo_estimator,
    "rloo": _rloo_estimator,
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the advantage estimator registered as ``name``.

    ``gae`` reads ``rewards`` and ``values``; the group estimators read ``scores`` and
    ``group_size``. Every estimator returns per-token ``(advantages, returns)``; for the
    critic-free ones ``returns`` equals ``advantages``.

    Shape:
        response_mask, rewards, values: (B, T); scores: (B,) -> two (B, T) tensors.
    """
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"unknown advantage estimator {name!r}; valid: {', '.join(sorted(ADVANTAGE_ESTIMATORS))}"
        )
    return ADVANTAGE_ESTIMATORS[name](
        response_mask=response_mask, scores=scores, rewards=rewards, values=values,
        group_size=group_size, gamma=gamma, lam=lam,
    )
