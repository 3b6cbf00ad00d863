"""Padding-free layouts, masked by transformers' own masking utilities.

Two layouts are run padding-free:

- **Packed sequences** (SFT ``--packing``; DPO and GRPO under flash attention): independent
  sequences side by side in one row, positions restarting at 0 for each. Under flash attention
  the model gets the ``position_ids`` and no mask, and transformers' varlen kernel finds the
  sequence boundaries itself. Other kernels get the block-diagonal mask below (transformers'
  own detection of restarting positions is not used: some models, OPT among them, fill in a
  padding mask first and so never run it).
- **Shared prefixes** (DPO's prompt with its chosen and rejected replies, GRPO's prompt with its
  G samples): ``[prefix | c1 | c2 | ...]`` where every continuation sees its prefix and itself
  only and continues the prefix's positions. No position-id convention expresses that, so the
  mask is built here, but by transformers' own mask interface for the model's kernel (what
  ``masking_utils.create_causal_mask`` calls), with the layout and'd to the causal mask function:
  transformers then writes it in the form the kernel takes (boolean for SDPA, additive in the
  model's dtype for eager, a ``BlockMask`` for flex). The layout's functions index tensors, so
  they are expanded by broadcasting, not vmap (equal masks: ``tests/test_zoo.py``).
  A continuation token sits further from its prefix in the row than in its own sequence, so a
  sliding window is applied on positions, through transformers' ``sliding_window_overlay``.
  Models whose layers mix full and sliding attention get one mask per layer type, as their
  forward accepts (``{"full_attention": ..., "sliding_attention": ...}``).

:func:`packing_support` says which of these a model can run, and :func:`check_packing` runs a
small probe layout both ways, so a recipe uses a padding-free layout only where it gives the
padded result on the model at hand (seen in ``tests/test_zoo.py`` across architectures).
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from rlhf.models.lora import Reference, causal_logits, eval_mode
from rlhf.models.wrappers import unwrap


def _inner(model) -> nn.Module:
    """The transformers model behind a :class:`Reference`, a DDP/FSDP or a peft wrapper."""
    model = unwrap(model) if not isinstance(model, Reference) else model
    if isinstance(model, Reference):
        model = model.model if model.model is not None else model.policy
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _decoder(model) -> nn.Module:
    inner = _inner(model)
    return inner.get_decoder() if hasattr(inner, "get_decoder") else inner


def _text_config(model):
    config = _inner(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@functools.lru_cache(maxsize=None)
def _takes_mask_per_layer_type(model_class: type) -> bool:
    """Whether the decoder's forward accepts ``{"full_attention": mask, "sliding_attention": mask}``."""
    for cls in model_class.__mro__:
        forward = cls.__dict__.get("forward")
        if forward is not None:
            try:
                return "isinstance(causal_mask_mapping := attention_mask, dict)" in inspect.getsource(forward)
            except (OSError, TypeError):
                return False
    return False


def layer_types(config) -> set[str]:
    """The kinds of attention layer a model config has (``full_attention``, ``sliding_attention``, or
    others such as ``chunked_attention``, ``linear_attention``): its ``layer_types``, else one kind
    from its ``sliding_window``."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(config, "layer_types", None)
    if types:
        return set(types)
    return {"sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"}


def packing_support(model) -> tuple[str | None, str]:
    """How ``model`` runs padding-free layouts: ``("shared", why)`` for both layouts,
    ``("packed", why)`` for packed sequences only (flash attention), ``(None, why)`` for neither."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    config = _text_config(model)
    attn = str(getattr(config, "_attn_implementation", None) or "eager")
    if ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(attn) is flash_attention_mask:  # takes no custom mask
        return "packed", f"{attn}: sequence boundaries from position ids"
    if getattr(config, "attention_chunk_size", None):
        return None, "chunked attention is not supported padding-free"
    other = layer_types(config) - {"full_attention", "sliding_attention"}
    if other:  # chunked, linear or recurrent layers: no attention mask keeps sequences apart there
        return None, f"layers of type {', '.join(sorted(other))} are not supported padding-free"
    if attn not in ALL_MASK_ATTENTION_FUNCTIONS:
        return None, f"attention implementation {attn!r} has no transformers mask function"
    if len(layer_types(config)) > 1 and not _takes_mask_per_layer_type(type(_decoder(model))):
        return None, f"{type(_decoder(model)).__name__} mixes layer types but takes one mask"
    return "shared", f"{attn}: masks from transformers' create_causal_mask"


def shared_prefix_mask(model, position_ids: torch.Tensor, segment_ids: torch.Tensor, branch_ids: torch.Tensor):
    """The attention mask of a shared-prefix layout, in the form ``model``'s kernel takes.

    Token ``q`` sees token ``kv`` when ``kv`` is not after it, both lie in the same segment
    (``segment_ids``), ``kv`` is in the prefix (``branch_ids == 0``) or in ``q``'s own
    continuation, and, on a sliding-window layer, ``kv``'s position is within the window of
    ``q``'s. Row padding (segment -1, branch -1) sees only padding, so no softmax row is empty.

    Shape:
        position_ids, segment_ids, branch_ids: (N, L) -> (N, 1, L, L) or a ``BlockMask``, or a
        dict of those by layer type for models that take one.
    """
    from transformers.masking_utils import (ALL_MASK_ATTENTION_FUNCTIONS, and_masks, causal_mask_function,
                                            create_causal_mask, sliding_window_overlay)

    config = _text_config(model)
    dtype = _inner(model).get_input_embeddings().weight.dtype
    (N, L), device = position_ids.shape, position_ids.device

    def layout(batch_idx, head_idx, q_idx, kv_idx):
        q_branch, kv_branch = branch_ids[batch_idx, q_idx], branch_ids[batch_idx, kv_idx]
        same = segment_ids[batch_idx, q_idx] == segment_ids[batch_idx, kv_idx]
        return same & ((kv_branch == 0) | (kv_branch == q_branch))

    def build(mask_fn):
        if not getattr(config, "is_causal", True):  # not a causal model: transformers' own path decides
            return create_causal_mask(config=config, inputs_embeds=torch.empty(N, L, 0, dtype=dtype, device=device),
                                      attention_mask=None, past_key_values=None, position_ids=None,
                                      and_mask_function=mask_fn, allow_is_causal_skip=False)
        # What create_causal_mask does for a batch with no cache and no padding mask, except that it
        # expands the mask functions by indexing (use_vmap=False), as transformers does for its own
        # ones: create_causal_mask vmaps any custom function, 30 ms a call on a 16 x 300 layout.
        # Ours index tensors only, so both expansions give the same mask (tests/test_zoo.py).
        return ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation](
            batch_size=N, q_length=L, kv_length=L, q_offset=0, kv_offset=0,
            mask_function=and_masks(causal_mask_function, mask_fn), attention_mask=None, allow_is_causal_skip=False,
            dtype=dtype, config=config, use_vmap=False, device=device)

    masks = {}
    for kind in layer_types(config):
        if kind == "sliding_attention":
            window = sliding_window_overlay(config.sliding_window)

            def in_window(batch_idx, head_idx, q_idx, kv_idx, window=window):
                return window(batch_idx, head_idx, position_ids[batch_idx, q_idx], position_ids[batch_idx, kv_idx])

            masks[kind] = build(and_masks(layout, in_window))
        else:
            masks[kind] = build(layout)
    if len(masks) == 1 and not _takes_mask_per_layer_type(type(_decoder(model))):
        return next(iter(masks.values()))
    return masks


def packed_logits(model, batch: dict[str, torch.Tensor], keep: int = 0, hidden: bool = False):
    """Logits of a padding-free batch from :func:`rlhf.data.pack_shared_prefixes` or
    ``collate_packed``: under its layout mask (:func:`shared_prefix_mask`), or, under flash
    attention, from its restarting ``position_ids`` alone. With ``hidden``, the last hidden
    states and the LM head instead (:func:`rlhf.models.lm_head.causal_hidden`), or None.

    Shape:
        batch["input_ids"]: (N, L) -> (N, L, V), or (N, L, H) and the head.
    """
    from rlhf.models.lm_head import causal_hidden

    ids, pos = batch["input_ids"], batch["position_ids"]
    if packing_support(model)[0] == "packed":
        # transformers' flash path reads sequence boundaries from positions only in a batch of one
        # row, so the rows go side by side (row padding, at position 0, is sequences of one token).
        if hidden:
            out = causal_hidden(model, ids.reshape(1, -1), None, pos.reshape(1, -1))
            return None if out is None else (out[0].reshape(ids.shape[0], ids.shape[1], -1), out[1])
        logits = causal_logits(model, ids.reshape(1, -1), None, 0, position_ids=pos.reshape(1, -1))
        logits = logits.reshape(ids.shape[0], ids.shape[1], -1)
        return logits[:, -keep:] if keep else logits
    mask = shared_prefix_mask(model, pos, batch["segment_ids"], batch["branch_ids"])
    if hidden:
        return causal_hidden(model, ids, mask, pos)
    return causal_logits(model, ids, mask, keep, position_ids=pos)


@torch.no_grad()
def check_packing(model, layout: str, tolerance: float | None = None) -> float:
    """Run a small probe both padded and padding-free; return the largest difference of the
    response log-probs, relative to their spread. ``layout`` is ``"shared"`` or ``"packed"``.

    The probe has two prompts, one with two continuations, in two rows with row padding, one row
    holding two sequences in the packed layout, so a continuation that saw another one, or
    another sequence, would show. Where the model has a short sliding
    window the probe is longer than it, so a window applied on row indices would show too.
    """
    from rlhf.data import pack_shared_prefixes, pad

    config = _text_config(model)
    device = _inner(model).get_input_embeddings().weight.device
    window = getattr(config, "sliding_window", None) or 0
    n = window + 3 if 0 < window < 64 else 6
    gen = torch.Generator().manual_seed(0)
    vocab = int(config.vocab_size)

    def rand(k: int) -> list[int]:
        return torch.randint(3, vocab, (k,), generator=gen).tolist()

    groups = [(rand(n), [rand(n + 1), rand(3)]), (rand(2), [rand(n + 2)])]
    if layout == "packed":
        groups = [(p, [c]) for p, cs in groups for c in cs]
    # Two rows, one holding two sequences (packed) and row padding: all of it must stay apart.
    batch = {k: v.to(device) for k, v in pack_shared_prefixes(groups, 0, row_tokens=2 * n + 7).items()}
    with eval_mode(_inner(model)):
        logits = packed_logits(model, batch).float()
        got = torch.log_softmax(logits.reshape(-1, logits.shape[-1])[batch["src"]], -1)  # (K, V)
        seqs = [p + c for p, cs in groups for c in cs]
        ids = pad(seqs, 0).to(device)
        mask = pad([[1] * len(s) for s in seqs], 0).to(device)
        full = torch.log_softmax(causal_logits(model, ids, mask).float(), -1)  # (S, L, V)
    prefix_len = torch.tensor([len(p) for p, cs in groups for _ in cs], device=device)
    owner = batch["owner"]  # continuation of each packed token, in the order of ``seqs``
    want = full[owner, prefix_len[owner] - 1 + batch["col"]]  # (K, V)
    spread = (want - want.mean(-1, keepdim=True)).abs().max().clamp(min=1e-12)
    return float((got - want).abs().max() / spread)


def default_tolerance(model, mixed_precision: bool = False) -> float:
    """What :func:`check_packing` accepts: float32 rounding, or half-precision rounding (half
    weights, or float32 weights run under bf16/fp16 autocast)."""
    dtype = _inner(model).get_input_embeddings().weight.dtype
    return 1e-3 if dtype == torch.float32 and not mixed_precision else 5e-2
