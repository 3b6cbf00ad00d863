"""Shared pieces of every recipe, as plain functions: the common config, run setup on
``accelerate``, the data plan, and the step loop (checkpoints, logs and the final save live in
``checkpoints.py``, ``logs.py`` and ``saving.py``).

The batch arithmetic follows one rule so results do not depend on how work is split: a
*step* consumes ``batch_size * grad_accum`` examples of a seeded per-epoch permutation
(``batch_size`` is global, across processes); every micro-batch loss is a sum divided by the
whole step's item count (tokens or pairs), reduced across processes before the backward.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from rlhf.training.checkpoints import (
    Checkpointer, TrainState, claim_output_dir, remove_old_run, run_record,
)
from rlhf.training.logs import RunLogger


# pip package of each tracker accelerate knows (its names are accelerate's LOGGER_TYPE_TO_CLASS).
TRACKER_PACKAGES = {"comet_ml": "comet-ml"}


def report_sinks() -> tuple[str, ...]:
    """Every --report-to name: accelerate's trackers, 'all' (those installed) and 'none'."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return (*LOGGER_TYPE_TO_CLASS, "all", "none")


def trackers(report_to: str) -> list[str]:
    """The --report-to names to hand to ``Accelerator(log_with=...)`` ('none' dropped)."""
    return [s for s in (s.strip() for s in report_to.split(",")) if s and s != "none"]


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, diverged run): one line, exit 1."""


@dataclass
class TrainConfig:
    """Fields every recipe shares."""

    model: str = ""
    """Model directory or hub id to start from."""
    data: str = ""
    """Training data: JSONL, JSON, CSV, Parquet, a saved datasets directory, or hf:NAME[:SPLIT]."""
    eval_data: str | None = None
    """Held-out data in the same format, evaluated every --eval-every steps and at the end (sft, rm, dpo)."""
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
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value (0 or none: no clipping)."""
    seed: int = 42
    """Seed of the model init, data order and sampling."""
    save_every: int = 0
    """Save a resumable checkpoint every N steps (0: none until the end)."""
    save_total_limit: int = 2
    """Keep only the newest K checkpoints (0: keep all)."""
    eval_every: int = 0
    """Evaluate on --eval-data every N steps (0: only at the end; sft, rm, dpo)."""
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
        for name in ("batch_size", "grad_accum", "epochs", "max_length", "log_every", "lora_r"):
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


# ---- setup ----------------------------------------------------------------------------------

def make_accelerator(cfg: TrainConfig):
    """An ``Accelerator`` (DDP/FSDP/DeepSpeed come from ``accelerate launch``) and the seed set.

    Its trackers are --report-to's; TensorBoard writes under ``OUTPUT_DIR/tensorboard``.

    ``cfg.output_dir`` is claimed first (:func:`claim_output_dir`): locked, and refused if it
    holds another run's results and neither --resume nor --overwrite-output-dir is given.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    cuda = torch.cuda.is_available()
    bf16 = cfg.bf16 and cuda and torch.cuda.is_bf16_supported()
    project = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=os.path.join(cfg.output_dir, "tensorboard"))
    # cpu=True without a GPU: under torchrun, accelerate then runs DDP over gloo (MULTI_CPU).
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=not cuda,
                              log_with=trackers(cfg.report_to) or None, project_config=project)
    claim_output_dir(cfg, accelerator.is_main_process)
    accelerator.wait_for_everyone()  # every process checked the directory before the main one writes
    accelerator.print(f"accelerate {accelerator.distributed_type.value}, processes: {accelerator.num_processes}, "
                      f"device: {accelerator.device}, mixed precision: {accelerator.mixed_precision}")
    set_seed(cfg.seed)
    return accelerator


def load_policy(cfg: TrainConfig, path: str | None = None):
    """Tokenizer and causal LM from ``path`` (default ``cfg.model``), with LoRA / checkpointing.

    --max-length beyond the model's positions is refused here, before the data is read.
    """
    from rlhf.models import load_causal_lm, load_tokenizer, set_gradient_checkpointing

    path = path or cfg.model
    tokenizer = load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
    model = load_causal_lm(path, trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation)
    check_positions(model, cfg.max_length, "--max-length", f"--model {path}")
    if cfg.lora:
        model = with_lora(cfg, model)
    set_gradient_checkpointing(model, cfg.gradient_checkpointing)
    return tokenizer, model


def with_lora(cfg: TrainConfig, model, task_type: str = "CAUSAL_LM"):
    """``model`` with LoRA adapters from the --lora-* flags; peft's refusal as one line naming the flag."""
    from rlhf.models import apply_lora

    try:
        return apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets(), task_type=task_type)
    except ValueError as e:  # peft: no module matches, a rank below 1, a module type it cannot adapt
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--lora-target-modules {cfg.lora_target_modules} (--lora-r {cfg.lora_r}) on --model "
                        f"{cfg.model}: peft refused it: {first}") from None


def max_positions(model) -> tuple[int, str] | None:
    """The longest sequence ``model``'s config allows and the config field that says so
    (``max_position_embeddings``, GPT-2's ``n_positions``), or None where it names no limit."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value, name
    return None


def check_positions(model, length: int, what: str, whose: str) -> None:
    """Refuse at start-up a sequence length beyond ``model``'s positions (one line naming
    ``what`` asked for it and ``whose`` limit it is), rather than an index error mid-run."""
    limit = max_positions(model)
    if limit is not None and length > limit[0]:
        raise UserError(f"{what} {length} is beyond the {limit[0]} positions of {whose} ({limit[1]} in its config); "
                        f"lower it to {limit[0]} or less")


def load_data(cfg: TrainConfig, source: str, kind: str, tokenizer, log=print):
    """Validate and tokenise a whole file before training; report skips and truncations."""
    from rlhf.data import Encoder, prepare

    prepared = prepare(source, kind, Encoder(tokenizer, cfg.max_length, cfg.max_prompt_length), cfg.on_bad_record)
    if kind == "prompt":  # each prompt knows its file:line, for errors about its completions
        for example, where in zip(prepared.examples, prepared.where):
            example["_where"] = where
    log(f"{source}: {len(prepared)} examples ({prepared.n_skipped} bad records skipped, "
        f"{prepared.n_prompt_truncated} prompts and {prepared.n_response_truncated} responses truncated)")
    return prepared


def make_optimizer(cfg: TrainConfig, params, total_steps: int, lr: float | None = None):
    """AdamW and the warmup + decay schedule from transformers."""
    from transformers import get_scheduler

    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr or cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    return optimizer, scheduler


# ---- the data plan: which examples each step uses -------------------------------------------

@dataclass
class StepPlan:
    """Deterministic batches: step s of epoch e reads a slice of ``randperm(n, seed + e)``.

    The plan depends only on the step number, so resuming needs nothing but the step. An
    epoch's remainder that does not fill a whole step is left out (``drop_last``).
    """

    n: int
    batch_size: int
    grad_accum: int
    seed: int

    @property
    def per_step(self) -> int:
        return self.batch_size * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.n // self.per_step)

    def total_steps(self, epochs: int, max_steps: int) -> int:
        return max_steps if max_steps > 0 else epochs * self.steps_per_epoch

    def step_indices(self, step: int) -> list[list[int]]:
        """Global example indices of each micro-batch of ``step``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        chunk = [order[(k * self.per_step + i) % self.n] for i in range(min(self.per_step, max(self.n, 1)))]
        return [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]


def shard(indices: list[int], rank: int, world: int) -> list[int]:
    """This process's share of a micro-batch."""
    return indices[rank::world]


# ---- the shared step loop --------------------------------------------------------------------

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def clip_grad_norm(accelerator, params: list[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """The global gradient norm of ``params``, after clipping it to ``max_norm``.

    ``max_norm`` 0 or None means no clipping: the norm is still measured (through
    ``accelerator.clip_grad_norm_`` with an infinite bound, so it unscales and gathers
    sharded gradients as clipping would) but no gradient is scaled.
    """
    if max_norm is not None and max_norm < 0:
        raise UserError(f"--max-grad-norm must be 0 or more (0: no clipping), got {max_norm}")
    return accelerator.clip_grad_norm_(params, max_norm if max_norm else float("inf"))


def reduce_sum(accelerator, value: torch.Tensor) -> torch.Tensor:
    value = value.detach().float().to(accelerator.device)
    return accelerator.reduce(value, reduction="sum") if accelerator.num_processes > 1 else value


def fit(*, cfg: TrainConfig, accelerator, model, optimizer, scheduler, examples: list[dict],
        collate: Callable[[list[dict]], dict], count: Callable[[dict], int], loss_fn: LossFn,
        state: TrainState, plan: StepPlan, total_steps: int, logger: RunLogger, checkpointer: Checkpointer,
        evaluate: Callable[[], dict[str, float]] | None = None, where: list[str] | None = None) -> dict[str, float]:
    """Run optimizer steps until ``total_steps``; return the last logged metrics.

    ``loss_fn(model, batch)`` returns the *mean* loss over the batch's items and metrics
    (means too); ``count(batch)`` gives its item count (labelled tokens, pairs). A step whose
    loss or gradient norm is not finite is skipped (no update), counted as
    ``train/skipped_steps`` and logged with its example locations; a checkpoint is never
    written right after one, and ``cfg.max_consecutive_skips`` in a row stop the run.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    params = [p for p in model.parameters() if p.requires_grad]
    t0, tokens_seen = time.perf_counter(), 0
    while state.step < total_steps:
        global_micro = plan.step_indices(state.step)
        micros = [collate([examples[i] for i in shard(idx, rank, world)]) for idx in global_micro]
        n_local = torch.tensor(float(sum(count(m) for m in micros)))
        n_global = reduce_sum(accelerator, n_local).clamp(min=1.0)
        model.train()
        loss_sum = torch.zeros((), device=accelerator.device)
        metric_sums: dict[str, torch.Tensor] = {}
        for k, batch in enumerate(micros):
            batch = to_device(batch, accelerator.device)
            sync = contextlib.nullcontext() if k == len(micros) - 1 else accelerator.no_sync(model)
            with sync:
                loss, metrics = loss_fn(model, batch)
                weight = count(batch) / n_global  # this part's share of the whole step
                accelerator.backward(loss * weight * world)  # DDP averages over processes
            loss_sum += loss.detach().float() * weight
            for name, v in metrics.items():
                metric_sums[name] = metric_sums.get(name, 0.0) + v.detach().float() * weight
            tokens_seen += int(batch["input_ids"].numel()) if "input_ids" in batch else 0
        grad_norm = clip_grad_norm(accelerator, params, cfg.max_grad_norm)
        loss_total = reduce_sum(accelerator, loss_sum)
        finite = bool(torch.isfinite(loss_total)) and bool(torch.isfinite(torch.as_tensor(grad_norm)))
        if finite:
            optimizer.step()
            scheduler.step()
        else:
            bad = [where[i] if where else i for idx in global_micro for i in idx]
            logger.event(state.step + 1, "skipped: non-finite loss or gradient norm", examples=bad)
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        logger.advance()
        count_skip(cfg, state, not finite, checkpointer)
        if state.step % cfg.log_every == 0 or state.step == total_steps:
            elapsed = time.perf_counter() - t0
            out = {"train/loss": float(loss_total), "train/grad_norm": float(grad_norm) if finite else float("nan"),
                   "train/lr": scheduler.get_last_lr()[0], "train/skipped_steps": float(state.skipped_steps),
                   "train/epoch": state.step / plan.steps_per_epoch, "train/tokens_per_second": tokens_seen / elapsed}
            out.update({k: float(reduce_sum(accelerator, v)) for k, v in metric_sums.items()})
            logger.log(state.step, {k: v for k, v in out.items() if math.isfinite(v) or k == "train/grad_norm"})
        if evaluate and cfg.eval_every and state.step % cfg.eval_every == 0:
            logger.log(state.step, evaluate())
        if cfg.save_every and state.step % cfg.save_every == 0 and finite:
            checkpointer.save(state.step)
    check_trained(state)
    return logger.last


def count_skip(cfg: TrainConfig, state: TrainState, skipped: bool, checkpointer: Checkpointer) -> None:
    """Count a step that changed no weight (``train/skipped_steps``); ``cfg.max_consecutive_skips``
    of them in a row stop the run."""
    state.skipped_steps += int(skipped)
    state.consecutive_skips = state.consecutive_skips + 1 if skipped else 0
    if state.consecutive_skips >= cfg.max_consecutive_skips:
        last = checkpointer.latest()
        raise UserError(f"stopped at step {state.step}: {state.consecutive_skips} consecutive steps with a "
                        f"non-finite loss or gradient; last good checkpoint: {last or 'none'}")


def check_trained(state: TrainState) -> None:
    """A run in which every step was skipped trained nothing: an error, never a saved model."""
    ran = state.step - state.first_step
    if ran > 0 and state.skipped_steps - state.skipped_before == ran:
        raise UserError(f"every one of the {ran} steps was skipped (non-finite loss or gradient); no model was saved")


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def start(cfg: TrainConfig, accelerator, model, optimizer, scheduler, total_steps: int, bar_keys: dict[str, str]):
    """Prepare for ``accelerate``, register the checkpoint state, resume if asked.

    This is where a run starts for real (model and data loaded and checked): only now does
    --overwrite-output-dir remove the earlier run's outputs, and a resumed run's metrics.jsonl
    lose the lines logged after its checkpoint.

    Returns ``(model, optimizer, state, checkpointer, logger)``.
    """
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(state, scheduler)
    checkpointer = Checkpointer(accelerator, cfg.output_dir, cfg.save_total_limit, run_record(cfg))
    resumed = checkpointer.resume(cfg.resume)
    if state.step > total_steps:
        raise UserError(f"--resume {resumed}: its step {state.step} is past this run's {total_steps} steps "
                        "(raise --max-steps or --epochs)")
    state.first_step, state.skipped_before = state.step, state.skipped_steps
    if accelerator.is_main_process and cfg.overwrite_output_dir and not resumed:
        remove_old_run(cfg.output_dir)
    accelerator.wait_for_everyone()
    logger = RunLogger(cfg, accelerator, total_steps, state.step, bar_keys)
    if resumed:
        logger.event(state.step, f"resumed from {resumed}")
    return model, optimizer, state, checkpointer, logger
