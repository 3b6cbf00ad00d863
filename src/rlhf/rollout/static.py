"""A static-KV-cache rollout engine whose decode step is replayed as a CUDA graph.

On a GPU a decode step of a small model is a few hundred tiny kernels: launching them from
Python costs more than running them, so ``generate`` and :class:`HFRollout`'s loop leave the
card mostly idle. :class:`StaticRollout` removes that overhead the way vLLM and transformers'
own compiled path do:

* transformers' ``StaticCache`` holds the keys and values at fixed addresses, one slot per
  position, so every decode step has the same shapes and touches the same memory;
* one decode step (embedding, every layer, the LM head) is captured once as a CUDA graph per
  (batch size, cache length) and replayed each step: one launch instead of hundreds;
* attention of the single decode query reads each key/value head once: the query heads that
  share a key/value head (grouped-query attention) are laid out as that head's queries, in
  place of transformers' ``repeat_kv`` copy of the cache (:func:`decode_attention`).

It samples from exactly the model's distribution at the configured temperature: transformers'
temperature / top-k / top-p warpers in ``generate``'s order, then the exponential race
(``argmax p_i / E_i``, ``E_i ~ Exp(1)``, which picks token i with probability ``p_i``; vLLM's
sampler draws the same way). The draws differ from ``torch.multinomial``'s, so the tokens are
not ``generate``'s under a seed, but their law is (``tests/test_static_rollout.py``).

Status: the CPU path (eager, same cache, masks, attention and sampler) is tested here; the
CUDA-graph capture and the engine's speed on a GPU have not been run yet (no device was lent to
the task that wrote it), so ``--rollout-engine auto`` does not pick it on CUDA (``select.py``).

The engine runs its own inference copy of the policy (bf16 on CUDA, LoRA adapters merged), as
vLLM does, so the training copy can stay in fp32 under autocast. ``load_weights`` copies the
policy's updated weights into that copy *in place*, so the captured graphs read them on the
next replay; the recipes call it after every update. Without CUDA the same code runs eagerly
(no graphs), which is how the CPU tests check it.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from rlhf.data.collate import pad
from rlhf.rollout.base import RolloutBatch, SamplingParams, response_mask_from_ids
from rlhf.rollout.hf import HFRollout

ATTENTION = "rlhf_decode"


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """SDPA that, for one decode query, reads each key/value head once under grouped-query attention.

    The ``g = H / H_kv`` query heads of key/value head ``j`` are heads ``j*g .. j*g+g-1``
    (``repeat_kv``'s order); viewed as ``g`` queries of head ``j`` they attend to the same keys
    under the same mask, which is the same attention without copying the cache ``g`` times.
    Any other call (the prefill) goes to transformers' SDPA function unchanged.

    Shape:
        query (B, H, 1, D), key/value (B, H_kv, L, D), attention_mask (B, 1, 1, L) bool -> (B, 1, H, D).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, H, q_len, D = query.shape
    kv_heads = key.shape[1]
    if q_len != 1 or kv_heads == H:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.view(B, kv_heads, H // kv_heads, D), key, value, attn_mask=attention_mask, scale=scaling)  # (B, H_kv, g, D)
    return out.reshape(B, 1, H, D), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, decode_attention)


def merged_named_weights(policy: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights under plain transformers names, LoRA adapters folded in (W + B A s).

    Lazy: an engine that shares the live module (:class:`HFRollout`) never iterates it.
    """
    from rlhf.models import is_peft_model

    if not is_peft_model(policy):
        yield from policy.named_parameters()
        return
    from peft.tuners.lora import LoraLayer

    base = policy.get_base_model()
    lora = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for name, p in base.named_parameters():
        if "lora_" in name:
            continue
        owner, _, leaf = name.rpartition(".base_layer.")
        if owner in lora and leaf == "weight":
            m = lora[owner]
            delta = sum((m.get_delta_weight(a) for a in m.active_adapters if a in m.lora_A), torch.zeros_like(p))
            yield f"{owner}.weight", p.detach() + delta
        else:
            yield name.replace(".base_layer.", "."), p


def inference_copy(policy: torch.nn.Module, dtype: torch.dtype | None, device) -> torch.nn.Module:
    """A frozen plain-transformers copy of ``policy`` (LoRA merged) in ``dtype`` on ``device``."""
    from rlhf.models import is_peft_model

    # A peft copy folds its adapters into plain Linear weights.
    model = copy.deepcopy(policy).merge_and_unload() if is_peft_model(policy) else copy.deepcopy(policy)
    # accelerate's mixed precision wraps the prepared model's forward (autocast, outputs cast to
    # fp32) on the instance; the bf16 copy needs neither, so it gets its class's forward back.
    model.__dict__.pop("forward", None)
    model.__dict__.pop("_original_forward", None)
    model = model.to(device=device, dtype=dtype or next(policy.parameters()).dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    _register_attention()
    model.set_attn_implementation(ATTENTION)
    return model


def static_unsupported(config) -> str | None:
    """Why :class:`StaticRollout` cannot sample exactly from a model of ``config`` (None: it can).

    Its decode step attends to every filled cache slot under its own mask and its own attention
    function, so a sliding window, chunked attention or attention soft-capping would be lost.
    """
    from rlhf.models.packing import layer_types

    types = layer_types(config)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if types - {"full_attention"}:
        return f"layers of type {', '.join(sorted(types - {'full_attention'}))}"
    if getattr(config, "attention_chunk_size", None):
        return "chunked attention"
    if getattr(config, "attn_logit_softcapping", None):
        return "attention soft-capping"
    return None


@dataclass
class _Slot:
    """A static cache and the decode step's fixed input/output buffers (and its graph on CUDA)."""

    cache: object
    token: torch.Tensor  # (B, 1)
    position: torch.Tensor  # (B, 1)
    mask: torch.Tensor  # (B, 1, 1, L) bool: which cache slots each row attends to
    logits: torch.Tensor | None = None  # (B, V): the step's output (graph-owned on CUDA)
    graph: torch.cuda.CUDAGraph | None = None


class StaticRollout:
    """Sample with a static KV cache and a CUDA-graph decode step (see the module docstring).

    Args:
        policy: the live policy (a transformers causal LM, or a peft model of one).
        dtype: the engine copy's dtype (default: bf16 on CUDA, the policy's elsewhere).
        cuda_graphs: capture the decode step (default: on CUDA).
        length_bucket: cache lengths are rounded up to a multiple of this, so prompt batches of
            similar length reuse one captured graph.
        max_slots: captured (batch, length) shapes kept; the oldest is dropped beyond this.
    """

    def __init__(self, policy: torch.nn.Module, pad_id: int, eos_id: int, device=None, dtype: torch.dtype | None = None,
                 cuda_graphs: bool | None = None, length_bucket: int = 128, max_slots: int = 4):
        why = static_unsupported(policy.config)
        if why:
            raise ValueError(f"--rollout-engine static cannot sample this model exactly ({why}: its decode step "
                             "attends to the whole cache); use --rollout-engine loop")
        self.device = torch.device(device) if device is not None else next(policy.parameters()).device
        cuda = self.device.type == "cuda"
        self.model = inference_copy(policy, dtype or (torch.bfloat16 if cuda else None), self.device)
        self.params = dict(self.model.named_parameters())
        self.pad_id, self.eos_id = pad_id, eos_id
        self.cuda_graphs = cuda if cuda_graphs is None else cuda_graphs
        self.length_bucket, self.max_slots = length_bucket, max_slots
        self.slots: OrderedDict[tuple[int, int], _Slot] = OrderedDict()
        self.record_logprobs = False  # tests: keep each sampled token's log-prob under the engine
        self.last_logprobs: torch.Tensor | None = None

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the policy's weights into the engine copy in place (captured graphs keep their addresses).

        Names are transformers' (``merged_named_weights`` gives them for a peft policy).
        """
        for name, tensor in named_tensors:
            if name not in self.params:
                raise KeyError(f"load_weights: the engine's model has no parameter {name!r}")
            self.params[name].copy_(tensor)

    # ---- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        G, T = params.num_samples, params.max_new_tokens
        prompts = [p for p in prompts for _ in range(G)]  # the G samples of a prompt, contiguous
        ids = pad(prompts, self.pad_id, side="left").to(self.device)  # (B, P)
        prompt_mask = pad([[1] * len(p) for p in prompts], 0, side="left").to(self.device)
        B, P = ids.shape
        length = -(-(P + T) // self.length_bucket) * self.length_bucket
        slot = self._slot(B, length)
        for layer in slot.cache.layers:  # rewind the cache; stale slots stay masked out
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.zero_()
        # Prefill: causal over the real prompt tokens; a padding query sees itself only (no empty softmax row).
        slot_ids = torch.arange(length, device=self.device)
        causal = slot_ids[None, :] <= torch.arange(P, device=self.device)[:, None]  # (P, L)
        real = torch.cat([prompt_mask.bool(), prompt_mask.new_zeros(B, length - P).bool()], 1)  # (B, L)
        prefill_mask = (causal[None] & real[:, None]) | (slot_ids[None, None, :] == torch.arange(P, device=self.device)[None, :, None])
        positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=prefill_mask[:, None], position_ids=positions,
                            past_key_values=slot.cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # (B, V)
        slot.mask.copy_(real[:, None, None, :])
        slot.position.copy_(prompt_mask.sum(1, keepdim=True))
        warpers = self._warpers(params)
        finished = torch.zeros(B, dtype=torch.bool, device=self.device)
        tokens, logprobs = [], []
        for step in range(T):
            token, logprob = self._sample(logits, params.temperature, warpers)
            token = token.masked_fill(finished, self.pad_id)
            tokens.append(token)
            logprobs.append(logprob)
            finished |= token == self.eos_id
            # Checking for "all finished" waits for the GPU: do it every 8 steps only.
            if step == T - 1 or (step % 8 == 7 and bool(finished.all())):
                break
            slot.mask[:, 0, 0, P + step] = True
            slot.token.copy_(token[:, None])
            logits = self._step(slot)
            slot.position.add_(1)
        response_ids = torch.stack(tokens, dim=1)  # (B, R)
        response_mask, done = response_mask_from_ids(response_ids, self.eos_id)
        keep = max(1, int(response_mask.sum(1).max()))  # drop the all-padding columns of the last few steps
        response_ids, response_mask = response_ids[:, :keep], response_mask[:, :keep]
        if self.record_logprobs:
            self.last_logprobs = torch.stack(logprobs, dim=1)[:, :keep] * response_mask
        return RolloutBatch(ids, prompt_mask, response_ids.masked_fill(response_mask == 0, self.pad_id), response_mask,
                            done)

    def _sample(self, logits: torch.Tensor, temperature: float, warpers: list):
        """One token per row from softmax(warped logits): exact categorical sampling by exponential race."""
        if temperature == 0:
            token = logits.argmax(-1)
            return token, (torch.log_softmax(logits.float(), -1).gather(1, token[:, None])[:, 0]
                           if self.record_logprobs else None)
        scores = logits.float()
        for warp in warpers:
            scores = warp(None, scores)
        probs = torch.softmax(scores, dim=-1)  # (B, V)
        token = (probs / torch.empty_like(probs).exponential_()).argmax(-1)
        logprob = torch.log(probs.gather(1, token[:, None])[:, 0]) if self.record_logprobs else None
        return token, logprob

    _warpers = staticmethod(HFRollout._warpers)

    # ---- the decode step and its graph --------------------------------------------------------

    def _forward(self, slot: _Slot) -> torch.Tensor:
        return self.model(input_ids=slot.token, attention_mask=slot.mask, position_ids=slot.position,
                          past_key_values=slot.cache, use_cache=True).logits[:, -1]  # (B, V)

    def _step(self, slot: _Slot) -> torch.Tensor:
        if slot.graph is None:
            return self._forward(slot)
        slot.graph.replay()
        return slot.logits

    def _slot(self, batch: int, length: int) -> _Slot:
        key = (batch, length)
        if key in self.slots:
            self.slots.move_to_end(key)
            return self.slots[key]
        while len(self.slots) >= self.max_slots:
            self.slots.popitem(last=False)
        from transformers import StaticCache

        d = self.device
        slot = _Slot(StaticCache(config=self.model.config, max_cache_len=length),
                     torch.zeros(batch, 1, dtype=torch.long, device=d), torch.zeros(batch, 1, dtype=torch.long, device=d),
                     torch.ones(batch, 1, 1, length, dtype=torch.bool, device=d))
        if self.cuda_graphs:
            self._capture(slot)
        self.slots[key] = slot
        return slot

    def _capture(self, slot: _Slot) -> None:
        """Warm the step up on a side stream (allocating the cache), then capture it as a CUDA graph.

        A model whose forward cannot be captured (a host sync, a data-dependent branch) keeps
        the same static-cache step, run eagerly, and says so once.
        """
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(slot)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                slot.logits = self._forward(slot)
        except RuntimeError as e:
            warnings.warn(f"StaticRollout: the decode step could not be captured as a CUDA graph, running it "
                          f"eagerly ({str(e).splitlines()[0]})", stacklevel=2)
            self.cuda_graphs = False
            return
        slot.graph = graph
