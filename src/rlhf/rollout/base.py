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
    ``finished`` (B,), True where an EOS was produced. A multi-turn episode's response holds the
    observations' tokens too: ``response_mask`` is 1 on every real token (attended to) and
    ``model_mask`` (B, R) 1 on the model's own tokens only (:mod:`rlhf.rollout.env`); ``loss_mask``
    is the one the losses use.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    finished: torch.Tensor
    model_mask: torch.Tensor | None = None

    @property
    def loss_mask(self) -> torch.Tensor:
        """Where the policy loss, KL and entropy count: the model's sampled tokens."""
        return self.response_mask if self.model_mask is None else self.model_mask

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)  # (B, P + R)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def _map(self, fn) -> "RolloutBatch":
        return RolloutBatch(*(fn(t) for t in (self.prompt_ids, self.prompt_mask, self.response_ids,
                                              self.response_mask, self.finished)),
                            model_mask=None if self.model_mask is None else fn(self.model_mask))

    def to(self, device) -> "RolloutBatch":
        return self._map(lambda t: t.to(device))

    def rows(self, index: torch.Tensor) -> "RolloutBatch":
        """The rows ``index`` (a long tensor or a bool mask of B)."""
        return self._map(lambda t: t[index])


def concat_batches(batches: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    """One batch of the rows of ``batches``: prompts left-padded and responses right-padded (``pad_id``,
    mask 0) to the widest, so every row keeps its tokens and positions.

    Shape:
        batches of (B_i, P_i) and (B_i, R_i) -> (sum B_i, max P_i) and (sum B_i, max R_i).
    """
    P = max(b.prompt_ids.shape[1] for b in batches)
    R = max(b.response_ids.shape[1] for b in batches)

    def pad(t: torch.Tensor, width: int, value: int, left: bool) -> torch.Tensor:
        extra = t.new_full((t.shape[0], width - t.shape[1]), value)
        return torch.cat([extra, t] if left else [t, extra], dim=1)

    models = None if all(b.model_mask is None for b in batches) else \
        torch.cat([pad(b.loss_mask, R, 0, False) for b in batches])
    return RolloutBatch(torch.cat([pad(b.prompt_ids, P, pad_id, True) for b in batches]),
                        torch.cat([pad(b.prompt_mask, P, 0, True) for b in batches]),
                        torch.cat([pad(b.response_ids, R, pad_id, False) for b in batches]),
                        torch.cat([pad(b.response_mask, R, 0, False) for b in batches]),
                        torch.cat([b.finished for b in batches]), model_mask=models)


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
