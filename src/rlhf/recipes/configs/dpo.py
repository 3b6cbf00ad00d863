"""Options of ``rlhf dpo`` (:mod:`rlhf.recipes.dpo`): direct preference optimisation and its losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlhf.errors import UserError
from rlhf.training.config import TrainConfig


@dataclass
class Config(TrainConfig):
    """DPO options."""

    lr: float = 1e-6
    """Peak learning rate of AdamW."""
    ref_model: str | None = None
    """Reference model pi_ref: a directory or hub id with the policy's tokenizer (default: a frozen copy of
    --model; with --lora, the base with the adapters off)."""
    beta: float = 0.1
    """beta: strength of the implicit KL constraint (higher stays closer to the reference)."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "cdpo"] = "sigmoid"
    """DPO (sigmoid), IPO (on per-token mean log-probs, as TRL), SLiC hinge, robust DPO or conservative DPO
    (cdpo); TRL's names and meanings (README, "DPO losses")."""
    label_smoothing: float = 0.0
    """The assumed fraction of flipped labels, for robust (below 0.5) and cdpo only: TRL's sigmoid ignores it."""
    precompute_ref: bool = True
    """Compute the reference log-probs once before training and cache them beside the run."""
    log_samples: int = 4
    """Prompts (the first of --eval-data, else of --data) whose greedy completion by the policy goes to
    samples.jsonl at step 0 (before any update), at each --eval-every step with --eval-data, and at the end
    (0: none); rlhf report shows them."""
    sample_max_new_tokens: int = 128
    """Longest of those completions (and within --max-length)."""
    share_prompt: bool = True
    """Encode each prompt once for chosen and rejected, packed padding-free (flash attention: packed without
    sharing; off where a probe finds the model's result differs from the padded one)."""

    def check(self) -> None:
        super().check()
        if self.log_samples < 0 or self.sample_max_new_tokens < 1:
            raise UserError(f"--log-samples must be 0 (none) or more and --sample-max-new-tokens at least 1, got "
                            f"{self.log_samples} and {self.sample_max_new_tokens}")
        eps = self.label_smoothing
        if self.loss_type in ("sigmoid", "ipo", "hinge") and eps != 0:
            why = ("TRL 1.13's sigmoid ignores it too; conservative DPO is --loss-type cdpo, robust DPO --loss-type "
                   "robust" if self.loss_type == "sigmoid" else "it is cdpo's and robust's")
            raise UserError(f"--label-smoothing {eps} changes nothing with --loss-type {self.loss_type}: {why}")
        if self.loss_type == "robust" and not 0 <= eps < 0.5:
            raise UserError(f"--label-smoothing must be in [0, 0.5) for --loss-type robust, got {eps}")
        if self.loss_type == "cdpo" and not 0 <= eps <= 0.5:
            raise UserError(f"--label-smoothing must be in [0, 0.5] for --loss-type cdpo, got {eps}")
