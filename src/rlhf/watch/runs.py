"""A run directory, read: ``metrics.jsonl`` (metrics and events, the monitor's warnings among them),
the config (the model card of a finished run, else the newest checkpoint's ``rlhf_run.json``) and
``samples.jsonl``. ``rlhf report`` draws it (:mod:`rlhf.watch.report`); the Python API's result
reads its warnings from it.
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass, field

from rlhf.errors import UserError
from rlhf.training.checkpoints import RUN_FILE
from rlhf.watch.samples import SAMPLES_FILE

# The model card's title -> recipe module (the run record's "recipe"); the command line names reward "rm".
TITLES = {"SFT model": "sft", "Reward model": "reward", "PPO policy": "ppo", "DPO policy": "dpo", "GRPO policy": "grpo"}
COMMANDS = {"reward": "rm"}


@dataclass
class Run:
    """What a run directory holds, as read by :func:`load_run`."""

    directory: str
    rows: list[dict]  # metric lines of metrics.jsonl, in file order
    events: list[dict]  # event lines of metrics.jsonl
    recipe: str | None = None
    config: dict | None = None
    config_source: str | None = None
    samples: list[dict] = field(default_factory=list)
    skipped_lines: int = 0  # lines that were not JSON (a run killed mid-write)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """Steps and finite values of metric ``key``."""
        points = [(r["step"], float(r[key])) for r in self.rows if is_number(r.get(key))]
        points = [(s, v) for s, v in points if math.isfinite(v)]
        return [s for s, _ in points], [v for _, v in points]

    def metric_keys(self) -> list[str]:
        """Every numeric metric, in the order the run first logged it."""
        seen: dict[str, None] = {}
        for r in self.rows:
            for k, v in r.items():
                if k != "step" and is_number(v):
                    seen.setdefault(k, None)
        return list(seen)

    @property
    def warnings(self) -> list[dict]:
        """The monitor's warning events (those naming a ``signal``)."""
        return [e for e in self.events if "signal" in e]


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---- reading the run directory ------------------------------------------------------------------

def _read_jsonl(path: str) -> tuple[list[dict], int]:
    rows, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


def _model_card_config(run_dir: str) -> tuple[str | None, dict | None]:
    """Recipe and config from the model card ``README.md`` written at the end of a run."""
    path = os.path.join(run_dir, "README.md")
    if not os.path.exists(path):
        return None, None
    import yaml

    with open(path, encoding="utf-8") as f:
        text = f.read()
    title = text.splitlines()[0].lstrip("# ").strip() if text else ""
    recipe = next((r for t, r in TITLES.items() if title.startswith(t)), None)
    start = text.find("## Config\n\n```yaml\n")
    if start < 0:
        return recipe, None
    body = text[start + len("## Config\n\n```yaml\n"):]
    try:
        config = yaml.safe_load(body[: body.find("```")])
    except yaml.YAMLError:
        return recipe, None
    return recipe, config if isinstance(config, dict) else None


def _checkpoint_config(run_dir: str) -> tuple[str | None, dict | None, str | None]:
    """Recipe and run record of the newest checkpoint (a run that has not finished)."""
    records = sorted(glob.glob(os.path.join(glob.escape(run_dir), "checkpoints", "step-*", RUN_FILE)))
    if not records:
        return None, None, None
    try:
        with open(records[-1], encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None, None, None
    return record.pop("recipe", None), record, os.path.relpath(records[-1], run_dir)


def _recipe_from_metrics(keys: list[str]) -> str | None:
    """The recipe that logs these metrics, for a run with no config saved yet."""
    for key, recipe in (("objective/scores", "ppo"), ("completions/mean_length", "grpo"), ("logps/chosen", "dpo"),
                        ("train/accuracy", "reward"), ("train/token_accuracy", "sft")):
        if key in keys:
            return recipe
    return None


def load_run(run_dir: str) -> Run:
    """Read a run directory; a directory without ``metrics.jsonl`` is a :class:`UserError`."""
    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir}: no such directory")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise UserError(f"{run_dir}: no metrics.jsonl here; give the --output-dir of an rlhf sft, rm, ppo, dpo or "
                        "grpo run")
    lines, bad = _read_jsonl(path)
    rows = [r for r in lines if "event" not in r and is_number(r.get("step"))]
    events = [e for e in lines if "event" in e]
    run = Run(run_dir, rows, events, skipped_lines=bad)
    recipe, run.config = _model_card_config(run_dir)
    run.config_source = "README.md (the model card)" if run.config else None
    if run.config is None:
        ckpt_recipe, run.config, run.config_source = _checkpoint_config(run_dir)
        recipe = recipe or ckpt_recipe
    run.recipe = recipe or _recipe_from_metrics(run.metric_keys())
    samples_path = os.path.join(run_dir, SAMPLES_FILE)
    if os.path.exists(samples_path):
        run.samples, bad_samples = _read_jsonl(samples_path)
        run.skipped_lines += bad_samples
    return run


# ---- monitor thresholds -------------------------------------------------------------------------

class _SavedConfig:
    """The saved config as attributes for :class:`rlhf.watch.monitor.Monitor` (a missing field is None)."""

    def __init__(self, values: dict):
        self.values = values

    def __getattr__(self, name: str):
        return self.values.get(name)


def monitor_thresholds(run: Run) -> dict[str, list[float]]:
    """Signal -> the values at which the monitor warns (the lines on its plot).

    The rules are the monitor's own (:class:`rlhf.watch.monitor.Monitor`); each threshold is the
    saved config's ``monitor_*`` field, else the one a warning event recorded. A line sits where
    the rule's verdict flips: ``t`` for "grows by t", ``-t`` for "falls by t", both for ``|r| >= t``.
    """
    from rlhf.watch.monitor import Monitor

    config = run.config or {}
    recorded = {e["signal"]: e["threshold"] for e in run.warnings if is_number(e.get("threshold"))}
    lines = {}
    for name, flag, _, crossed, _ in Monitor(_SavedConfig(config), {}).rules:
        key = flag.lstrip("-").replace("-", "_")
        t = config[key] if key in config else recorded.get(name)
        if not is_number(t):
            continue
        at = []
        for c in sorted({t, -t}):
            d = 1e-9 * max(1.0, abs(c))
            if crossed(c, t) != crossed(c - d, t) or crossed(c, t) != crossed(c + d, t):
                at.append(float(c))
        lines[name] = at
    return lines
