"""Options of ``rlhf distill`` (:mod:`rlhf.recipes.distill`): on-policy distillation (GKD).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlhf.errors import UserError
from rlhf.training.config import TrainConfig


@dataclass
class Config(TrainConfig):
    """Distillation options (TRL's GKDConfig / DistillationConfig names: beta, lmbda, temperature, max_new_tokens
    or max_completion_length, teacher_model_name_or_path)."""

    teacher: str = ""
    """The teacher: a model directory or hub id, or several as NAME=PATH,NAME=PATH routed per prompt by the
    data's --teacher-column. Its tokenizer must be the student's."""
    teacher_column: str = "teacher"
    """The data column naming each prompt's teacher (with several teachers; every row needs one)."""
    lr: float = 1e-5
    """Peak learning rate of AdamW."""
    beta: float = 1.0
    """The divergence: 1 reverse KL(student || teacher) (on-policy distillation), 0 forward KL(teacher ||
    student), between them GKD's generalised JSD."""
    lmbda: float = 1.0
    """The share of steps trained on the student's own samples; the rest use the data's completions
    (GKD's lambda; below 1 needs a completion column)."""
    temperature: float = 1.0
    """Sampling temperature, and the temperature of both distributions in the divergence."""
    max_new_tokens: int = 32
    """Longest completion sampled (and the cut of the data's completions)."""
    teacher_top_k: int = 0
    """The divergence over k + 1 outcomes: the teacher's k likeliest tokens at each position and "any other"
    (0: the full vocabulary, exact). A lower bound of the full divergence, equal where both models are
    proportional outside the top k; the teacher's mass on them is logged as distill/teacher_top_k_mass."""
    rollout_engine: Literal["auto", "static", "loop", "generate"] = "auto"
    """Sampler of the student (and, for --eval-reward-fn, of the teacher): as rlhf grpo's --rollout-engine."""
    eval_reward_fn: str | None = None
    """Reward function(s) module:function scored on the --eval-data samples of the student and, once, the
    teacher: the task metric (eval/reward, eval/teacher_reward)."""
    log_samples: int = 4
    """Prompts whose completion goes to samples.jsonl at step 1 and each logged step (0: none)."""

    def check(self) -> None:
        super().check()
        if not self.teacher:
            raise UserError("--teacher is required: the model to distil from")
        if not 0.0 <= self.beta <= 1.0:
            raise UserError(f"--beta must be in [0, 1] (0 forward KL, 1 reverse KL), got {self.beta}")
        if not 0.0 <= self.lmbda <= 1.0:
            raise UserError(f"--lmbda must be in [0, 1], got {self.lmbda}")
        if self.temperature <= 0:
            raise UserError(f"--temperature must be positive, got {self.temperature}")
        if self.max_new_tokens < 1 or self.teacher_top_k < 0:
            raise UserError("--max-new-tokens must be at least 1 and --teacher-top-k 0 or more")
        if self.grad_accum != 1:
            raise UserError("--grad-accum: distill trains one step on each batch of --batch-size prompts; set that")
        if self.eval_reward_fn and not self.eval_data:
            raise UserError("--eval-reward-fn scores the samples of --eval-data prompts; give --eval-data too")

    def teachers(self) -> dict[str, str]:
        """``{name: path}``; one unnamed teacher is ``{"": path}``."""
        items = [t.strip() for t in self.teacher.split(",") if t.strip()]
        if len(items) == 1 and "=" not in items[0]:
            return {"": items[0]}
        out: dict[str, str] = {}
        for item in items:
            name, sep, path = item.partition("=")
            if not sep or not name or not path or name in out:
                raise UserError(f"--teacher {self.teacher}: several teachers are NAME=PATH,NAME=PATH with distinct "
                                f"names; {item!r} is not")
            out[name] = path
        return out
