"""Per-token statistics of a language model's logits: log-probabilities, entropy, SFT loss."""

from __future__ import annotations

import torch

from rlhf.algos.stats import masked_mean

# Rows of (B*T, V) processed at once: bounds the temporary of logsumexp/softmax to
# _CHUNK_ELEMENTS floats instead of a second full (B, T, V) copy.
_CHUNK_ELEMENTS = 1 << 24
# The fused backward of a linear head (_LinearHeadLogprobs) takes this many chunks' rows at once: it holds
# no (V, H) weight gradient per chunk (545 MB at a vocabulary of 151,936), so its chunks may be larger, and
# its matmuls are then less starved of rows (about 110 rows a chunk at that vocabulary, 440 fused).
_FUSED_CHUNKS = 4


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


def _logprobs_and_lse(z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`logprobs_from_logits` of rows that fit one chunk, and their log-partition: the same operations.

    Shape:
        z: (n, V), t: (n,) -> (n,) and (n,), float32.
    """
    lse = torch.logsumexp(z.float(), dim=-1)
    return z.gather(-1, t[:, None]).squeeze(-1).float() - lse, lse


def _entropy_given_lse(z: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """:func:`entropy_from_logits` of rows that fit one chunk, their logsumexp already taken: the same numbers."""
    z = z.float()
    return lse - (torch.softmax(z, dim=-1) * z).sum(-1)


class _LinearHeadLogprobs(torch.autograd.Function):
    """Log-probs of ``tokens`` under ``linear(hidden, weight, bias) / temperature`` over chunks of rows, for a
    float32 ``nn.Linear`` head, with the metrics of :func:`head_token_stats` (entropy, argmax hit) as outputs
    without gradient.

    The forward keeps no logits, only each row's log-partition. The backward recomputes one chunk's
    logits at a time and forms their gradient with the operations autograd uses for
    ``gather - logsumexp`` (over the same chunks, the hidden states' gradient is the same to the bit);
    it adds each chunk's weight gradient into one ``(V, H)`` buffer in place, where activation
    checkpointing (the general path) lets autograd write a new ``(V, H)`` gradient per chunk and add
    it to the last: at a vocabulary of 151,936, 545 MB written, read and added per chunk of 110 rows.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature: float, step: int, entropy: bool, correct: bool):
        outs: dict[str, list[torch.Tensor]] = {"logprobs": [], "lse": [], "entropy": [], "correct": []}
        for i in range(0, hidden.shape[0], step):
            z = torch.nn.functional.linear(hidden[i : i + step], weight, bias)
            if temperature > 0 and temperature != 1.0:
                z = z / temperature
            t = tokens[i : i + step]
            lp, lse = _logprobs_and_lse(z, t)
            outs["logprobs"].append(lp)
            outs["lse"].append(lse)
            if entropy:
                outs["entropy"].append(_entropy_given_lse(z, lse))
            if correct:
                outs["correct"].append(z.argmax(-1) == t)
        lse = torch.cat(outs["lse"])
        ctx.save_for_backward(hidden, weight, bias, tokens, lse)
        ctx.temperature, ctx.step = temperature, step
        extra = [torch.cat(outs[k]) for k in ("entropy", "correct") if outs[k]]
        ctx.mark_non_differentiable(*extra)
        return (torch.cat(outs["logprobs"]), *extra)

    @staticmethod
    def backward(ctx, grad_logprobs, *_):
        hidden, weight, bias, tokens, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        temperature, step = ctx.temperature, ctx.step
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = grad_b = None
        for i in range(0, hidden.shape[0], step):
            h, t, g = hidden[i : i + step], tokens[i : i + step], grad_logprobs[i : i + step]
            z = torch.nn.functional.linear(h, weight, bias)
            if temperature > 0 and temperature != 1.0:
                z = z / temperature
            # d(gather(z, t) - logsumexp(z)) / dz, as autograd forms it: -g * exp(z - lse), plus g at the token.
            gz = (z - lse[i : i + step, None]).exp_().mul_(-g[:, None]).scatter_add_(-1, t[:, None], g[:, None])
            if temperature > 0 and temperature != 1.0:
                gz = gz / temperature
            if need_h:
                torch.mm(gz, weight, out=grad_h[i : i + step])
            if need_w:
                grad_w = gz.t().mm(h) if grad_w is None else grad_w.addmm_(gz.t(), h)  # (V, H), in place
            if need_b:
                grad_b = gz.sum(0) if grad_b is None else grad_b.add_(gz.sum(0))
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _linear_fast_path(hidden: torch.Tensor, head, entropy_with_grad: bool) -> bool:
    """Whether :class:`_LinearHeadLogprobs` computes what the general path does: a plain float32
    ``nn.Linear`` head, no autocast, and no gradient wanted through the entropy."""
    return (type(head) is torch.nn.Linear and head.weight.dtype == torch.float32 and hidden.dtype == torch.float32
            and not entropy_with_grad and not torch.is_autocast_enabled(hidden.device.type))


def head_token_stats(hidden: torch.Tensor, head, tokens: torch.Tensor, temperature: float = 1.0,
                     entropy: bool = False, entropy_grad: bool = True, correct: bool = False) -> dict[str, torch.Tensor]:
    """Per-row statistics of ``head(hidden) / temperature`` without the whole ``(N, V)`` logits:
    the LM head runs over chunks of rows, so one chunk's logits are alive at a time, in either pass
    (the idea of chunked and fused LM-head losses).

    Always ``"logprobs"`` (:func:`logprobs_from_logits` of ``tokens``); ``entropy=True`` adds
    ``"entropy"`` (:func:`entropy_from_logits`), ``correct=True`` adds ``"correct"`` (whether the
    argmax is the token, a metric). ``head`` maps hidden states to logits (the LM head, with any
    softcapping). With ``entropy_grad=False`` the entropy is a metric without gradient, computed from
    the log-partition the log-probs took (the same numbers), so the backward pass recomputes none of it.

    Under autograd, rows that fit one chunk are computed once and kept for the backward pass; more
    rows are recomputed a chunk at a time in the backward pass: for a float32 ``nn.Linear`` head by
    :class:`_LinearHeadLogprobs`, over chunks ``_FUSED_CHUNKS`` times larger (the weight's gradient
    summed in place; matmuls of another shape round differently, so the numbers equal the
    checkpointed chunks' within float32 rounding, 1e-6 in the tests), else by activation
    checkpointing. A recomputed chunk whose tensors the backward never reads would stay alive until
    the graph is freed, hence the entropy without gradient above (about 2.4 GB for GRPO's 2,048
    response tokens at a vocabulary of 151,936, measured with ``benchmarks/compare.py``).

    Shape:
        hidden: (N, H), tokens: (N,) -> each (N,), float32 (``correct``: bool).
    """
    from torch.utils.checkpoint import checkpoint

    def chunk(h: torch.Tensor, t: torch.Tensor):
        z = head(h)
        if temperature > 0 and temperature != 1.0:
            z = z / temperature
        lp, lse = _logprobs_and_lse(z, t)
        out = [lp]
        if entropy and entropy_grad and torch.is_grad_enabled():
            out.append(entropy_from_logits(z))
        elif entropy:
            with torch.no_grad():
                out.append(_entropy_given_lse(z, lse))
        with torch.no_grad():
            out += [z.argmax(-1) == t] if correct else []
        return tuple(out)

    names = ["logprobs"] + ["entropy"] * entropy + ["correct"] * correct
    with torch.no_grad():
        vocab = head(hidden[:0]).shape[-1]
    starts, step = _row_chunks(hidden.shape[0], vocab)
    if not starts:
        return {k: hidden.new_zeros(0, dtype=torch.bool if k == "correct" else torch.float32) for k in names}
    grad = torch.is_grad_enabled() and hidden.requires_grad
    if grad and len(starts) > 1 and _linear_fast_path(hidden, head, entropy and entropy_grad):
        parts = _LinearHeadLogprobs.apply(hidden, head.weight, head.bias, tokens, temperature, step * _FUSED_CHUNKS,
                                          entropy, correct)
        return dict(zip(names, parts))
    if len(starts) == 1 or not grad:  # one chunk is kept whole for the backward pass: nothing to recompute
        parts = [chunk(hidden[i : i + step], tokens[i : i + step]) for i in starts]
    else:
        parts = [checkpoint(chunk, hidden[i : i + step], tokens[i : i + step], use_reentrant=False) for i in starts]
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
