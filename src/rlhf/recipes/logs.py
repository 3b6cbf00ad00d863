"""Metrics to metrics.jsonl, TensorBoard and wandb, a progress bar, and the model card."""

from __future__ import annotations

import json
import os

from rlhf.config import to_dict, to_yaml


class LoggerError(Exception):
    """A metrics sink was asked for but cannot be used."""


class RunLogger:
    """Metrics to ``metrics.jsonl`` (always), TensorBoard and wandb (if asked), and a progress bar."""

    def __init__(self, cfg, accelerator, total_steps: int, start_step: int, bar_keys: dict[str, str]):
        self.is_main = accelerator.is_main_process
        self.bar_keys = bar_keys
        self.path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.tb = self.wandb = self.bar = None
        self.last: dict[str, float] = {}
        if not self.is_main:
            return
        os.makedirs(cfg.output_dir, exist_ok=True)
        _truncate_metrics(self.path, start_step)
        sinks = {s.strip() for s in cfg.report_to.split(",")}
        if "tensorboard" in sinks:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"))
        if "wandb" in sinks:
            try:
                import wandb
            except ImportError:
                raise LoggerError("--report-to wandb: wandb is not installed (pip install wandb)") from None
            self.wandb = wandb.init(config=to_dict(cfg), dir=cfg.output_dir, resume="allow")
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, disable=None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.last.update(metrics)
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(metrics, step=step)
        if self.bar is not None:
            shown = {short: f"{metrics[k]:.4g}" for k, short in self.bar_keys.items() if k in metrics}
            if shown:
                self.bar.set_postfix(shown, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def event(self, step: int, message: str, **fields) -> None:
        """A line for people (printed) and for programs (in metrics.jsonl)."""
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "event": message, **fields}) + "\n")
        (self.bar.write if self.bar is not None else print)(f"step {step}: {message}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def _truncate_metrics(path: str, start_step: int) -> None:
    """On resume, drop lines logged after the checkpoint so the file reads as one run."""
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
