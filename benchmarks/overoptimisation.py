"""Issue 15: does the monitor see reward hacking, and do reward-model ensembles help? (CityGuide)

The task is :mod:`rlhf.demo.facts`, not SupportBot: a guide answers "Tell me about Lyon." with
facts; a hidden gold scorer judges the answers; the preference pairs carry a spurious
correlation (the good guides are the chatty ones) that a reward model learns as a shortcut.

Everything runs through the ``rlhf`` command line, as a user would run it:

1. a tokenizer and a small Llama-style model from scratch (in-process, as ``rlhf demo`` does);
2. ``rlhf sft`` on fair demonstrations;
3. ``rlhf rm`` (one model) and ``rlhf rm --ensemble K`` (K seeds) on the pairs;
4. ``rlhf ppo`` against the single reward model and against the ensemble under each
   aggregation (mean, mean - lambda std, min), all at the same KL coefficient and seeds, and
   against a second ensemble whose members also saw bootstrap resamples of the pairs; and one
   run whose reward is the gold scorer itself (a run with no flaw: both the score and the gold
   should rise, and the monitor should stay quiet).

The gold is measured on each step's own rollout batch: the gold scorer is passed as a reward
function of weight 0 (``--reward-fn rlhf.demo.facts:gold_reward:0``), so it is logged as
``rewards/rlhf.demo.facts:gold_reward`` and adds nothing to the reward (the script checks that
the single-RM run's scores are the same, at every step, with and without it). Prints one table: per run, gold,
RM score and KL at the start and end, the step at which the gold began to fall (the peak of
its 5-step moving average, when it later falls by more than 0.25 below it), the step of the
monitor's first warning, and what ``--stop-on-overoptimisation`` would keep (the best
``objective/scores`` before that warning, read from the same run's log: the run is the same up
to the stop).

    python benchmarks/overoptimisation.py [--out runs/overopt] [--steps 60] [--ensemble 3]
    python benchmarks/overoptimisation.py --out runs/overopt-300 --rm-pairs 300 --bootstrap 0 \
        --runs single,mean,mean_minus_std,min     # reward models from 300 pairs

Stages whose output exists are reused (``--fresh`` to redo them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

GOLD = "rewards/rlhf.demo.facts:gold_reward"


def rlhf(*args: str) -> None:
    cmd = [sys.executable, "-m", "rlhf.cli", *args]
    print("$ rlhf " + " ".join(args), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    print(f"  ({time.perf_counter() - t:.0f} s)", flush=True)


def read_metrics(run_dir: str) -> tuple[list[dict], list[dict]]:
    steps, events = {}, []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "event" in row:
                events.append(row)
            else:
                steps.setdefault(row["step"], {}).update(row)
    return [steps[s] for s in sorted(steps)], events


def moving(values: list[float], k: int = 5) -> list[float]:
    return [sum(values[max(0, i - k + 1): i + 1]) / len(values[max(0, i - k + 1): i + 1]) for i in range(len(values))]


def gold_fall_step(steps: list[dict], drop: float = 0.25) -> int | None:
    """The step of the peak of the gold's moving average, if the average later falls ``drop`` below it."""
    gold = moving([s[GOLD] for s in steps])
    peak = max(range(len(gold)), key=gold.__getitem__)
    return steps[peak]["step"] if min(gold[peak:]) < gold[peak] - drop else None


def summarise(name: str, run_dir: str) -> dict:
    steps, events = read_metrics(run_dir)
    warnings = [e for e in events if e["event"].startswith("warning: over-optimisation")]
    first = lambda key: sum(s[key] for s in steps[:5]) / len(steps[:5])  # noqa: E731
    last = lambda key: sum(s[key] for s in steps[-5:]) / len(steps[-5:])  # noqa: E731
    # The reward model's score: an ensemble's members' mean (its aggregate is lower by construction under
    # mean_minus_std and min), a single model's score, or the reward itself when there is no reward model.
    score_key = next(k for k in ("objective/rm_score_mean", "objective/rm_score", "objective/scores") if k in steps[-1])
    stop = None  # what --stop-on-overoptimisation would keep: the best objective/scores before the first warning
    if warnings:
        before = [s for s in steps if s["step"] < warnings[0]["step"]]
        if before:
            kept = max(before, key=lambda s: s["objective/scores"])
            stop = {"step": kept["step"], "gold": kept[GOLD]}
    return {"run": name, "stop": stop, "gold_start": first(GOLD), "gold_end": last(GOLD), "rm_start": first(score_key),
            "rm_end": last(score_key), "kl_end": last("objective/kl"), "gold_fall_step": gold_fall_step(steps),
            "first_warning": (warnings[0]["step"], warnings[0]["signal"]) if warnings else None,
            "curve": list(zip(moving([s["objective/kl"] for s in steps]), moving([s[GOLD] for s in steps])))}


def gold_at_kl(curve: list[tuple[float, float]], kl: float, width: float = 1.0) -> float | None:
    """The mean gold (5-step moving average) of a run's steps whose KL (moving average) is within
    ``width`` of ``kl``: how the single reward model's run scored at that KL."""
    near = [g for k, g in curve if abs(k - kl) <= width]
    return sum(near) / len(near) if near else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/overopt")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--ensemble", type=int, default=3, help="ensemble members (0: no ensemble runs)")
    ap.add_argument("--kl-coef", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0, help="seed of the world, the models and the reward models")
    ap.add_argument("--ppo-seeds", default="0,1,2", help="PPO seeds: every run is repeated with each")
    ap.add_argument("--bootstrap", type=int, default=5,
                    help="members of a second ensemble trained with --ensemble-bootstrap (0: none)")
    ap.add_argument("--runs", default="single,gold,mean,mean_minus_std,min,boot_mean_minus_std,boot_min",
                    help="which PPO runs (single, gold, and the ensemble aggregations)")
    ap.add_argument("--rm-pairs", type=int, default=0,
                    help="train the reward models on the first N pairs only (0: all): members then overfit each in "
                         "its own way, where with all pairs they share the planted flaw")
    ap.add_argument("--fresh", action="store_true", help="redo every stage")
    args = ap.parse_args()
    out = args.out
    path = lambda *p: os.path.join(out, *p)  # noqa: E731
    if args.fresh and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(path("data"), exist_ok=True)
    start = time.perf_counter()

    if not os.path.exists(path("base", "config.json")):
        from rlhf.demo.facts import build_datasets, corpus
        from rlhf.models import save_pretrained, tiny_causal_lm, train_tokenizer

        data = build_datasets(args.seed, n_sft=3000, n_pairs=2000)
        for name in ("sft", "pairs", "pairs_eval", "rl"):
            with open(path("data", f"{name}.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in data[name])
        tokenizer = train_tokenizer(corpus(data), vocab_size=512)
        save_pretrained(tiny_causal_lm(tokenizer, "llama", seed=args.seed, hidden_size=128, num_layers=3),
                        tokenizer, path("base"))
    common = ["--seed", str(args.seed), "--report-to", "none", "--max-length", "96"]
    if not os.path.exists(path("sft", "config.json")):
        rlhf("sft", "--model", path("base"), "--data", path("data", "sft.jsonl"), "--output-dir", path("sft"),
             "--epochs", "4", "--batch-size", "32", "--lr", "2e-3", "--warmup-ratio", "0.05", "--lr-scheduler", "cosine",
             "--overwrite-output-dir", *common)
    pairs = path("data", "pairs.jsonl")
    if args.rm_pairs:
        with open(pairs) as f:
            rows = f.readlines()[: args.rm_pairs]
        pairs = path("data", f"pairs-{args.rm_pairs}.jsonl")
        with open(pairs, "w") as f:
            f.writelines(rows)
    rm_args = ["--model", path("sft"), "--data", pairs, "--eval-data",
               path("data", "pairs_eval.jsonl"), "--epochs", str(2 if not args.rm_pairs else 6), "--batch-size", "32", "--lr", "3e-4",
               "--warmup-ratio", "0.05", "--overwrite-output-dir", *common]
    if not os.path.exists(path("rm", "config.json")):
        rlhf("rm", *rm_args, "--output-dir", path("rm"))
    if args.ensemble > 1 and not os.path.exists(path("rm-ensemble", "ensemble.json")):
        rlhf("rm", *rm_args, "--output-dir", path("rm-ensemble"), "--ensemble", str(args.ensemble))
    if args.bootstrap > 1 and not os.path.exists(path("rm-bootstrap", "ensemble.json")):
        rlhf("rm", *rm_args, "--output-dir", path("rm-bootstrap"), "--ensemble", str(args.bootstrap),
             "--ensemble-bootstrap")

    ppo = ["--model", path("sft"), "--data", path("data", "rl.jsonl"), "--max-steps", str(args.steps),
           "--rollout-batch-size", "32", "--mini-batch-size", "16", "--batch-size", "16", "--ppo-epochs", "4",
           "--max-new-tokens", "48", "--lr", "5e-5", "--critic-lr", "5e-4", "--kl-coef", str(args.kl_coef),
           "--missing-eos-penalty", "1.0", "--temperature", "0.8", "--overwrite-output-dir", "--report-to", "none",
           "--max-length", "96"]
    gold0 = ["--reward-fn", "rlhf.demo.facts:gold_reward:0"]
    runs = {
        "single": ["--reward-model", path("rm"), *gold0],
        "gold": ["--reward-fn", "rlhf.demo.facts:gold_reward"],
        "mean": ["--reward-model", path("rm-ensemble"), "--reward-aggregation", "mean", *gold0],
        "mean_minus_std": ["--reward-model", path("rm-ensemble"), "--reward-aggregation", "mean_minus_std",
                           "--reward-uncertainty-coef", "1.0", *gold0],
        "min": ["--reward-model", path("rm-ensemble"), "--reward-aggregation", "min", *gold0],
        "boot_mean_minus_std": ["--reward-model", path("rm-bootstrap"), "--reward-aggregation", "mean_minus_std",
                                "--reward-uncertainty-coef", "1.0", *gold0],
        "boot_min": ["--reward-model", path("rm-bootstrap"), "--reward-aggregation", "min", *gold0],
    }
    rows = []
    seeds = [int(x) for x in args.ppo_seeds.split(",")]
    for name in args.runs.split(","):
        for seed in seeds:
            run_dir = path(f"ppo-{name}-s{seed}")
            if not os.path.exists(os.path.join(run_dir, "config.json")):
                rlhf("ppo", *ppo, *runs[name], "--seed", str(seed), "--output-dir", run_dir)
            rows.append({**summarise(name, run_dir), "seed": seed})
    # The gold reward function has weight 0: the single-RM run without it must train identically.
    inert = path("ppo-single-nogold-s0")
    if "single" in args.runs.split(",") and 0 in seeds:
        if not os.path.exists(os.path.join(inert, "config.json")):
            rlhf("ppo", *ppo, "--reward-model", path("rm"), "--seed", "0", "--output-dir", inert)
        a = [s["objective/scores"] for s in read_metrics(path("ppo-single-s0"))[0]]
        b = [s["objective/scores"] for s in read_metrics(inert)[0]]
        print(f"gold at weight 0 is inert: objective/scores of all {len(a)} steps equal without it: {a == b}")
    with open(path("summary.json"), "w") as f:
        json.dump(rows, f, indent=2)
    single = {r["seed"]: r["curve"] for r in rows if r["run"] == "single"}
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    print(f"\nMeans over PPO seeds {args.ppo_seeds} (start: first 5 steps, end: last 5 of {args.steps}); per seed, "
          "the step where the gold began to fall and the monitor's first warning.\n")
    print("| PPO reward | gold start -> end | single RM's gold at the same KL | RM score start -> end | KL end | "
          "gold began to fall | monitor first warned | --stop-on-overoptimisation keeps: step: its rollout's gold |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.runs.split(","):
        rs = [r for r in rows if r["run"] == name]
        same = [g for r in rs if r["seed"] in single and (g := gold_at_kl(single[r["seed"]], r["kl_end"])) is not None]
        falls = ", ".join(f"{r['gold_fall_step']}" if r["gold_fall_step"] else "-" for r in rs)
        warns = ", ".join(f"{r['first_warning'][0]} ({r['first_warning'][1].split('/')[-1]})" if r["first_warning"]
                          else "-" for r in rs)
        stops = ", ".join(f"{r['stop']['step']}: {r['stop']['gold']:.2f}" if r["stop"] else "-" for r in rs)
        print(f"| {name} | {mean([r['gold_start'] for r in rs]):.2f} -> {mean([r['gold_end'] for r in rs]):.2f} | "
              f"{mean(same):.2f} | {mean([r['rm_start'] for r in rs]):.2f} -> {mean([r['rm_end'] for r in rs]):.2f} | "
              f"{mean([r['kl_end'] for r in rs]):.1f} | {falls} | {warns} | {stops} |")
    print(f"\n{time.perf_counter() - start:.0f} s; summary in {path('summary.json')}")


if __name__ == "__main__":
    main()
