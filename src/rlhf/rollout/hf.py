"""transformers models behind the Rollout interface: a lean sampling loop, or ``generate``."""

from __future__ import annotations

from typing import Iterable

import torch
from transformers import GenerationConfig

from rlhf.data.collate import pad
from rlhf.rollout.base import RolloutBatch, SamplingParams, response_mask_from_ids


def _renew_inference_buffers(model) -> None:
    """Buffers that a forward under ``inference_mode`` replaced (dynamic RoPE's ``inv_freq``, recomputed
    past the trained length) are inference tensors, which no later in-place update may touch: copy
    them back into ordinary tensors."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_inference():
                module._buffers[name] = buf.clone()


class HFRollout:
    """Sample from a transformers causal LM: KV cache, left padding, stop when all are done.

    By default a short decode loop over the model's forward does the sampling, with
    transformers' own ``DynamicCache`` and logits warpers (temperature, top-k, top-p, in
    ``generate``'s order). Each distinct prompt is encoded once and its cache copied for its
    ``num_samples`` responses. On this project's CPU benchmark the loop takes about a fifth
    less time per token than ``generate``, whose per-step bookkeeping (input preparation,
    stopping criteria, processor lists) costs as much as a small model's forward.
    ``use_generate=True`` (and any encoder-decoder model) calls ``model.generate`` instead,
    with our sampling parameters only: none of the model's ``generation_config`` defaults.
    """

    def __init__(self, model, pad_id: int, eos_id: int, device=None, use_generate: bool = False, synced: bool = False):
        self.model = model  # the live policy (peft or plain causal LM), shared with training
        self.pad_id, self.eos_id = pad_id, eos_id
        self.device = device
        self.use_generate = use_generate or bool(getattr(model.config, "is_encoder_decoder", False))
        # Weights sharded over the processes (FSDP, ZeRO-3): every forward is a collective, so every
        # process runs as many as the one with the longest response (generate's synced_gpus).
        self.synced = synced
        if synced and use_generate:
            try:  # torch >= 2.6 (FSDP2, which accelerate needs it for); an older torch has no FSDPModule to register
                from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
            except ImportError:
                FSDPModule = None
            if FSDPModule is not None and isinstance(model, FSDPModule):  # generate is not forward: FSDP2
                register_fsdp_forward_method(model, "generate")  # gathers the weights for it only when told

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to do: generation runs on the very module being trained."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        """Sampling runs under ``torch.inference_mode`` (about a tenth less time per token than under
        ``no_grad`` on CPU) and its outputs are cloned out of it, since the update's autograd graph
        refuses inference tensors, as are any buffers the forward replaced. Sharded weights (``synced``)
        sample under ``no_grad``: FSDP2 and ZeRO-3 gather parameters inside the forward, and those must
        stay usable by training."""
        device = self.device or next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            sample = self._generate if self.use_generate else self._decode
            with torch.no_grad() if self.synced else torch.inference_mode():
                out = sample(prompts, params, device)
            prompt_ids, prompt_mask, response_ids = (t.clone() for t in out)
        finally:
            self.model.train(was_training)
            _renew_inference_buffers(self.model)
        response_mask, finished = response_mask_from_ids(response_ids, self.eos_id)
        response_ids = response_ids.masked_fill(response_mask == 0, self.pad_id)
        return RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask, finished)

    def _decode(self, prompts: list[list[int]], params: SamplingParams, device):
        """Prefill each prompt once, then sample token by token until all rows end or the limit.

        Shapes: -> prompt_ids, prompt_mask (B*G, P), response_ids (B*G, R) with R >= 1.
        """
        from transformers import DynamicCache

        G = params.num_samples
        ids = pad(prompts, self.pad_id, side="left").to(device)  # (B, P)
        mask = pad([[1] * len(p) for p in prompts], 0, side="left").to(device)
        cache = DynamicCache(config=self.model.config)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                            past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # (B, V)
        if G > 1:  # the G samples of a prompt share its prefill
            cache.batch_repeat_interleave(G)
            ids, mask, logits = (t.repeat_interleave(G, dim=0) for t in (ids, mask, logits))
        warpers = self._warpers(params)
        position = mask.sum(1, keepdim=True)  # (B*G, 1): where the next token sits
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        tokens = []
        full_mask = mask
        for step in range(params.max_new_tokens):
            if params.temperature == 0:
                token = logits.argmax(-1)
            else:
                scores = logits.float()
                for warp in warpers:
                    scores = warp(None, scores)
                token = torch.multinomial(torch.softmax(scores, dim=-1), 1)[:, 0]
            token = token.masked_fill(finished, self.pad_id)
            tokens.append(token)
            finished |= token == self.eos_id
            if step == params.max_new_tokens - 1 or self._all_finished(finished):
                break
            full_mask = torch.cat([full_mask, full_mask.new_ones(full_mask.shape[0], 1)], dim=1)
            logits = self.model(input_ids=token[:, None], attention_mask=full_mask, position_ids=position,
                                past_key_values=cache, use_cache=True).logits[:, -1]
            position = position + 1
        return ids, mask, torch.stack(tokens, dim=1)

    def _all_finished(self, finished: torch.Tensor) -> bool:
        """Whether every row has ended, on every process when ``synced``."""
        done = finished.all()
        if self.synced and torch.distributed.is_initialized():
            done = done.to(torch.int32)
            torch.distributed.all_reduce(done, op=torch.distributed.ReduceOp.MIN)
        return bool(done)

    @staticmethod
    def _warpers(params: SamplingParams) -> list:
        """transformers' warpers, in ``generate``'s order; none at temperature 1 with top-k 0, top-p 1."""
        from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        out = []
        if params.temperature not in (0, 1.0):
            out.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            out.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            out.append(TopPLogitsWarper(params.top_p))
        return out

    def _generate(self, prompts: list[list[int]], params: SamplingParams, device):
        """``model.generate`` with our sampling parameters and nothing else.

        generate fills every field our ``GenerationConfig`` leaves unset (``None``) from the
        model's own ``generation_config``: a shipped ``repetition_penalty``, ``top_k=50``,
        ``no_repeat_ngram_size``, ``bad_words_ids``, ``min_new_tokens``... would then reshape
        the samples while the losses score the policy's softmax. So the model's config is
        replaced by a blank one for the call (and restored after), and ours is built from
        scratch: only temperature, top-k/top-p, length and the special tokens.
        """
        prompts = [p for p in prompts for _ in range(params.num_samples)]
        prompt_ids = pad(prompts, self.pad_id, side="left").to(device)  # (B, P)
        prompt_mask = pad([[1] * len(p) for p in prompts], 0, side="left").to(device)
        greedy = params.temperature == 0
        gen_config = GenerationConfig(
            do_sample=not greedy, temperature=None if greedy else params.temperature,
            # 0 and 1.0, not None: None lets generate fill in its defaults (top_k=50).
            top_p=1.0 if greedy else params.top_p, top_k=0 if greedy else (params.top_k or 0),
            max_new_tokens=params.max_new_tokens, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
            use_cache=True,
        )
        # peft wrappers read and write the generation_config of the HF model inside.
        inner = getattr(self.model, "policy", self.model)  # a policy with a value head samples from its policy
        base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
        own = base.generation_config
        base.generation_config = GenerationConfig()
        try:
            out = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen_config,
                                      synced_gpus=self.synced)
        finally:
            base.generation_config = own
        return prompt_ids, prompt_mask, out[:, prompt_ids.shape[1]:]
