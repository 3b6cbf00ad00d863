"""HF ``generate`` behind the Rollout interface."""

from __future__ import annotations

from typing import Iterable

import torch
from transformers import GenerationConfig

from rlhf.data.collate import pad
from rlhf.rollout.base import RolloutBatch, SamplingParams, response_mask_from_ids


class HFRollout:
    """Sample with transformers' ``generate``: KV cache, left padding, stop when all are done."""

    def __init__(self, model, pad_id: int, eos_id: int, device=None):
        self.model = model  # the live policy (peft or plain causal LM), shared with training
        self.pad_id, self.eos_id = pad_id, eos_id
        self.device = device

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to do: generation runs on the very module being trained."""

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        prompts = [p for p in prompts for _ in range(params.num_samples)]
        device = self.device or next(self.model.parameters()).device
        prompt_ids = pad(prompts, self.pad_id, side="left").to(device)  # (B, P)
        prompt_mask = pad([[1] * len(p) for p in prompts], 0, side="left").to(device)
        greedy = params.temperature == 0
        gen_config = GenerationConfig(
            do_sample=not greedy, temperature=None if greedy else params.temperature,
            # 0 and 1.0, not None: None lets generate fill in the model's defaults (top_k=50), which would
            # sample from a truncated distribution while the losses score the full softmax.
            top_p=1.0 if greedy else params.top_p, top_k=0 if greedy else (params.top_k or 0),
            max_new_tokens=params.max_new_tokens, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
            use_cache=True,
        )
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen_config)
        finally:
            self.model.train(was_training)
        response_ids = out[:, prompt_ids.shape[1]:]  # (B, R), R >= 1
        response_mask, finished = response_mask_from_ids(response_ids, self.eos_id)
        response_ids = response_ids.masked_fill(response_mask == 0, self.pad_id)
        return RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask, finished)
