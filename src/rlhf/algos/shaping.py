"""DAPO's reward shaping and batch filtering (Yu et al. 2025, sections 3.2 and 3.4)."""

from __future__ import annotations

import torch


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (eq. 13), added to each response's score.

    With ``L_max = max_new_tokens`` and ``L_cache = buffer``:
        ``0``                                         for ``L <= L_max - L_cache``
        ``((L_max - L_cache) - L) / L_cache * penalty`` inside the buffer
        ``-penalty``                                  for ``L >= L_max``

    so the penalty grows linearly from 0 to ``-penalty`` over the last ``buffer`` tokens.

    Shape:
        lengths: (B,) response lengths in tokens -> (B,).
    """
    if not 0 < buffer <= max_new_tokens:
        raise ValueError(f"the overlong buffer must be in 1..max_new_tokens ({max_new_tokens}), got {buffer}")
    expected = max_new_tokens - buffer
    over = (lengths.float() - expected).clamp(min=0.0)
    return -(over / buffer).clamp(max=1.0) * penalty


def tied_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which prompt groups have every score equal: their group advantages are all 0, so they carry
    no policy gradient (DAPO's dynamic sampling drops them).

    Shape:
        scores: (B,) with B = n_prompts * G -> (n_prompts,) bool.
    """
    grouped = scores.float().view(-1, group_size)
    return grouped.max(dim=1).values == grouped.min(dim=1).values
