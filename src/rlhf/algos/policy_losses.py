"""The RLVR family of policy losses (GRPO and its successors), under TRL's ``loss_type`` names.

Each loss is two pure pieces, called in turn by the recipe:

1. a per-token loss (:func:`policy_loss_terms`): the surrogate of the importance ratio
   ``r = pi / pi_old`` (per token, or GSPO's one ratio per sequence), and
2. an aggregation (:data:`LOSS_TYPES`): how those per-token losses become one number, which is
   where GRPO, BNPO, Dr. GRPO and DAPO differ.

+-----------+-------------------------------------------+-------------------------------------------+
| loss_type | per-token loss                            | normalisation                             |
+===========+===========================================+===========================================+
| grpo      | clipped surrogate (PPO, eq. 7)            | token mean per sequence, mean over seqs   |
| bnpo      | clipped surrogate                         | token mean of each micro-batch            |
| dr_grpo   | clipped surrogate                         | token sum / (sequences x max_new_tokens)  |
| dapo      | clipped surrogate                         | token sum / the rollout's tokens          |
| cispo     | -sg(min(r, cap)) A log pi                 | as dapo                                   |
| sapo      | -(4/tau) sigmoid(tau (r - 1)) A           | as grpo                                   |
| luspo     | clipped surrogate (sequence ratio)        | token sum per sequence, mean over seqs    |
| vespo     | -sg(phi(w)) A log pi, w the sequence ratio| as dapo                                   |
+-----------+-------------------------------------------+-------------------------------------------+

Sources: GRPO, Shao et al. 2024 (DeepSeekMath, eq. 3); BNPO and the loss-type names, TRL's
``GRPOConfig``; Dr. GRPO, Liu et al. 2025; DAPO, Yu et al. 2025 (eq. 8, token-level loss and
clip-higher); CISPO, MiniMax 2025 (MiniMax-M1, eq. 4); SAPO, Gao et al. 2025 (Soft Adaptive
Policy Optimization, eq. 5); GSPO, Zheng et al. 2025 (sequence-level ratio, eq. 7); LUSPO, 2026
(length-unbiased GSPO); VESPO, 2026 (variational sequence-level soft policy optimisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlhf.algos.stats import masked_mean


@dataclass(frozen=True)
class LossType:
    """How one ``loss_type`` is computed: its per-token ``surrogate`` and its ``normalisation``.

    ``normalisation`` is one of:
        ``seq-mean``      each sequence's token mean, then the mean over sequences;
        ``seq-sum``       each sequence's token sum, then the mean over sequences;
        ``seq-sum-len``   each sequence's token sum, over sequences x ``max_new_tokens``;
        ``micro-tokens``  each micro-batch's own token mean, then the mean over micro-batches;
        ``batch-tokens``  the token sum over the rollout's token count (per optimizer step).
    """

    surrogate: str
    normalisation: str


LOSS_TYPES: dict[str, LossType] = {
    "grpo": LossType("clip", "seq-mean"),
    "bnpo": LossType("clip", "micro-tokens"),
    "dr_grpo": LossType("clip", "seq-sum-len"),
    "dapo": LossType("clip", "batch-tokens"),
    "cispo": LossType("cispo", "batch-tokens"),
    "sapo": LossType("sapo", "seq-mean"),
    "luspo": LossType("clip", "seq-sum"),
    "vespo": LossType("vespo", "batch-tokens"),
}


def importance_log_ratio(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, response_mask: torch.Tensor, level: str = "token"
) -> torch.Tensor:
    """``log(pi / pi_old)``: per token, or (GSPO, Zheng et al. 2025, eq. 7) one value per sequence,
    the mean of its tokens' log-ratios.

    Shape:
        all inputs (B, T) -> (B, T) for ``token``, (B, 1) for ``sequence``.
    """
    log_ratio = logprobs.float() - old_logprobs.float()
    if level == "token":
        return log_ratio
    if level == "sequence":
        mask = response_mask.float()
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    raise ValueError(f"unknown importance sampling level {level!r}; valid: token, sequence")


def vespo_weights(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    k_pos: float = 2.0,
    lambda_pos: float = 3.0,
    k_neg: float = 3.0,
    lambda_neg: float = 2.0,
) -> torch.Tensor:
    """VESPO's Gamma weight of each sequence, ``phi(w) = exp(lam) w^k exp(-lam w)`` (so ``phi(1) = 1``),
    with ``w = exp(sum_t log r_t)`` the sequence's importance weight and ``(k, lam)`` chosen by the
    sign of the advantage. Computed in log space with ``log w`` clamped to ``[log 1e-8, 20]``, as
    the reference implementation does; no gradient flows through it.

    Shape:
        log_ratio, response_mask: (B, T); advantages: (B, 1) or (B, T) -> (B, 1).
    """
    with torch.no_grad():
        low = math.log(1e-8)
        seq_log_ratio = (log_ratio.clamp(-20.0, 20.0) * response_mask.float()).sum(-1, keepdim=True)
        log_w = seq_log_ratio.clamp(low, 20.0)
        nonneg = advantages[:, :1] >= 0
        k = torch.where(nonneg, k_pos, k_neg)
        lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def policy_loss_terms(
    loss_type: str,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    importance_sampling_level: str = "token",
    delta: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_params: tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The per-token policy loss of ``loss_type`` (we minimise it), before aggregation.

    With ``r`` the importance ratio (:func:`importance_log_ratio`) and ``A`` the advantage:
        clipped surrogate (grpo, bnpo, dr_grpo, dapo, luspo):
            ``-min(r A, clip(r, 1 - clip_eps, 1 + clip_eps_high) A)``; with ``delta`` (INTELLECT-2's
            two-sided clip) the unclipped ratio is first capped at ``delta``.
        cispo:  ``-sg(min(r, clip_eps_high)) A log pi``: the ratio is capped (an absolute cap, TRL's
            ``epsilon_high``; the ScaleRL paper uses 5) and detached, so every token keeps a gradient.
        sapo:   ``-(4 / tau) sigmoid(tau (r - 1)) A``, tau = ``sapo_temperature_pos`` where A > 0
            else ``sapo_temperature_neg``: a soft gate whose slope is 1 at r = 1.
        vespo:  ``-sg(phi(w)) A log pi`` (:func:`vespo_weights`, ``vespo_params`` =
            ``(k_pos, lambda_pos, k_neg, lambda_neg)``).

    Shape:
        logprobs, old_logprobs, response_mask: (B, T); advantages: (B, T) or (B,) -> (B, T).

    Returns:
        ``(per_token_loss, metrics)``: metrics are detached masked means; the clipped surrogate gives
        TRL's ``clip_ratio/low_mean``, ``clip_ratio/high_mean`` and ``clip_ratio/region_mean``, cispo
        ``cispo_clip_ratio``, vespo ``vespo/phi_seq_mean``; all give ``ratio_mean`` and ``approx_kl``
        (k3 of old vs new, per token).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    mask = response_mask.float()
    log_ratio = importance_log_ratio(logprobs, old_logprobs, response_mask, importance_sampling_level)
    ratio = torch.exp(log_ratio)  # (B, T) or (B, 1)
    surrogate = LOSS_TYPES[loss_type].surrogate
    metrics: dict[str, torch.Tensor] = {}
    if surrogate == "clip":
        clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
        capped = ratio if delta is None else torch.clamp(ratio, max=delta)
        per_token = -torch.minimum(capped * advantages, clipped * advantages)
        with torch.no_grad():
            low_clipped = ((ratio < 1.0 - clip_eps) & (advantages < 0)).float().expand_as(mask)
            high_clipped = ((ratio > 1.0 + high) & (advantages > 0)).float().expand_as(mask)
            metrics["clip_ratio/low_mean"] = masked_mean(low_clipped, mask)
            metrics["clip_ratio/high_mean"] = masked_mean(high_clipped, mask)
            metrics["clip_ratio/region_mean"] = masked_mean(torch.maximum(low_clipped, high_clipped), mask)
    elif surrogate == "cispo":
        weight = torch.clamp(ratio, max=high).detach()
        per_token = -weight * advantages * logprobs.float()
        with torch.no_grad():
            metrics["cispo_clip_ratio"] = masked_mean(((ratio > high) & (advantages > 0)).float().expand_as(mask), mask)
    elif surrogate == "sapo":
        tau = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token = -(torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau) * advantages
    else:  # vespo
        token_log_ratio = logprobs.float() - old_logprobs.float()
        phi = vespo_weights(token_log_ratio, advantages, response_mask, *vespo_params)
        per_token = -phi * advantages * logprobs.float()
        metrics["vespo/phi_seq_mean"] = phi.mean()
    with torch.no_grad():
        full = ratio.expand_as(mask)
        metrics["ratio_mean"] = masked_mean(full, mask)
        metrics["approx_kl"] = masked_mean((full - 1.0) - log_ratio.expand_as(mask), mask)
    return per_token.expand_as(mask), metrics


def normalise_policy_loss(
    per_token_loss: torch.Tensor,
    response_mask: torch.Tensor,
    normalisation: str,
    *,
    global_seqs: float | torch.Tensor,
    global_tokens: float | torch.Tensor | None = None,
    global_micro_batches: float | torch.Tensor | None = None,
    max_new_tokens: int | None = None,
) -> torch.Tensor:
    """This micro-batch's share of the loss under ``normalisation`` (:class:`LossType`).

    Data parallelism and micro-batches split an optimizer step's batch into parts; each part
    returns its share, so the parts **sum** to the step's loss whatever the split (as
    :func:`rlhf.algos.agg_loss` does). The caller gives the step's totals across every process:
    ``global_seqs`` (sequences), ``global_tokens`` (for ``batch-tokens``: the token count that
    normalises the step), ``global_micro_batches`` (for ``micro-tokens``) and ``max_new_tokens``
    (for ``seq-sum-len``). Sequences without a response token count as sequences (TRL's rule).

    Shape:
        per_token_loss, response_mask: (B, T) -> scalar.
    """
    mask = response_mask.to(per_token_loss.dtype)
    token_sum = (per_token_loss * mask).sum(-1)  # (B,)
    if normalisation == "seq-mean":
        return (token_sum / mask.sum(-1).clamp(min=1.0)).sum() / global_seqs
    if normalisation == "seq-sum":
        return token_sum.sum() / global_seqs
    if normalisation == "seq-sum-len":
        return token_sum.sum() / (global_seqs * max_new_tokens)
    if normalisation == "micro-tokens":
        return token_sum.sum() / mask.sum().clamp(min=1.0) / global_micro_batches
    if normalisation == "batch-tokens":
        return token_sum.sum() / torch.as_tensor(global_tokens).clamp(min=1.0)
    raise ValueError(f"unknown normalisation {normalisation!r}")
