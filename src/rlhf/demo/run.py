"""The built-in default: SupportBot (seed 002 Part 5), end to end on a CPU, with no download.

SupportBot-v1 answers a frustrated customer coldly ("Your order is delayed."). This pipeline
generates a synthetic support world, trains a tokenizer and a small model from scratch on
mostly mediocre demonstrations (SFT), trains a reward model on noisy human-like preferences,
then runs PPO against it and DPO on the same pairs, and evaluates all three with the hidden
gold labeller. It writes ``summary.json``, ``report.html`` with plots (the PPO run's over-optimisation
monitor among them), ``ppo/report.html`` (``rlhf report`` of the PPO run), and prints the table.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from rlhf.errors import UserError


@dataclass
class Config:
    """Demo options."""

    output_dir: str = "runs/demo"
    """Where data, models, summary.json and report.html go."""
    seed: int = 0
    """Seed of the world, the models and the sampling: the same seed gives the same table."""
    fast: bool = False
    """A smaller model and fewer steps (what the test suite runs)."""
    dpo_betas: str = "0.05,0.3"
    """Extra DPO betas for the reward-vs-KL frontier (comma list; empty: none)."""

    def check(self) -> None:
        if not self.output_dir:
            raise UserError("--output-dir must not be empty")


@dataclass
class Sizes:
    hidden: int
    layers: int
    n_sft: int
    n_pairs: int
    sft_epochs: int
    rm_epochs: int
    ppo_steps: int
    n_eval: int


FULL = Sizes(hidden=128, layers=4, n_sft=4000, n_pairs=3000, sft_epochs=3, rm_epochs=2, ppo_steps=60, n_eval=128)
FAST = Sizes(hidden=32, layers=2, n_sft=200, n_pairs=200, sft_epochs=1, rm_epochs=1, ppo_steps=3, n_eval=8)


def _write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def run(cfg: Config) -> dict:
    import torch

    from rlhf.demo import report
    from rlhf.demo.evaluate import answer, evaluate_policy
    from rlhf.demo.world import SEED_PROMPT, build_datasets, corpus
    from rlhf.models import load_causal_lm, load_sequence_classifier, save_pretrained, tiny_causal_lm, train_tokenizer
    from rlhf.recipes import dpo, ppo, reward, sft

    start = time.perf_counter()
    size = FAST if cfg.fast else FULL
    out = cfg.output_dir
    path = lambda *p: os.path.join(out, *p)  # noqa: E731
    os.makedirs(path("data"), exist_ok=True)
    torch.manual_seed(cfg.seed)
    # The demo owns its directory: a second demo replaces the first one's models.
    common = dict(seed=cfg.seed, report_to="none", max_length=128, on_bad_record="error", overwrite_output_dir=True)

    # 0. A synthetic support world: complaints, demonstrations, noisy preference pairs.
    data = build_datasets(cfg.seed, n_sft=size.n_sft, n_pairs=size.n_pairs, n_rl=512, n_eval=size.n_eval,
                          n_pref_eval=max(64, size.n_eval * 3))
    files = {name: _write_jsonl(path("data", f"{name}.jsonl"), data[name]) for name in ("sft", "pairs", "pairs_eval", "rl", "eval")}
    print(f"[0/5] world: {len(data['sft'])} demonstrations, {len(data['pairs'])} preference pairs, "
          f"{len(data['eval'])} held-out complaints")

    # 1. Train the tokenizer; build SupportBot-v0, a small Llama-style model from scratch.
    tokenizer = train_tokenizer(corpus(data), vocab_size=1024)
    save_pretrained(tiny_causal_lm(tokenizer, "llama", seed=cfg.seed, hidden_size=size.hidden, num_layers=size.layers),
                    tokenizer, path("base"))
    print(f"[1/5] tokenizer: {len(tokenizer)} tokens; model: {size.layers} layers x {size.hidden}")

    # 2. SFT on mostly mediocre demonstrations: SupportBot-v1.
    sft_metrics = sft.run(sft.Config(model=path("base"), data=files["sft"], output_dir=path("sft"), epochs=size.sft_epochs,
                                     batch_size=32, lr=3e-3, warmup_ratio=0.05, lr_scheduler="cosine", **common))
    print(f"[2/5] SFT: loss {sft_metrics['train/loss']:.3f}")

    # 3. The reward model, on noisy human-like preferences.
    rm_metrics = reward.run(reward.Config(model=path("sft"), data=files["pairs"], eval_data=files["pairs_eval"],
                                          output_dir=path("rm"), epochs=size.rm_epochs, batch_size=32, lr=3e-4,
                                          warmup_ratio=0.05, **common))
    print(f"[3/5] reward model: held-out accuracy {rm_metrics['eval/accuracy']:.3f} "
          f"(gold labeller's ceiling {data['ceiling'][0]['gold_agreement_ceiling']:.3f})")

    # 4. PPO from SFT against the reward model: SupportBot-v2.
    ppo_every = max(1, size.ppo_steps // 4)
    ppo.run(ppo.Config(model=path("sft"), reward_model=path("rm"), data=files["rl"], output_dir=path("ppo"),
                       max_steps=size.ppo_steps, rollout_batch_size=32, mini_batch_size=16, batch_size=16,
                       ppo_epochs=4, max_new_tokens=72, lr=5e-5, critic_lr=5e-4, kl_coef=0.25, vf_coef=0.5,
                       ent_coef=0.0, missing_eos_penalty=1.0, temperature=0.7, save_every=ppo_every, save_total_limit=0, **common))
    print("[4/5] PPO done")

    # 5. DPO from SFT on the same pairs (and at other betas, for the frontier).
    betas = [0.1] + [float(b) for b in cfg.dpo_betas.split(",") if b.strip() and not cfg.fast]
    for beta in betas:
        dpo.run(dpo.Config(model=path("sft"), data=files["pairs"], output_dir=path("dpo" if beta == 0.1 else f"dpo-beta{beta}"),
                           epochs=1, batch_size=32, lr=1e-4, beta=beta, warmup_ratio=0.05, **common))
    print("[5/5] DPO done")

    # Evaluate with the gold labeller on held-out complaints.
    tok = tokenizer
    sft_model = load_causal_lm(path("sft")).eval()
    rm = load_sequence_classifier(path("rm")).eval()
    complaints = [r["complaint"] for r in data["eval"]]
    results, answers = {}, {}
    for name in ("sft", "ppo", "dpo"):
        model = sft_model if name == "sft" else load_causal_lm(path(name)).eval()
        results[name] = evaluate_policy(model, sft_model, rm, tok, complaints, seed=cfg.seed)
        answers[name] = answer(model, tok, SEED_PROMPT)
    frontier = report.frontier_points(path("ppo"), betas, path, sft_model, rm, tok, complaints, cfg.seed)
    summary = {**results, "rm_heldout_accuracy": rm_metrics["eval/accuracy"],
               "gold_agreement_ceiling": data["ceiling"][0]["gold_agreement_ceiling"],
               "answers": {"prompt": SEED_PROMPT, **answers}, "frontier": frontier,
               "seconds": round(time.perf_counter() - start, 1)}
    with open(path("summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    table = report.table(summary)
    print("\n" + table)
    report.write_html(out, summary, table, ppo_dir=path("ppo"), sft_dir=path("sft"), rm_dir=path("rm"))
    print(f"\nsummary: {path('summary.json')}\nreport:  {path('report.html')}\nPPO run: {path('ppo', 'report.html')}")
    return summary
