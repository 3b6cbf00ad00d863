"""``rlhf report RUN_DIR``: one self-contained HTML page of any run (sft, rm, dpo, ppo, grpo), issue 15.

It reads what the run left in its directory: ``metrics.jsonl`` (metrics and events), the config
(the model card ``README.md`` of a finished run, else the newest checkpoint's ``rlhf_run.json``) and,
for PPO, GRPO, DPO and distill, ``samples.jsonl``. The page shows what the run was, the reward, KL and loss
over the steps, each reward function's mean and std (PPO, GRPO), one small plot per over-optimisation signal (``monitor/...``) with its threshold and the
step of its warning, the table of the monitor's warnings, and sample responses at chosen steps side
by side. The plots are inline SVG drawn here (no image files, no plotting library), and the same run
directory always gives the same bytes. Run: ``rlhf report runs/ppo [--output report.html] [--steps 1,50,100]``.
"""
from __future__ import annotations

import argparse
import html
import os
import tempfile

from rlhf.errors import UserError
from rlhf.watch.plots import PLOT_STYLE, fmt, svg_plot
from rlhf.watch.samples import SAMPLES_FILE
from rlhf.watch.runs import COMMANDS, Run, is_number, load_run, monitor_thresholds

# The headline curves, in this order, where the run logged them.
HEADLINE = ("objective/scores", "reward", "objective/rm_score", "objective/rlhf_reward", "objective/kl", "kl",
            "train/loss", "eval/loss", "train/accuracy", "train/token_accuracy", "rewards/accuracies", "eval/accuracy",
            "rewards/margins", "eval/margin", "response/length_mean", "completions/mean_length")
# What the run was: the config fields shown first, where set.
KEY_FIELDS = ("model", "data", "eval_data", "reward_model", "reward_fn", "critic", "estimator", "loss_type", "lr",
              "epochs", "max_steps", "batch_size", "rollout_batch_size", "mini_batch_size", "num_generations",
              "ppo_epochs", "kl_coef", "adaptive_kl", "beta", "max_new_tokens", "temperature", "lora", "seed")

# ---- sections -----------------------------------------------------------------------------------

# The page's look, after the plots' (the demo's page embeds those too).
STYLE = PLOT_STYLE + """
body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;vertical-align:top;text-align:left}
pre{white-space:pre-wrap;margin:2px 0;font-size:13px}.p,.m{color:#666;font-size:12px}.samples td{width:33%}"""


def _plots(run: Run, keys: list[str], thresholds: dict[str, list[float]], marks_for) -> str:
    figures = []
    for key in keys:
        steps, values = run.series(key)
        if steps:
            figures.append(svg_plot(key, steps, values, thresholds.get(key, []), marks_for(key)))
    return '<div class="plots">' + "\n".join(figures) + "</div>"


def reward_fn_keys(run: Run) -> list[str]:
    """The per-reward-function curves of a PPO or GRPO run: ``rewards/NAME/mean`` and ``rewards/NAME/std``, or
    ``rewards/NAME`` where a run logged only that (before rlhf logged the std)."""
    if run.recipe not in ("ppo", "grpo"):
        return []
    keys = [k for k in run.metric_keys() if k.startswith("rewards/")]
    return [k for k in keys if k.endswith(("/mean", "/std")) or f"{k}/mean" not in keys]


def _warning_marks(run: Run, key: str | None = None) -> list[tuple[int, str]]:
    """Warning steps to mark: those of ``key``'s signal, or every warning (``key`` None)."""
    return [(int(e["step"]), str(e["event"])) for e in run.warnings if key is None or e["signal"] == key]


def _run_section(run: Run) -> str:
    esc = html.escape
    recipe = run.recipe or "unknown"
    rows = [("recipe", f"rlhf {COMMANDS.get(recipe, recipe)}")]
    config = run.config or {}
    for k in KEY_FIELDS:
        if config.get(k) is not None and config[k] != "" and config[k] is not False:
            rows.append((k, config[k]))
    steps = [int(r["step"]) for r in run.rows]
    if steps:
        rows.append(("steps logged", f"{len(steps)} lines, steps {min(steps)} to {max(steps)}"))
    for key in HEADLINE:
        s, v = run.series(key)
        if s:
            rows.append((f"final {key}", f"{fmt(v[-1])} (step {s[-1]}; first {fmt(v[0])} at step {s[0]})"))
    table = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in rows)
    if run.config is None:
        source = ("<p>No config saved yet (no model card README.md and no checkpoint): the recipe is guessed from "
                  "the metrics it logged.</p>")
    else:
        import yaml

        note = "" if run.config_source.startswith("README") else (
            "<p>A checkpoint's record holds only the fields that define what is trained (not --log-every, "
            "nor the --monitor-* thresholds).</p>")
        source = (f"<details><summary>Full config, from {esc(run.config_source)}</summary>"
                  f"<pre>{esc(yaml.safe_dump(run.config, sort_keys=False))}</pre></details>{note}")
    bad = (f"<p>{run.skipped_lines} line(s) that were not JSON were left out (a run stopped mid-write).</p>"
           if run.skipped_lines else "")
    return f"<h2>The run</h2>\n<table>{table}</table>\n{source}{bad}"


def monitor_section(run: Run, heading: str = "h2") -> str:
    """The over-optimisation monitor: one plot per ``monitor/...`` signal (threshold dashed red,
    warning step in orange) and the table of its warnings. Empty for a run without the monitor."""
    esc = html.escape
    keys = [k for k in run.metric_keys() if k.startswith("monitor/")]
    if not keys and not run.warnings:
        return ""
    thresholds = monitor_thresholds(run)
    parts = [f"<{heading}>Over-optimisation monitor</{heading}>",
             ("<p>Each signal of the policy's samples at each step, against the SFT model's samples at step 1 "
              "where it says <code>_vs_start</code>. Dashed red: the threshold (<code>--monitor-*</code>); "
              "orange: the step the monitor warned.</p>"),
             _plots(run, keys, thresholds, lambda k: _warning_marks(run, k))]
    warnings = run.warnings
    if warnings:
        head = "".join(f"<th>{h}</th>" for h in ("step", "signal", "value", "threshold", "message"))
        body = "".join(
            f"<tr><td>{esc(str(w['step']))}</td><td>{esc(str(w['signal']))}</td>"
            f"<td>{esc(fmt(w['value']) if is_number(w.get('value')) else str(w.get('value')))}</td>"
            f"<td>{esc(fmt(w['threshold']) if is_number(w.get('threshold')) else str(w.get('threshold')))}</td>"
            f"<td>{esc(str(w['event']))}</td></tr>" for w in warnings)
        parts.append(f"<table class=\"warnings\"><tr>{head}</tr>{body}</table>")
    else:
        parts.append("<p>No warnings.</p>")
    summary = [e for e in run.events if "monitor_warnings" in e]
    if summary:
        parts.append(f"<p>At the end (step {esc(str(summary[-1]['step']))}): {esc(str(summary[-1]['event']))}</p>")
    return "\n".join(parts)


def _prompt_text(prompt) -> str:
    if isinstance(prompt, list):  # chat messages
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, dict) else str(m)
                         for m in prompt)
    return str(prompt)


def sample_steps(run: Run, wanted: list[int] | None) -> list[int]:
    """The steps whose samples are shown: ``wanted`` (each must have samples), else first, middle, last."""
    have = sorted({int(s["step"]) for s in run.samples if is_number(s.get("step"))})
    if wanted:
        missing = [s for s in wanted if s not in have]
        if missing:
            listed = ", ".join(map(str, have)) if have else "none"
            raise UserError(f"--steps {','.join(map(str, missing))}: no samples at that step in "
                            f"{os.path.join(run.directory, SAMPLES_FILE)} (steps with samples: {listed})")
        return list(wanted)
    if not have:
        return []
    return sorted({have[0], have[len(have) // 2], have[-1]})


def samples_section(run: Run, steps: list[int]) -> str:
    """Sample responses at ``steps``, one column a step: prompt, completion, score and length (all escaped)."""
    esc = html.escape
    if not run.samples:
        if run.recipe in ("ppo", "grpo", "dpo"):
            return (f"<h2>Sample responses</h2><p>No {SAMPLES_FILE} in this run directory (PPO and GRPO write it "
                    "at step 1 and each logged step, DPO at step 0, each --eval-every step and the end; "
                    "--log-samples 0 turns it off).</p>")
        return ""
    by_step: dict[int, list[dict]] = {s: [] for s in steps}
    for s in run.samples:
        if s.get("step") in by_step:
            by_step[s["step"]].append(s)
    n = max(len(v) for v in by_step.values())
    head = "".join(f"<th>step {s}</th>" for s in steps)
    rows = []
    for i in range(n):
        cells = []
        for s in steps:
            if i >= len(by_step[s]):
                cells.append("<td></td>")
                continue
            x = by_step[s][i]
            score = fmt(x["score"]) if is_number(x.get("score")) else esc(str(x.get("score")))
            score = f"score {score} · " if "score" in x else ""  # DPO's samples have none
            cells.append(f'<td><div class="p">{esc(_prompt_text(x.get("prompt", "")))}</div>'
                         f'<pre>{esc(str(x.get("completion", "")))}</pre>'
                         f'<div class="m">{score}{esc(str(x.get("length", "?")))} tokens</div></td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    what = ("The policy's greedy completions of the first prompts of --eval-data (else --data): step 0 is before "
            "any update (length in tokens)." if run.recipe == "dpo" else
            "The first prompts of the rollout batch at each step shown (score before any KL penalty; length in tokens).")
    return (f"<h2>Sample responses</h2><p>{what} Steps with samples: choose with <code>--steps</code>.</p>"
            f'<table class="samples"><tr>{head}</tr>{"".join(rows)}</table>')


def _events_section(run: Run) -> str:
    other = [e for e in run.events if "signal" not in e and "monitor_warnings" not in e]
    if not other:
        return ""
    items = "".join(f"<li>step {html.escape(str(e.get('step')))}: {html.escape(str(e['event']))}</li>" for e in other)
    return f"<h2>Events</h2><ul>{items}</ul>"


def render(run: Run, steps: list[int] | None = None) -> str:
    """The whole page for ``run``; ``steps`` chooses the sample columns (default first, middle, last)."""
    chosen = sample_steps(run, steps)
    keys = run.metric_keys()
    headline = [k for k in HEADLINE if k in keys]
    per_fn = reward_fn_keys(run)
    others = [k for k in keys if k not in headline and not k.startswith("monitor/")
              and not (per_fn and k.startswith("rewards/"))]
    title = f"rlhf {COMMANDS.get(run.recipe, run.recipe or 'run')}: {run.directory}"
    curves = ""
    if headline:
        curves = ("<h2>Reward, KL and loss</h2><p>Orange: a step where the over-optimisation monitor warned.</p>"
                  if run.warnings else "<h2>Reward, KL and loss</h2>")
        curves += _plots(run, headline, {}, lambda k: _warning_marks(run))
    if per_fn:  # shown, not folded away with the other metrics
        curves += ("<h2>Reward functions</h2><p>Each reward function's mean and std over the step's completions "
                   "(a None, does not apply, left out).</p>" + _plots(run, per_fn, {}, lambda k: []))
    rest = ""
    if others:
        rest = (f"<details><summary>Every other metric ({len(others)})</summary>"
                f"{_plots(run, others, {}, lambda k: [])}</details>")
    sections = [_run_section(run), curves, monitor_section(run), samples_section(run, chosen), _events_section(run),
                f"<h2>Other metrics</h2>{rest}" if rest else ""]
    body = "\n".join(s for s in sections if s)
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def write_report(run_dir: str, output: str | None = None, steps: list[int] | None = None) -> str:
    """Write the page of ``run_dir`` to ``output`` (default ``RUN_DIR/report.html``) atomically; returns the path."""
    page = render(load_run(run_dir), steps)
    output = output or os.path.join(run_dir, "report.html")
    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
        raise UserError(f"--output {output}: no directory {directory}")
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".html", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"--output {output}: cannot write ({e.strerror or e})") from None
    return output


# ---- command line -------------------------------------------------------------------------------

def _steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected steps like 1,50,100, got {text!r}") from None
    if not steps:
        raise argparse.ArgumentTypeError("expected at least one step")
    return steps


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("run_dir", help="The --output-dir of an rlhf sft, rm, ppo, dpo or grpo run.")
    p.add_argument("--output", help="The HTML file to write (default RUN_DIR/report.html).")
    p.add_argument("--steps", type=_steps, help="Steps whose sample responses are shown side by side, e.g. 1,50,100 "
                                                "(default: the first, middle and last with samples).")


def main(args, name: str) -> int:
    print(write_report(args.run_dir, args.output, args.steps))
    return 0
