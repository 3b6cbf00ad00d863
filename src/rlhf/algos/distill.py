"""Divergences between a student's and a teacher's next-token distributions, for distillation.

Generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, "On-Policy Distillation of
Language Models", eq. 1), with ``beta`` choosing the divergence as TRL's ``DistillationConfig.beta``
does: 0 is the forward KL(teacher || student), 1 the reverse KL(student || teacher) (on-policy
distillation, Thinking Machines 2025; GKD with lambda = 1), and between them
``beta KL(teacher || M) + (1 - beta) KL(student || M)`` with ``M = beta teacher + (1 - beta) student``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension, from log-probabilities."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
) -> torch.Tensor:
    """Per-position divergence of the student's distribution from the teacher's (GKD, eq. 1).

    ``beta`` 0: ``KL(teacher || student)``; 1: ``KL(student || teacher)``; else the generalised JSD
    with the mixture ``M = beta teacher + (1 - beta) student``. Both logits are divided by
    ``temperature`` first. With ``top_k`` > 0 the divergence is between the two distributions over
    ``top_k + 1`` outcomes: each of the teacher's ``top_k`` likeliest tokens, and "any other token"
    (each model's remaining mass). Only the teacher's top-k log-probs are needed (what a teacher
    server sends), and the student's mass outside them is still penalised; by the data-processing
    inequality it is a lower bound of the full-vocabulary divergence, equal where the two are
    proportional outside the top k (e.g. the teacher's mass there is 0 and so is the student's).
    The full vocabulary (exact) is the default.

    Shape:
        student_logits, teacher_logits: (..., V) -> (...), float32.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    s, t = student_logits.float(), teacher_logits.float().detach()
    if temperature != 1.0:
        s, t = s / temperature, t / temperature
    s_log, t_log = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    if top_k:
        index = t.topk(min(top_k, t.shape[-1]), dim=-1).indices
        s_log, t_log = _with_rest(s_log.gather(-1, index)), _with_rest(t_log.gather(-1, index))
    if beta == 0.0:
        return _kl(t_log, s_log)
    if beta == 1.0:
        return _kl(s_log, t_log)
    b = torch.tensor(beta, dtype=s_log.dtype, device=s_log.device)
    m_log = torch.logsumexp(torch.stack([t_log + torch.log(b), s_log + torch.log1p(-b)]), dim=0)
    return b * _kl(t_log, m_log) + (1 - b) * _kl(s_log, m_log)


def _with_rest(top_log: torch.Tensor) -> torch.Tensor:
    """Log-probs of k outcomes and, last, of "the rest": ``log(1 - sum p)``, clamped away from log 0."""
    rest = torch.log1p(-torch.logsumexp(top_log, dim=-1, keepdim=True).exp().clamp(max=1 - 1e-7))
    return torch.cat([top_log, rest], dim=-1)


def teacher_top_k_mass(teacher_logits: torch.Tensor, top_k: int, temperature: float = 1.0) -> torch.Tensor:
    """The teacher's probability on its ``top_k`` likeliest tokens (1: a top-k divergence is exact).

    Shape:
        teacher_logits: (..., V) -> (...).
    """
    p = F.softmax(teacher_logits.float() / temperature, dim=-1)
    return p.topk(min(top_k, p.shape[-1]), dim=-1).values.sum(-1)
