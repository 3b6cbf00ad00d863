"""Masked statistics and loss aggregation.

Every RLHF tensor of shape (B, T) comes with a ``response_mask`` of the same shape: 1 on
response tokens, 0 on prompt and padding. These helpers never let padding leak into a mean.
"""

from __future__ import annotations

from typing import Callable

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is 1.

    Shape:
        x, mask: (B, T). Returns a scalar, or (B,) / (T,) when ``dim`` is given.
    """
    return (x * mask).sum() if dim is None else (x * mask).sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1.

    An all-masked row (or tensor) gives 0, never NaN: the count is clamped to at least 1.

    Shape:
        x, mask: (B, T). Returns a scalar, or the reduced shape when ``dim`` is given.
    """
    mask = mask.to(x.dtype)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over masked positions (Bessel-corrected when ``unbiased``).

    Shape:
        x, mask: (B, T) -> scalar.
    """
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * (n / (n - 1).clamp(min=1.0))
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Normalise ``x`` to zero mean and unit variance over masked positions.

    With ``shift_mean=False`` the mean is added back (only the scale changes), as for rewards in
    OpenAI's lm-human-preferences. Masked positions come out as 0. ``reduce_sum`` (a sum across
    processes, such as an all-reduce) makes the mean and the unbiased variance those of the
    global batch rather than of this process's rows.

    Shape:
        x, mask: (B, T) -> (B, T).
    """
    total = reduce_sum or (lambda t: t)
    mask = mask.to(x.dtype)
    n, s = total(torch.stack([mask.sum(), (x * mask).sum()]))
    mean = s / n.clamp(min=1.0)
    var = total(((x - mean) ** 2 * mask).sum()) / (n - 1).clamp(min=1.0)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def agg_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    global_tokens: float | torch.Tensor | None = None,
    global_seqs: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar (verl's ``agg_loss``).

    Modes:
        ``token-mean``: every response token in the batch weighs the same (DAPO, verl default).
        ``seq-mean-token-mean``: mean over each sequence's tokens, then over sequences (PPO, GRPO paper).
        ``seq-mean-token-sum``: sum over each sequence's tokens, then mean over sequences (Dr. GRPO).

    Data parallelism and gradient accumulation split a batch into parts. Pass the *whole*
    batch's token count (``global_tokens``) or sequence count (``global_seqs``) and each part
    returns its share, so the parts **sum** to the whole-batch value whatever the split.

    Shape:
        loss_mat, mask: (B, T) -> scalar.
    """
    mask = mask.to(loss_mat.dtype)
    if mode == "token-mean":
        denom = mask.sum().clamp(min=1.0) if global_tokens is None else global_tokens
        return masked_sum(loss_mat, mask) / denom
    if mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        per_seq = masked_sum(loss_mat, mask, dim=-1)
        if mode == "seq-mean-token-mean":
            per_seq = per_seq / mask.sum(dim=-1).clamp(min=1.0)
        has_tokens = (mask.sum(dim=-1) > 0).to(loss_mat.dtype)
        denom = has_tokens.sum().clamp(min=1.0) if global_seqs is None else global_seqs
        return (per_seq * has_tokens).sum() / denom
    raise ValueError(f"unknown loss aggregation mode {mode!r}; valid: {', '.join(AGG_MODES)}")
