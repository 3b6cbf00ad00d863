"""The step loop every supervised recipe runs (:func:`fit`), the data plan that says which examples
each step reads (:class:`StepPlan`), and the small pieces the RL loops share with it (gradient
clipping, cross-process sums, skipped-step counting).

The batch arithmetic follows one rule so results do not depend on how work is split: a
*step* consumes ``batch_size * grad_accum`` examples of a seeded per-epoch permutation
(``batch_size`` is global, across processes); every micro-batch loss is a sum divided by the
whole step's item count (tokens or pairs), reduced across processes before the backward.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from rlhf.errors import UserError
from rlhf.training.checkpoints import Checkpointer, TrainState
from rlhf.training.config import TrainConfig
from rlhf.training.logs import RunLogger


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


class StepTimer:
    """The seconds of one step under named timers that add up to ``time/step``: each :meth:`lap` is
    the time since the previous one (or since the step began)."""

    def __init__(self) -> None:
        self.start = self.mark = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str, **inside: float) -> None:
        """Close a lap under ``name``; ``inside`` are parts of it timed within (``time_reference_pass=s``
        is logged as ``time/reference_pass``), the rest of the lap counts under ``name``."""
        now = time.perf_counter()
        rest = now - self.mark
        for key, seconds in inside.items():
            key = "time/" + key.removeprefix("time_")
            self.seconds[key] = self.seconds.get(key, 0.0) + seconds
            rest -= seconds
        self.seconds[name] = self.seconds.get(name, 0.0) + rest
        self.mark = now

    def metrics(self) -> dict[str, float]:
        return {**self.seconds, "time/step": self.mark - self.start}


def shard(indices: list[int], rank: int, world: int) -> list[int]:
    """This process's share of a micro-batch."""
    return indices[rank::world]


def pass_batches(n: int, rank: int, world: int, batch_size: int) -> list[tuple[list[int], int]]:
    """This process's batches of one pass over ``n`` examples (held-out evaluation, scoring): pairs of
    example indices and how many of them, from the first, count.

    Every process gets as many batches, of the same sizes, whatever its share of ``n``: where the weights
    are sharded (FSDP, ZeRO-3) each forward is a collective, and a process with one batch fewer would leave
    the others waiting. A process's last batch is padded with example 0, computed and not counted.
    """
    mine = list(range(n))[rank::world]
    per = -(-n // world)
    padded = mine + [0] * (per - len(mine))
    return [(padded[i : i + batch_size], max(0, min(batch_size, len(mine) - i))) for i in range(0, per, batch_size)]


# ---- the shared step loop --------------------------------------------------------------------

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def clip_grad_norm(accelerator, params: list[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """The global gradient norm of ``params``, after clipping it to ``max_norm``.

    ``max_norm`` 0 or None means no clipping: the norm is still measured (with an infinite bound,
    so it unscales and gathers sharded gradients as clipping would) but no gradient is scaled.
    Through ``accelerator.clip_grad_norm_``; under FSDP2, torch's DTensor-aware ``clip_grad_norm_``
    on ``params`` after accelerate's unscaling.
    """
    if max_norm is not None and max_norm < 0:
        raise UserError(f"--max-grad-norm must be 0 or more (0: no clipping), got {max_norm}")
    bound = max_norm if max_norm else float("inf")
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP and accelerator.is_fsdp2:
        # accelerate clips under FSDP only a whole prepared model's parameters, found by comparing
        # lists (elementwise between a DTensor and a tensor of another model: an error); ours may be
        # a part (PPO's actor, its critic). FSDP2's gradients are DTensors on one mesh, which torch's
        # clipping reduces across the processes itself.
        accelerator.unscale_gradients()
        norm = torch.nn.utils.clip_grad_norm_(params, bound)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return accelerator.clip_grad_norm_(params, bound)


@contextlib.contextmanager
def micro_batch(accelerator, *models, last: bool):
    """The backward of one micro-batch of an optimizer step: gradients are accumulated locally and
    synchronised across processes on the ``last`` one only.

    DDP and FSDP: ``no_sync`` on the others. DeepSpeed: its engine accumulates, clips and steps inside
    ``accelerator.backward``, at the boundary that accelerate's ``sync_gradients`` marks; without the mark
    it would step on every micro-batch. (Under DeepSpeed the optimizer's and the scheduler's own ``step``
    are then accelerate's no-ops, and ``optimizer.zero_grad`` too.)
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.gradient_state._set_sync_gradients(last)
        try:
            yield
        finally:
            accelerator.gradient_state._set_sync_gradients(True)
        return
    with contextlib.ExitStack() as stack:
        if not last:
            for m in models:
                if m is not None:
                    stack.enter_context(accelerator.no_sync(m))
        yield


def reduce_sum(accelerator, value: torch.Tensor) -> torch.Tensor:
    value = value.detach().float().to(accelerator.device)
    return accelerator.reduce(value, reduction="sum") if accelerator.num_processes > 1 else value


def mean_over_processes(accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """Each metric's mean over the processes: the whole batch's value of a per-process mean over equally many
    rows (the reward model's mean score), so 2 processes log what 1 would."""
    if accelerator.num_processes == 1 or not metrics:
        return metrics
    keys = sorted(metrics)
    values = reduce_sum(accelerator, torch.tensor([float(metrics[k]) for k in keys])) / accelerator.num_processes
    return dict(zip(keys, values.tolist()))


def fit(*, cfg: TrainConfig, accelerator, model, optimizer, scheduler, examples: list[dict],
        collate: Callable[[list[dict]], dict], count: Callable[[dict], int], loss_fn: LossFn,
        state: TrainState, plan: StepPlan, total_steps: int, logger: RunLogger, checkpointer: Checkpointer,
        evaluate: Callable[[], dict[str, float]] | None = None, where: list[str] | None = None) -> dict[str, float]:
    """Run optimizer steps until ``total_steps``; return the last logged metrics.

    ``loss_fn(model, batch)`` returns the *mean* loss over the batch's items and metrics
    (means too); ``count(batch)`` gives its item count (labelled tokens, pairs). A step whose
    loss or gradient norm is not finite is skipped (no update), counted as
    ``train/skipped_steps`` and logged with its example locations; a checkpoint is never
    written right after one, and ``cfg.max_consecutive_skips`` in a row stop the run. A callback of the
    Python API that returns True (``logger.stop_requested``) ends the loop after its step.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    # The optimizer's parameters: after a no-grad forward (samples, evaluation) FSDP2 leaves the root's parameters
    # unsharded, and model.parameters() would list those stand-ins, whose gradients are never set.
    params = [p for g in optimizer.param_groups for p in g["params"]]
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
            with micro_batch(accelerator, model, last=k == len(micros) - 1):
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
        if logger.stop_requested:  # a callback of the Python API asked to stop
            break
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

