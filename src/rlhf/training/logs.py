"""Metrics to metrics.jsonl and accelerate's trackers (TensorBoard, wandb, ...), progress, and the model card."""

from __future__ import annotations

import json
import os
import sys
import time
from contextvars import ContextVar

from rlhf.errors import UserError

from rlhf.training.options import to_dict, to_yaml


class LoggerError(UserError):
    """A metrics sink was asked for but cannot be used."""


CALLBACKS: ContextVar[tuple] = ContextVar("rlhf_callbacks", default=())
"""The Python API's ``callbacks=`` for the run in progress: each ``fn(step, metrics)`` is called with
every logged row, on every process; one that returns True, on any process, stops the run after that
step (the model is saved as at a normal end)."""

PROJECT = "rlhf"
"""The project name given to the trackers (wandb's project; TensorBoard's OUTPUT_DIR/tensorboard/rlhf)."""


def flat_config(cfg) -> dict[str, str | int | float | bool]:
    """``cfg`` as the flat mapping of plain values that trackers store as hyper-parameters
    (TensorBoard's ``add_hparams`` takes str, int, float and bool only): None becomes 'none',
    a list a comma list, a nested mapping ``outer.inner`` keys."""
    def flatten(prefix: str, value, out: dict) -> dict:
        if isinstance(value, dict):
            for k, v in value.items():
                flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
        elif isinstance(value, (list, tuple)):
            out[prefix] = ",".join(map(str, value))
        elif value is None:
            out[prefix] = "none"
        elif isinstance(value, (str, int, float, bool)):
            out[prefix] = value
        else:
            out[prefix] = str(value)
        return out

    return flatten("", to_dict(cfg), {})


class RunLogger:
    """Metrics to ``metrics.jsonl`` (always) and to --report-to's trackers through accelerate
    (``init_trackers``, ``log``, and in :meth:`close` the trackers' ``finish``), and progress."""

    def __init__(self, cfg, accelerator, total_steps: int, start_step: int, bar_keys: dict[str, str]):
        self.is_main = accelerator.is_main_process
        self.accelerator = accelerator
        self.bar_keys = bar_keys
        self.path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.bar = None
        self.total_steps, self.t0 = total_steps, time.perf_counter()
        self.last: dict[str, float] = {}
        self.callbacks = CALLBACKS.get()
        self.stop_requested = False  # a callback asked to stop
        if accelerator.log_with:
            accelerator.init_trackers(PROJECT, config=flat_config(cfg),
                                      init_kwargs={"wandb": {"dir": cfg.output_dir, "resume": "allow"}})
        if not self.is_main:
            return
        os.makedirs(cfg.output_dir, exist_ok=True)
        truncate_metrics(self.path, start_step)
        if sys.stderr.isatty():  # a bar on a terminal; one line a logging step in CI logs and nohup.out
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.last.update(metrics)
        self._call_back(step, metrics)
        if not self.is_main:
            return
        self._append({"step": step, **metrics})
        self.accelerator.log(metrics, step=step)
        shown = {short: metrics[k] for k, short in self.bar_keys.items() if k in metrics}
        if shown and self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        elif shown:
            print(progress_line(step, self.total_steps, shown, metrics.get("train/lr"), time.perf_counter() - self.t0),
                  flush=True)

    def _call_back(self, step: int, metrics: dict[str, float]) -> None:
        """Each callback with the row; True from one sets :attr:`stop_requested`. An exception it
        raises is a :class:`UserError` naming it, the step and the exception's first line."""
        for fn in self.callbacks:
            try:
                stop = fn(step, dict(metrics))
            except Exception as e:  # the user's code: any exception is theirs to fix
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                name = getattr(fn, "__name__", type(fn).__name__)
                raise UserError(f"callback {name} raised {type(e).__name__}" + (f": {first}" if first else "")
                                + f" at step {step}") from None
            self.stop_requested = self.stop_requested or stop is True
        if self.callbacks and self.accelerator.num_processes > 1:  # one process's True stops them all
            import torch

            flag = torch.tensor(float(self.stop_requested), device=self.accelerator.device)
            self.stop_requested = bool(self.accelerator.reduce(flag, reduction="sum") > 0)

    def _append(self, record: dict) -> None:
        """One line more in metrics.jsonl; a failed write (a full disk) stops the run before its final save."""
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise LoggerError(f"{self.path}: cannot append metrics ({e.strerror or e}); the run stopped and no "
                              "final model was written") from None

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def event(self, step: int, message: str, **fields) -> None:
        """A line for people (printed) and for programs (in metrics.jsonl)."""
        if not self.is_main:
            return
        self._append({"step": step, "event": message, **fields})
        (self.bar.write if self.bar is not None else print)(f"step {step}: {message}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        # accelerator.end_training() without its destroy_process_group: one process may train several
        # models (rm --ensemble, the demo), and the final save still needs the processes together.
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()


def progress_line(step: int, total_steps: int, shown: dict[str, float], lr: float | None, seconds: float) -> str:
    """The line a logging step prints when stderr is no terminal:
    ``step 3/10  loss 1.234  lr 1e-05  12.3 s`` (seconds since this run started or resumed)."""
    parts = [f"step {step}/{total_steps}", *(f"{k} {v:.4g}" for k, v in shown.items())]
    if lr is not None:
        parts.append(f"lr {lr:.3g}")
    return "  ".join([*parts, f"{seconds:.1f} s"])


def truncate_metrics(path: str, start_step: int) -> None:
    """On resume, drop the lines of a run's JSON-lines log (metrics.jsonl, samples.jsonl) written after
    the checkpoint, so the file reads as one run."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= start_step]
    if start_step == 0:
        kept = []
    with open(path, "w") as f:
        f.writelines(kept)


def write_model_card(cfg, directory: str, title: str, metrics: dict[str, float]) -> None:
    """``README.md`` beside the final model: what made it, with which config, and how it scored."""
    rows = "\n".join(f"| `{k}` | {v:.6g} |" for k, v in sorted(metrics.items()))
    text = (f"# {title}\n\nTrained with `rlhf` {__import__('rlhf').__version__}. Load it with "
            "transformers alone (`AutoModelForCausalLM.from_pretrained(dir)` or, for a reward model, "
            "`AutoModelForSequenceClassification`).\n\n## Final metrics\n\n| metric | value |\n|---|---|\n"
            f"{rows}\n\n## Config\n\n```yaml\n{to_yaml(cfg)}```\n")
    with open(os.path.join(directory, "README.md"), "w") as f:
        f.write(text)
