"""Losses of the pipeline. Each returns ``(loss, metrics)``; we minimise ``loss``.

Metrics are detached 0-dim tensors (no ``.item()`` here: the recipe decides when to sync).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from rlhf.algos.stats import agg_loss, masked_mean, masked_var

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "cdpo")


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    **agg_kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, negated: ``-min(r A, clip(r, 1-eps, 1+eps_high) A)``.

    Seed 003 worked example and seed 002 Part 5 Part C; Schulman et al. 2017, eq. (7).
    ``r = exp(logprobs - old_logprobs)``. ``clip_eps_high`` gives DAPO's asymmetric clip
    (defaults to ``clip_eps``); ``dual_clip`` (> 1, Ye et al. 2020) bounds the loss of
    negative-advantage tokens by ``-dual_clip * A``. Extra keyword arguments go to
    :func:`agg_loss`.

    Shape:
        all inputs (B, T) -> scalar.

    Returns:
        ``(loss, metrics)`` with ``clipfrac``, ``approx_kl`` (k3 of old vs new, Schulman's
        estimator ``(r - 1) - log r``) and ``ratio_mean``.
    """
    mask = response_mask.float()
    log_ratio = (logprobs - old_logprobs).float()
    ratio = torch.exp(log_ratio)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
    pg_losses = torch.maximum(pg_loss1, pg_loss2)
    if dual_clip is not None:
        pg_loss3 = -advantages * dual_clip
        pg_losses = torch.where(advantages < 0, torch.minimum(pg_losses, pg_loss3), pg_losses)
    loss = agg_loss(pg_losses, mask, agg, **agg_kwargs)
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((pg_loss2 > pg_loss1).float(), mask),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    clip_eps: float | None = None,
    agg: str = "token-mean",
    **agg_kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The critic's loss ``0.5 (V(s_t) - V_target)^2`` (seed 002 Part 5, L^VF).

    With ``clip_eps`` the new value may move at most ``clip_eps`` from ``old_values`` before
    its error stops counting: the max of the clipped and unclipped squared errors, as in
    OpenAI baselines and lm-human-preferences.

    Shape:
        all inputs (B, T) -> scalar.

    Returns:
        ``(loss, metrics)`` with ``clipfrac`` and ``explained_variance``
        (``1 - Var[returns - values] / Var[returns]``).
    """
    mask = response_mask.float()
    vf_losses1 = (values.float() - returns) ** 2
    if clip_eps is not None:
        clipped = old_values + torch.clamp(values.float() - old_values, -clip_eps, clip_eps)
        vf_losses2 = (clipped - returns) ** 2
        vf_losses = torch.maximum(vf_losses1, vf_losses2)
    else:
        vf_losses2, vf_losses = vf_losses1, vf_losses1
    loss = 0.5 * agg_loss(vf_losses, mask, agg, **agg_kwargs)
    with torch.no_grad():
        var_returns = masked_var(returns, mask)
        metrics = {
            "clipfrac": masked_mean((vf_losses2 > vf_losses1).float(), mask),
            "explained_variance": 1.0 - masked_var(returns - values.float(), mask) / var_returns.clamp(min=1e-8),
        }
    return loss, metrics


def ppo_loss(
    policy_loss: torch.Tensor,
    value_loss: torch.Tensor,
    entropy: torch.Tensor,
    vf_coef: float = 0.5,
    ent_coef: float = 0.01,
) -> torch.Tensor:
    """The combined PPO loss, minus the seeds' objective.

    Seed 002 Part 5 and seed 003: we maximise ``L^CLIP - c1 L^VF + c2 S``; since
    ``policy_loss`` is already ``-L^CLIP``, the loss is ``policy_loss + c1 value_loss - c2 S``.

    Shape:
        scalars -> scalar.
    """
    return policy_loss + vf_coef * value_loss - ent_coef * entropy


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reward-model loss ``-log sigmoid(s+ - s- - margin)`` (seed 001; seed 003 Phase 2).

    The optional ``margin`` (Llama 2, Touvron et al. 2023) asks for a larger gap on pairs
    whose preference is stronger.

    Shape:
        chosen_scores, rejected_scores, margin: (B,) -> scalar.

    Returns:
        ``(loss, metrics)`` with ``accuracy`` (chosen scored higher) and ``margin``
        (mean of ``s+ - s-``).
    """
    diff = chosen_scores.float() - rejected_scores.float()
    logits = diff if margin is None else diff - margin.float()
    loss = -F.logsigmoid(logits).mean()
    with torch.no_grad():
        metrics = {"accuracy": (diff > 0).float().mean(), "margin": diff.mean()}
    return loss, metrics


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct Preference Optimization and its variants (seed 002 Part 6), under TRL's names.

    With ``h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))`` and ``eps`` =
    ``label_smoothing``:
        ``sigmoid``  -log sigmoid(beta h)                                  Rafailov et al. 2023, eq. (7)
        ``cdpo``     -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
                     conservative DPO (Mitchell 2023): eps labels assumed flipped
        ``robust``   (-(1-eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)
                     robust DPO (Chowdhury et al. 2024, eq. 9): unbiased under eps flipped labels
        ``ipo``      (h - 1 / (2 beta))^2                                  Azar et al. 2023, eq. (17)
        ``hinge``    relu(1 - beta h)                                      SLiC, Zhao et al. 2023

    ``label_smoothing`` is used by ``cdpo`` and ``robust`` only, as in TRL 1.13 (whose ``sigmoid``
    ignores it); the recipe refuses it elsewhere. ``ipo`` takes each reply's per-token mean
    log-ratio, as TRL's ``loss_type="ipo"`` does: each sum is divided by its reply's token count
    (``chosen_lengths``, ``rejected_lengths``, required for ``ipo``, at least 1), so the target
    margin ``1 / (2 beta)`` does not grow with the response length. The rest take summed log-probs.

    Shape:
        the four log-probability sums and the two lengths: (B,) -> scalar.

    Returns:
        ``(loss, metrics)`` with ``rewards_chosen`` and ``rewards_rejected`` (the implicit rewards
        ``beta * log pi / pi_ref`` of the summed log-probs, for every loss type as in TRL; batch
        means), ``accuracy`` (chosen reward above rejected) and ``margin``.
    """
    chosen_logratios = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_logratios = policy_rejected_logps.float() - ref_rejected_logps.float()
    h = chosen_logratios - rejected_logratios
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "cdpo":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type 'ipo' averages log-probs over each reply's tokens: "
                             "pass chosen_lengths and rejected_lengths")
        h_mean = (chosen_logratios / chosen_lengths.float().clamp(min=1.0)
                  - rejected_logratios / rejected_lengths.float().clamp(min=1.0))
        losses = (h_mean - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    with torch.no_grad():
        rewards_chosen = beta * chosen_logratios
        rewards_rejected = beta * rejected_logratios
        metrics = {
            "rewards_chosen": rewards_chosen.mean(),
            "rewards_rejected": rewards_rejected.mean(),
            "accuracy": (rewards_chosen > rewards_rejected).float().mean(),
            "margin": (rewards_chosen - rewards_rejected).mean(),
        }
    return losses.mean(), metrics


