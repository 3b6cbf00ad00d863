"""The demo's table, plots and ``report.html``."""

from __future__ import annotations

import html
import json
import os

import torch
from safetensors.torch import load_file

from rlhf.demo.evaluate import evaluate_policy
from rlhf.models import load_causal_lm

COLUMNS = [("gold_reward_mean", "gold reward"), ("gold_reward_std", "gold std"), ("rm_score_mean", "RM score"),
           ("kl_to_sft", "KL to SFT"), ("distinct2", "distinct-2"), ("no_eos_fraction", "no EOS")]


def table(summary: dict) -> str:
    """The markdown table printed at the end of the demo and shown in the README."""
    lines = ["| model | " + " | ".join(c for _, c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name in ("sft", "ppo", "dpo"):
        row = summary[name]
        lines.append(f"| {name.upper()} | " + " | ".join(f"{row[k]:.3f}" for k, _ in COLUMNS) + " |")
    lines.append("")
    lines.append(f"Reward model held-out accuracy {summary['rm_heldout_accuracy']:.3f}; the gold labeller's "
                 f"agreement ceiling {summary['gold_agreement_ceiling']:.3f}.")
    lines.append("")
    lines.append(f"Answers to \"{summary['answers']['prompt']}\":")
    for name in ("sft", "ppo", "dpo"):
        lines.append(f"- {name.upper()}: {summary['answers'][name]}")
    return "\n".join(lines)


def _policy_from_checkpoint(ckpt: str, sft_dir: str):
    """The policy weights inside a PPO checkpoint (the actor of the actor-critic model)."""
    model = load_causal_lm(sft_dir)
    state = load_file(os.path.join(ckpt, "model.safetensors"))
    actor = {k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")}
    missing, unexpected = model.load_state_dict(actor, strict=False)
    if unexpected or any("lm_head" not in k for k in missing):
        raise ValueError(f"{ckpt}: not a shared-critic PPO checkpoint")
    model.tie_weights()
    return model.eval()


def frontier_points(ppo_dir: str, betas: list[float], path, sft, rm, tokenizer, complaints, seed: int) -> list[dict]:
    """Gold reward, RM score and KL of each PPO checkpoint and of DPO at each beta."""
    points = []
    ckpt_root = os.path.join(ppo_dir, "checkpoints")
    for name in sorted(os.listdir(ckpt_root)) if os.path.isdir(ckpt_root) else []:
        step = int(name.split("-")[1])
        m = evaluate_policy(_policy_from_checkpoint(os.path.join(ckpt_root, name), path("sft")), sft, rm, tokenizer,
                            complaints, samples=1, seed=seed)
        points.append({"method": "ppo", "step": step, **m})
    for beta in betas:
        d = path("dpo" if beta == 0.1 else f"dpo-beta{beta}")
        m = evaluate_policy(load_causal_lm(d).eval(), sft, rm, tokenizer, complaints, samples=1, seed=seed)
        points.append({"method": "dpo", "beta": beta, **m})
    return points


def _plots(out: str, summary: dict, ppo_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in open(os.path.join(ppo_dir, "metrics.jsonl")) if "objective/scores" in x]
    names = []
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot([r["step"] for r in rows], [r["objective/scores"] for r in rows])
    ax[0].set(title="PPO: reward-model score (normalised)", xlabel="PPO step")
    ax[1].plot([r["step"] for r in rows], [r["objective/kl"] for r in rows], color="tab:red")
    ax[1].set(title="PPO: KL to SFT per response", xlabel="PPO step")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ppo_curves.png"), dpi=110)
    names.append("ppo_curves.png")
    plt.close(fig)

    ppo_pts = [{"step": 0, **summary["sft"]}] + [p for p in summary["frontier"] if p["method"] == "ppo"]
    dpo_pts = [p for p in summary["frontier"] if p["method"] == "dpo"]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot([p["kl_to_sft"] for p in ppo_pts], [p["gold_reward_mean"] for p in ppo_pts], "o-", label="PPO checkpoints")
    ax.plot([p["kl_to_sft"] for p in dpo_pts], [p["gold_reward_mean"] for p in dpo_pts], "s", label="DPO at several beta")
    for p in dpo_pts:
        ax.annotate(f"beta={p['beta']}", (p["kl_to_sft"], p["gold_reward_mean"]), fontsize=7)
    ax.set(xlabel="KL to SFT", ylabel="gold reward", title="Reward vs KL frontier")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier.png"), dpi=110)
    names.append("frontier.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    steps = [p["step"] for p in ppo_pts]
    ax.plot(steps, [p["gold_reward_mean"] for p in ppo_pts], "o-", label="gold reward")
    ax.plot(steps, [p["rm_score_mean"] for p in ppo_pts], "s--", label="reward-model score")
    ax.set(xlabel="PPO step", title="Proxy vs gold over PPO (over-optimisation)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "rm_vs_gold.png"), dpi=110)
    names.append("rm_vs_gold.png")
    plt.close(fig)
    return names


def _explain_table(ppo_dir: str, sft_dir: str, rm_dir: str, prompt: str) -> str:
    from rlhf.data import Encoder
    from rlhf.models import PolicyWithValueHead, Reference, disable_dropout, freeze, load_sequence_classifier, load_tokenizer
    from rlhf.commands.explain import explain_rollout, render
    from rlhf.recipes.scoring import Scorer

    torch.manual_seed(0)
    tok = load_tokenizer(ppo_dir)
    model = PolicyWithValueHead(disable_dropout(load_causal_lm(ppo_dir)))
    model.load_value_head(ppo_dir)
    scorer = Scorer(freeze(load_sequence_classifier(rm_dir)))
    messages = [{"role": "user", "content": prompt}]
    rows, summary = explain_rollout(model, Reference(freeze(load_causal_lm(sft_dir)), share_lora_base=False), scorer, tok,
                                    Encoder(tok, 4096).prompt_ids(messages), messages, kl_coef=0.1, max_new_tokens=72,
                                    temperature=0.7)
    return render(rows, summary, "markdown")


def _md_table_to_html(md: str) -> str:
    out, in_table = [], False
    for line in md.splitlines():
        if line.startswith("|"):
            if set(line.replace("|", "").strip()) <= {"-"}:
                continue
            cells = [html.escape(c.strip()) for c in line.strip("|").split(" | ")]
            tag = "th" if not in_table else "td"
            out.append(("<table>" if not in_table else "") + "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
            in_table = True
        else:
            if in_table:
                out.append("</table>")
                in_table = False
            if line.strip():
                out.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        out.append("</table>")
    return "\n".join(out)


def monitor_html(out: str, ppo_dir: str) -> str:
    """The PPO run's over-optimisation monitor (its signals, thresholds and warnings) as a section of
    the demo's page, drawn by ``rlhf report``, which also writes the run's own page ``PPO_DIR/report.html``
    (curves, monitor, sample responses); the section links to it."""
    from rlhf.watch.report import monitor_section, write_report
    from rlhf.watch.runs import load_run

    page = write_report(ppo_dir)
    link = html.escape(os.path.relpath(page, out))
    section = monitor_section(load_run(ppo_dir)) or "<h2>Over-optimisation monitor</h2><p>The monitor was off.</p>"
    return (f'{section}\n<p>The PPO run\'s full report (every curve, sample responses at the first, middle and last '
            f'steps): <a href="{link}">{link}</a>, made by <code>rlhf report {html.escape(ppo_dir)}</code>.</p>')


def write_html(out: str, summary: dict, table_md: str, *, ppo_dir: str, sft_dir: str, rm_dir: str) -> None:
    """``report.html``: the table, the three plots, the PPO run's monitor signals and warnings, and the
    explain table for the seed's prompt."""
    from rlhf.watch.plots import PLOT_STYLE

    images = _plots(out, summary, ppo_dir)
    monitor = monitor_html(out, ppo_dir)
    explain_md = _explain_table(ppo_dir, sft_dir, rm_dir, summary["answers"]["prompt"])
    with open(os.path.join(out, "explain.md"), "w") as f:
        f.write(explain_md)
    body = "\n".join(f'<p><img src="{name}" alt="{name}"></p>' for name in images)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>SupportBot RLHF demo</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 6px;font-size:13px}}{PLOT_STYLE}</style></head><body>
<h1>SupportBot: from v1 to v2 with RLHF</h1>
<p>Seed 002 Part 5, run for real on a CPU in {summary['seconds']} s. Gold reward is the hidden labeller's score on
held-out complaints; the RM score is the learned proxy's.</p>
{_md_table_to_html(table_md)}
<h2>Plots</h2>
{body}
{monitor}
<h2>rlhf explain: the seed's Part 5 table for the seed's prompt (PPO policy, SFT reference)</h2>
{_md_table_to_html(explain_md)}
</body></html>"""
    with open(os.path.join(out, "report.html"), "w") as f:
        f.write(page)
