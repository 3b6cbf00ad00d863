"""Per-token statistics of a language model's logits: log-probabilities, entropy, SFT loss."""

from __future__ import annotations

import torch

from rlhf.algos.stats import masked_mean

# Rows of (B*T, V) processed at once: bounds the temporary of logsumexp/softmax to
# _CHUNK_ELEMENTS floats instead of a second full (B, T, V) copy.
_CHUNK_ELEMENTS = 1 << 24


def _row_chunks(n_rows: int, vocab: int) -> tuple[range, int]:
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    return range(0, n_rows, step), step


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log pi(token | context): gather the token's logit, then subtract the log-partition.

    Equivalent to ``torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]``
    but never holds a second full (B, T, V) float32 tensor: the logsumexp runs over row
    chunks, in float32 even for bf16 logits (TRL's ``selective_log_softmax`` idea).
    ``logits[:, t]`` must already be the prediction for ``tokens[:, t]`` (shift first).

    Shape:
        logits: (B, T, V), tokens: (B, T) -> (B, T), float32.
    """
    flat = logits.reshape(-1, logits.shape[-1])  # (B*T, V), a view
    picked = flat.gather(-1, tokens.reshape(-1, 1)).squeeze(-1).float()  # (B*T,)
    starts, step = _row_chunks(flat.shape[0], flat.shape[1])
    lse = torch.cat([torch.logsumexp(flat[i : i + step].float(), dim=-1) for i in starts])
    return (picked - lse).view(tokens.shape)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy H = logsumexp(z) - sum softmax(z) * z of each next-token distribution.

    The seeds' entropy bonus S[pi](s_t) (seed 002 Part 5, seed 003). Chunked like
    :func:`logprobs_from_logits`.

    Shape:
        logits: (B, T, V) -> (B, T), float32.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    starts, step = _row_chunks(flat.shape[0], flat.shape[1])
    out = []
    for i in starts:
        z = flat[i : i + step].float()
        out.append(torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1))
    return torch.cat(out).view(logits.shape[:-1])


def head_token_stats(hidden: torch.Tensor, head, tokens: torch.Tensor, temperature: float = 1.0,
                     entropy: bool = False, entropy_grad: bool = True, correct: bool = False) -> dict[str, torch.Tensor]:
    """Per-row statistics of ``head(hidden) / temperature`` without the whole ``(N, V)`` logits:
    the LM head runs over chunks of rows, and under autograd each chunk is recomputed in the
    backward pass (activation checkpointing), so one chunk's logits are alive at a time, in either
    pass (the idea of chunked and fused LM-head losses).

    Always ``"logprobs"`` (:func:`logprobs_from_logits` of ``tokens``); ``entropy=True`` adds
    ``"entropy"`` (:func:`entropy_from_logits`), ``correct=True`` adds ``"correct"`` (whether the
    argmax is the token, a metric). ``head`` maps hidden states to logits (the LM head, with any
    softcapping). With ``entropy_grad=False`` the entropy is a metric without gradient: computed
    under ``no_grad``, so the backward pass recomputes none of it (a recomputed chunk whose
    tensors the backward never reads stays alive until the graph is freed: about 2.4 GB for GRPO's
    2,048 response tokens at a vocabulary of 151,936, measured with ``benchmarks/compare.py``).

    Shape:
        hidden: (N, H), tokens: (N,) -> each (N,), float32 (``correct``: bool).
    """
    from torch.utils.checkpoint import checkpoint

    def chunk(h: torch.Tensor, t: torch.Tensor):
        z = head(h)
        if temperature > 0 and temperature != 1.0:
            z = z / temperature
        out = [logprobs_from_logits(z, t)]
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            out += [entropy_from_logits(z)] if entropy else []
        with torch.no_grad():
            out += [z.argmax(-1) == t] if correct else []
        return tuple(out)

    names = ["logprobs"] + ["entropy"] * entropy + ["correct"] * correct
    with torch.no_grad():
        vocab = head(hidden[:0]).shape[-1]
    starts, step = _row_chunks(hidden.shape[0], vocab)
    grad = torch.is_grad_enabled() and hidden.requires_grad
    parts = [checkpoint(chunk, hidden[i : i + step], tokens[i : i + step], use_reentrant=False) if grad
             else chunk(hidden[i : i + step], tokens[i : i + step]) for i in starts]
    if not parts:
        return {k: hidden.new_zeros(0, dtype=torch.bool if k == "correct" else torch.float32) for k in names}
    return {k: torch.cat([p[j] for p in parts]) for j, k in enumerate(names)}


def head_logprobs(hidden: torch.Tensor, head, tokens: torch.Tensor, temperature: float = 1.0,
                  with_entropy: bool = False, entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`logprobs_from_logits` (and :func:`entropy_from_logits`) of ``head(hidden) / temperature``
    over chunks of rows: :func:`head_token_stats`.

    Shape:
        hidden: (N, H), tokens: (N,) -> (N,) and (N,) or None, float32.
    """
    out = head_token_stats(hidden, head, tokens, temperature, with_entropy, entropy_grad)
    return out["logprobs"], out.get("entropy")


def sft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    num_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy on the labelled (response) tokens: stage 1 of the seeds.

    ``labels`` are aligned with the input ids (as in transformers); the shift happens here:
    ``logits[:, t]`` predicts ``labels[:, t + 1]``. Positions equal to ``ignore_index``
    (prompt and padding) do not count. With ``num_tokens`` (the labelled-token count of the
    whole accumulated batch) the loss is a sum over this part divided by it, so accumulation
    steps add up to the full-batch mean.

    Shape:
        logits: (B, T, V), labels: (B, T) -> scalar.

    Returns:
        ``(loss, metrics)`` with ``num_tokens`` and token ``accuracy``.
    """
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != ignore_index
    nll = -logprobs_from_logits(logits, labels.masked_fill(~mask, 0))
    maskf = mask.float()
    denom = maskf.sum().clamp(min=1.0) if num_tokens is None else num_tokens
    loss = (nll * maskf).sum() / denom
    with torch.no_grad():
        correct = (logits.argmax(-1) == labels).float()
        metrics = {"num_tokens": maskf.sum(), "accuracy": masked_mean(correct, maskf)}
    return loss, metrics
