"""Log-probs for the recipes: of each response token (the RL loops), padded or padding-free, and of
each reply of a preference pair (DPO, and the monitor's implicit preference accuracy).

``response_logprobs`` reads them off logits; ``model_response_logprobs`` runs a model on a
prompt + response batch; ``packed_response_logprobs`` does the same on a padding-free layout
(:mod:`rlhf.models.packing`); ``policy_forward`` gives PPO's log-probs and values; ``choose_layout`` decides, once per run, whether a recipe
may use one on the model at hand. ``pair_logps`` and ``all_pair_logps`` sum a reply's log-probs.
"""

from __future__ import annotations

import torch

from rlhf.algos import logprobs_from_logits
from rlhf.models import causal_logits, packed_logits
from rlhf.training.loop import pass_batches, to_device


def response_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, prompt_len: int, temperature: float = 1.0,
                      with_entropy: bool = False, entropy_grad: bool = True):
    """Log-probs (and entropy) of the response tokens of a prompt + response batch.

    ``logits[:, t]`` predicts token ``t + 1``, so positions ``P-1 .. L-2`` score the response:
    the last ``R + 1`` positions, which is all that ``causal_logits(..., keep=R + 1)`` computes.
    Logits are divided by the sampling temperature, as when the response was sampled.
    ``entropy_grad=False``: the entropy is a metric, without gradient.

    Shape:
        logits: (B, P + R, V) or (B, R + 1, V), input_ids: (B, P + R) -> (B, R) and (B, R) or None.
    """
    from rlhf.algos import entropy_from_logits, logprobs_from_logits

    logits = logits[:, -(input_ids.shape[1] - prompt_len + 1) : -1]
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = entropy_from_logits(logits) if with_entropy else None
    return logprobs_from_logits(logits, input_ids[:, prompt_len:]), entropy


def model_response_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                            temperature: float = 1.0, with_entropy: bool = False, entropy_grad: bool = True):
    """:func:`response_logprobs` of a causal LM (or a ``Reference``) run on the batch, with the LM
    head computed on the ``R`` positions that score the response only, a chunk of them at a time
    (:func:`rlhf.algos.head_logprobs`; on models whose head cannot be split off, the ``R + 1``
    positions' logits at once).

    Shape:
        input_ids, attention_mask: (B, P + R) -> (B, R) and (B, R) or None.
    """
    from rlhf.algos import head_logprobs
    from rlhf.models import causal_hidden, causal_logits

    split = causal_hidden(model, input_ids, attention_mask)
    if split is not None:
        hidden, head = split
        B, R = input_ids.shape[0], input_ids.shape[1] - prompt_len
        h = hidden[:, prompt_len - 1 : -1].reshape(B * R, -1)
        logprobs, entropy = head_logprobs(h, head, input_ids[:, prompt_len:].reshape(-1), temperature, with_entropy,
                                          entropy_grad)
        return logprobs.view(B, R), (entropy.view(B, R) if with_entropy else None)
    keep = input_ids.shape[1] - prompt_len + 1
    return response_logprobs(causal_logits(model, input_ids, attention_mask, keep), input_ids, prompt_len, temperature,
                             with_entropy, entropy_grad)


def packed_response_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                             temperature: float = 1.0, with_entropy: bool = False, max_row_tokens: int = 1024,
                             layout: str = "shared", entropy_grad: bool = True):
    """:func:`model_response_logprobs` on a padding-free layout (:mod:`rlhf.models.packing`).

    ``layout="shared"``: the rows that share a prompt (GRPO's G samples of it) encode it once
    (:func:`rlhf.data.pack_shared_prefixes`). Each prompt's group gets a row of its own (under a
    dense mask, rows holding several groups cost more in attention than they save in padding;
    measured in ``BENCHMARKS.md``). A group longer than ``max_row_tokens`` is cut into rows that
    each repeat the prompt, so no row's mask exceeds ``max(max_row_tokens, P + R)`` squared.
    ``layout="packed"``: every prompt + response is its own sequence, packed into rows of up
    to ``max_row_tokens`` with restarting positions (flash attention's layout). The same numbers
    up to float rounding, on fewer tokens; positions off the response mask hold 0.

    Shape:
        input_ids, attention_mask: (B, P + R) -> (B, R) and (B, R) or None.
    """
    from rlhf.algos import entropy_from_logits, head_logprobs, logprobs_from_logits
    from rlhf.data import pack_shared_prefixes
    from rlhf.models import packed_logits

    B, P = input_ids.shape[0], prompt_len
    ids, keep = input_ids.tolist(), attention_mask.bool().tolist()
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i in range(B):
        by_prompt.setdefault(tuple(t for t, k in zip(ids[i][:P], keep[i][:P]) if k), []).append(i)
    groups: list[tuple[list[int], list[list[int]]]] = []
    order: list[int] = []  # the batch row of each packed response, in packing order
    shared = layout == "shared"
    for prompt, rows in by_prompt.items():
        chunk: list[list[int]] = []
        size = len(prompt)
        for i in rows:
            response = [t for t, k in zip(ids[i][P:], keep[i][P:]) if k]
            if chunk and (not shared or size + len(response) > max_row_tokens):
                groups.append((list(prompt), chunk))
                chunk, size = [], len(prompt)
            chunk.append(response)
            size += len(response)
            order.append(i)
        groups.append((list(prompt), chunk))
    packed = pack_shared_prefixes(groups, 0, row_tokens=0 if shared else max_row_tokens)
    packed = {k: v.to(input_ids.device) for k, v in packed.items()}
    where = (torch.tensor(order, device=input_ids.device)[packed["owner"]], packed["col"])
    targets = packed["input_ids"].reshape(-1)[packed["tgt"]]

    def unpack(per_token: torch.Tensor) -> torch.Tensor:  # (K,) -> (B, R), zeros off the mask
        return per_token.new_zeros(B, input_ids.shape[1] - P).index_put(where, per_token)

    split = packed_logits(model, packed, hidden=True)
    if split is not None:  # the LM head over chunks of the response positions
        hidden, head = split
        logprobs, entropy = head_logprobs(hidden.reshape(-1, hidden.shape[-1])[packed["src"]], head, targets,
                                          temperature, with_entropy, entropy_grad)
        return unpack(logprobs), unpack(entropy) if with_entropy else None
    logits = packed_logits(model, packed)
    logits = logits.reshape(-1, logits.shape[-1])[packed["src"]]  # (K, V): one row per response token
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logprobs = unpack(logprobs_from_logits(logits, targets))
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        return logprobs, unpack(entropy_from_logits(logits)) if with_entropy else None


def policy_forward(model, critic, input_ids, attention_mask, prompt_len: int, temperature: float,
                   with_entropy: bool = False):
    """Log-probs, values and entropy of the response tokens under PPO's policy (a
    ``PolicyWithValueHead``, or a causal LM and its separate ``critic``). The *same* function serves
    the rollout's forward (no grad) and the update's, so the first ratio is exactly 1.

    Shape:
        input_ids, attention_mask: (B, P + R) -> logprobs, values, entropy: (B, R).
    """
    if critic is None:
        logits, values = model(input_ids, attention_mask)  # one pass: actor and critic heads
    else:
        logits, values = causal_logits(model, input_ids, attention_mask), critic(input_ids, attention_mask)
    logprobs, entropy = response_logprobs(logits, input_ids, prompt_len, temperature, with_entropy)
    return logprobs, values[:, prompt_len - 1 : -1].float(), entropy


def choose_layout(model, wanted: bool, kind: str, log=print, mixed_precision: bool = False) -> str | None:
    """The padding-free layout a recipe uses on ``model``, said once in the log.

    ``kind`` is what the recipe would like: ``"shared"`` (a prompt encoded once for several
    replies) or ``"packed"`` (whole sequences side by side). Returns ``"shared"``,
    ``"packed"`` or None (padded batches): a layout is used only where the model supports it
    and a probe gives the padded batch's log-probs (:func:`rlhf.models.check_packing`).
    Flash attention gets ``"packed"`` for a ``"shared"`` request: it takes no custom mask.
    Call it where the recipe will run the model (its device, under its autocast), and say
    whether that is ``mixed_precision``: the probe's tolerance is then half precision's.
    """
    from rlhf.models import check_packing, default_tolerance, packing_support

    if not wanted:
        return None
    support, why = packing_support(model)
    if support is None:
        log(f"padding-free batches: off ({why}); batches are padded")
        return None
    layout = "packed" if kind == "packed" or support == "packed" else "shared"
    tolerance = default_tolerance(model, mixed_precision)
    try:
        error = check_packing(model, layout)
    except Exception as e:  # a kernel that cannot run the layout at all: padded batches, said why
        log(f"padding-free batches: off: the {layout} probe failed on this model ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); batches are padded")
        return None
    if not error <= tolerance:
        log(f"padding-free batches: off: on this model the {layout} layout's log-probs differ from the padded "
            f"batch's by {error:.3g} of their spread (tolerance {tolerance:g}); batches are padded")
        return None
    log(f"padding-free batches: {layout} layout ({why}; probe within {error:.1g} of the padded batch)")
    return layout


# ---- preference pairs: one log-prob per reply (DPO, and the monitor's implicit preference accuracy) ----

def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log pi(y_t | x, y_<t) over each row's response tokens.

    Shape:
        logits: (N, L, V), input_ids, response_mask: (N, L) -> (N,).
    """
    lp = logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])  # (N, L-1)
    return (lp * response_mask[:, 1:]).sum(-1)


def pair_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected log-probabilities from one forward. Shapes: (B,), (B,).

    A shared-prompt batch (``collate_preference_shared``) encodes each prompt once; a
    concatenated one (``collate_preference``) holds chosen rows then rejected rows.
    """
    from rlhf.algos import head_logprobs
    from rlhf.models import causal_hidden

    if "src" not in batch:
        ids, response = batch["input_ids"], batch["response_mask"]
        split = causal_hidden(model, ids, batch["attention_mask"])
        if split is not None:  # the LM head over chunks of the positions that score a reply
            hidden, head = split
            rows, cols = response[:, 1:].nonzero(as_tuple=True)
            lp = head_logprobs(hidden[rows, cols], head, ids[rows, cols + 1])[0]
            logps = lp.new_zeros(ids.shape[0]).index_add_(0, rows, lp)
        else:
            logps = sequence_logps(causal_logits(model, ids, batch["attention_mask"]), ids, response)
        half = logps.shape[0] // 2
        return logps[:half], logps[half:]
    targets = batch["input_ids"].reshape(-1)[batch["tgt"]]
    split = packed_logits(model, batch, hidden=True)
    if split is not None:
        hidden, head = split
        lp = head_logprobs(hidden.reshape(-1, hidden.shape[-1])[batch["src"]], head, targets)[0]
    else:
        logits = packed_logits(model, batch)
        lp = logprobs_from_logits(logits.reshape(-1, logits.shape[-1])[batch["src"]][None], targets[None])[0]
    B = int(batch["n_pairs"])
    sums = torch.zeros(2 * B, device=lp.device, dtype=lp.dtype).index_add_(0, batch["owner"], lp)
    return sums[:B], sums[B:]


def pair_lengths(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens scored in each chosen and rejected reply (what :func:`pair_logps` sums over).

    Shapes: (B,), (B,).
    """
    if "src" not in batch:
        n = batch["response_mask"][:, 1:].sum(-1).float()
        half = n.shape[0] // 2
        return n[:half], n[half:]
    B = int(batch["n_pairs"])
    n = torch.bincount(batch["owner"], minlength=2 * B).float()
    return n[:B], n[B:]


def count_pairs(batch: dict) -> int:
    return int(batch["n_pairs"]) if "n_pairs" in batch else batch["input_ids"].shape[0] // 2


@torch.no_grad()
def all_pair_logps(accelerator, model, examples: list[dict], collate, batch_size: int,
                   with_lengths: bool = False):
    """(n, 2): chosen and rejected log-probs of every example under ``model``, in one pass;
    with ``with_lengths`` also (n, 2) of their token counts (:func:`pair_lengths`)."""
    out, lengths = torch.zeros(len(examples), 2), torch.zeros(len(examples), 2)
    for idx, k in pass_batches(len(examples), accelerator.process_index, accelerator.num_processes, batch_size):
        batch = to_device(collate([examples[j] for j in idx]), accelerator.device)
        out[idx[:k]] = torch.stack(pair_logps(model, batch), dim=1).float().cpu()[:k]
        lengths[idx[:k]] = torch.stack(pair_lengths(batch), dim=1).cpu()[:k]
    if accelerator.num_processes > 1:
        out = accelerator.reduce(out.to(accelerator.device), reduction="sum").cpu()
        lengths = accelerator.reduce(lengths.to(accelerator.device), reduction="sum").cpu()
    return (out, lengths) if with_lengths else out


def response_divergence(student, teachers: list, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        prompt_len: int, beta: float = 1.0, temperature: float = 1.0, top_k: int = 0,
                        vocab: int | None = None) -> dict[str, torch.Tensor]:
    """Per response token: the student's divergence from its row's teacher (:func:`rlhf.algos.generalized_jsd`,
    with gradient to the student) and, as detached metrics, the reverse KL(student || teacher) over the
    full vocabulary, both models' log-probs of the token, the student's entropy and (``top_k``) the
    teacher's mass on its top k.

    ``teachers`` is ``[(model, rows)]``: each teacher scores the rows (a long tensor) routed to it. The
    student runs one forward over the whole batch (so every process makes the same collective calls),
    each teacher one over its rows. Both LM heads run over chunks of positions
    (:func:`rlhf.models.causal_hidden`), each chunk recomputed in the backward pass, so one chunk's
    ``(rows, V)`` logits of each model are alive at a time; models whose head cannot be split off give
    their whole response logits at once. ``vocab`` (the tokenizer's size) cuts both heads' padded rows.

    Shape:
        input_ids, attention_mask: (B, P + R) -> each (B, R).
    """
    from torch.utils.checkpoint import checkpoint

    from rlhf.algos import entropy_from_logits, generalized_jsd, logprobs_from_logits, teacher_top_k_mass
    from rlhf.algos.tokens import _row_chunks
    from rlhf.models import causal_hidden, causal_logits

    B, R = input_ids.shape[0], input_ids.shape[1] - prompt_len
    tokens = input_ids[:, prompt_len:].reshape(-1)

    def hidden_and_head(model, ids, mask):
        split = causal_hidden(model, ids, mask)
        if split is not None:
            hidden, head = split
            return hidden[:, prompt_len - 1 : -1].reshape(ids.shape[0] * R, -1), head
        logits = causal_logits(model, ids, mask, R + 1)[:, :-1]
        return logits.reshape(ids.shape[0] * R, -1), (lambda z: z)

    h_s, head_s = hidden_and_head(student, input_ids, attention_mask)
    names = ["divergence", "reverse_kl", "student_logprobs", "teacher_logprobs", "entropy"] + ["top_k_mass"] * bool(top_k)
    out = {k: torch.zeros(B * R, device=input_ids.device) for k in names}
    for teacher, rows in teachers:
        if len(rows) == 0:
            continue
        rows = rows.to(input_ids.device)
        with torch.no_grad():
            h_t, head_t = hidden_and_head(teacher, input_ids[rows], attention_mask[rows])
        positions = (rows[:, None] * R + torch.arange(R, device=rows.device)).reshape(-1)

        def chunk(hs: torch.Tensor, ht: torch.Tensor, t: torch.Tensor, head_t=head_t):
            zs = head_s(hs)[..., :vocab]
            with torch.no_grad():
                zt = head_t(ht)[..., :vocab].float()
            divergence = generalized_jsd(zs, zt, beta, temperature, top_k)
            with torch.no_grad():
                zs_t, zt_t = zs.detach().float() / temperature, zt / temperature
                extra = (teacher_top_k_mass(zt_t, top_k),) if top_k else ()
                return (divergence, generalized_jsd(zs_t, zt_t, 1.0), logprobs_from_logits(zs_t, t),
                        logprobs_from_logits(zt_t, t), entropy_from_logits(zs_t), *extra)

        with torch.no_grad():
            width = head_s(h_s[:0]).shape[-1]
        starts, step = _row_chunks(len(positions), width)
        grad = torch.is_grad_enabled() and h_s.requires_grad
        for i in starts:
            pos = positions[i : i + step]
            args = (h_s[pos], h_t[i : i + step], tokens[pos])
            part = checkpoint(chunk, *args, use_reentrant=False) if grad else chunk(*args)
            for k, v in zip(names, part):
                out[k] = out[k].index_copy(0, pos, v.float())
    return {k: v.view(B, R) for k, v in out.items()}
