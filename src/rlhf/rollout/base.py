"""The Rollout interface and the batch it returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

import torch


@dataclass
class SamplingParams:
    """How to sample: the knobs every engine understands."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    num_samples: int = 1
    """Samples per prompt (GRPO's G); they come out contiguous."""


@dataclass
class RolloutBatch:
    """Prompts and sampled responses, ready for the scoring forwards.

    Shapes: ``prompt_ids``/``prompt_mask`` (B, P), left-padded; ``response_ids``/
    ``response_mask`` (B, R), right-padded, the mask 1 up to and including the first EOS;
    ``finished`` (B,), True where an EOS was produced.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    finished: torch.Tensor

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)  # (B, P + R)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def to(self, device) -> "RolloutBatch":
        return RolloutBatch(*(t.to(device) for t in (self.prompt_ids, self.prompt_mask, self.response_ids,
                                                     self.response_mask, self.finished)))


def response_mask_from_ids(response_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of real response tokens (through the first EOS) and whether an EOS came.

    Shape:
        response_ids: (B, R) -> mask (B, R) long, finished (B,) bool.
    """
    is_eos = response_ids == eos_id
    finished = is_eos.any(dim=1)
    # Tokens strictly after the first EOS are padding: count EOS seen before each position.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (eos_before == 0).long(), finished


class Rollout(Protocol):
    """What a generation engine must offer the recipes."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        """Sample ``params.num_samples`` responses per prompt (contiguous)."""

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Receive the policy's updated weights (a no-op when the engine shares the module)."""
