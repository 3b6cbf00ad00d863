"""The run config every recipe shares (:class:`TrainConfig`): model, data, output, steps, batch
sizes, optimiser, checkpoints, LoRA, trackers. Each field's docstring is its ``--help`` and its
``help(rlhf.sft)`` line; :mod:`rlhf.training.options` turns flags, YAML and keyword arguments into it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from rlhf.errors import UserError

TRACKER_PACKAGES = {"comet_ml": "comet-ml"}


def report_sinks() -> tuple[str, ...]:
    """Every --report-to name: accelerate's trackers, 'all' (those installed) and 'none'."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return (*LOGGER_TYPE_TO_CLASS, "all", "none")


def trackers(report_to: str) -> list[str]:
    """The --report-to names to hand to ``Accelerator(log_with=...)`` ('none' dropped)."""
    return [s for s in (s.strip() for s in report_to.split(",")) if s and s != "none"]



@dataclass
class TrainConfig:
    """Fields every recipe shares."""

    model: str = ""
    """Model directory or hub id to start from."""
    data: str = ""
    """Training data: JSONL, JSON, CSV, Parquet, a saved datasets directory, or hf:NAME[:SPLIT]."""
    eval_data: str | None = None
    """Held-out data in the same format, evaluated every --eval-every steps and at the end (sft, rm, dpo);
    for ppo and grpo, preference pairs (prompt/chosen/rejected) for the implicit preference accuracy; for
    distill, prompts (the reverse KL to the teacher on the student's samples)."""
    output_dir: str = "runs/out"
    """Where the final model, checkpoints, metrics.jsonl and TensorBoard logs go."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run --epochs epochs)."""
    epochs: int = 1
    """Passes over the training data (when --max-steps is -1)."""
    batch_size: int = 8
    """Examples per micro-batch, summed over all processes: a global size (TRL's
    per_device_train_batch_size is per process)."""
    grad_accum: int = 1
    """Micro-batches accumulated into one optimizer step. PPO and GRPO use --mini-batch-size instead."""
    lr: float = 1e-5
    """Peak learning rate of AdamW (positive)."""
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    """Learning-rate schedule after warmup (transformers' get_scheduler)."""
    warmup_ratio: float = 0.0
    """Fraction of the steps spent warming the learning rate up from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    optim: Literal["adamw_torch", "adamw_torch_fused"] = "adamw_torch"
    """AdamW's implementation in torch: one parameter at a time (adamw_torch), or the fused kernel
    (adamw_torch_fused, transformers' default and so TRL's: faster steps and no temporaries the size of a
    weight; it rounds differently, so the trained weights differ in the last bits)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value (0 or none: no clipping)."""
    seed: int = 42
    """Seed of the model init, data order and sampling."""
    ddp_timeout: int = 1800
    """Seconds a collective across processes may wait (transformers' ddp_timeout): a process that stopped or hung
    ends the run in one line after this long, instead of the others waiting forever."""
    save_every: int = 0
    """Save a resumable checkpoint every N steps (0: none until the end)."""
    save_total_limit: int = 2
    """Keep only the newest K checkpoints (0: keep all)."""
    eval_every: int = 0
    """Evaluate on --eval-data every N steps (0: only at the end)."""
    log_every: int = 1
    """Write metrics every N steps."""
    resume: str | None = field(default=None, metadata={"const": "auto"})
    """Resume from a checkpoint: a path, or 'auto' (also plain --resume) for the latest in --output-dir.
    It must come from a run of the same recipe, model, data and hyper-parameters (--max-steps,
    --epochs, --save-every and the logging flags may change)."""
    overwrite_output_dir: bool = False
    """Replace the results of another run in --output-dir (removed once this run has loaded its
    model and data); without it such a directory is refused."""
    max_length: int = 512
    """Maximum tokens of prompt + response; responses are cut from the right."""
    max_prompt_length: int | None = None
    """Prompts longer than this are cut from the left."""
    on_bad_record: Literal["error", "skip"] = "error"
    """What a bad data record does: stop before training (error) or get counted and left out (skip)."""
    bf16: bool = True
    """Train in bf16 mixed precision when a CUDA GPU with bf16 is present (ignored on CPU)."""
    lora: bool = False
    """Train LoRA adapters instead of all weights."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA alpha (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA path."""
    lora_target_modules: str = "all-linear"
    """Modules that get adapters: 'all-linear' or a comma list such as q_proj,v_proj."""
    merge_lora: bool = True
    """Merge the adapters into the weights of the final model (loadable by transformers alone)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    trust_remote_code: bool = False
    """Allow model code from the hub (off: only transformers' own architectures)."""
    attn_implementation: str | None = None
    """Attention kernel of the models: eager, sdpa, flex_attention, flash_attention_2 (default: transformers' choice)."""
    max_consecutive_skips: int = 10
    """Stop after this many consecutive steps with a non-finite loss or gradient."""
    report_to: str = "tensorboard"
    """Comma list of experiment trackers, through accelerate: tensorboard (into OUTPUT_DIR/tensorboard),
    wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio, all (every one installed) or none.
    metrics.jsonl is always written."""

    def lora_targets(self) -> str | list[str]:
        """``'all-linear'`` or the list of module names to adapt."""
        t = self.lora_target_modules
        return t if t == "all-linear" else [x.strip() for x in t.split(",") if x.strip()]

    def check(self) -> None:
        """Reject impossible values with one line naming the flag."""
        if not self.model:
            raise UserError("--model is required")
        for name in ("batch_size", "grad_accum", "epochs", "max_length", "log_every", "lora_r", "ddp_timeout"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise UserError(f"--max-grad-norm must be 0 or more (0: no clipping), got {self.max_grad_norm}")
        for name, zero in (("save_every", "no checkpoints"), ("eval_every", "only at the end"),
                           ("save_total_limit", "keep all")):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be 0 ({zero}) or more, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        from accelerate.tracking import get_available_trackers

        installed = {str(t) for t in get_available_trackers()}
        for sink in (s.strip() for s in self.report_to.split(",")):
            if sink not in report_sinks():
                raise UserError(f"--report-to {sink}: not a tracker accelerate knows; valid: {', '.join(report_sinks())}")
            if sink not in ("all", "none") and sink not in installed:
                raise UserError(f"--report-to {sink}: {sink} is not installed "
                                f"(pip install {TRACKER_PACKAGES.get(sink, sink)})")

