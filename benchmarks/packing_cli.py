"""Padding-free against padded, through the CLI, on tiny models of several architectures.

Each pair of runs is the same command with and without the padding-free layout, same seed; the
step-1 metric must agree (issue 13's table): DPO ``logps/chosen`` (``--no-share-prompt``), GRPO
``entropy`` (``--no-share-prompt``) and SFT ``train/loss`` (``--packing``). Models: hidden 64,
2 layers, weights drawn wide (initializer range 0.2) so log-probs are far from uniform.
GPT-2's dropout (0.1 by default) is set to 0: SFT trains with dropout on, and its random masks
differ between a packed and a padded batch, so the two step-1 losses would differ by chance
(0.8% here with it on), not by layout. DPO and GRPO turn dropout off themselves.

    python benchmarks/packing_cli.py            # about 4 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

MODELS = [  # (label, architecture, attention kernel or None for the model's default, sliding window)
    ("Mistral, sliding window 4 (SDPA)", "mistral", "sdpa", 4),
    ("Gemma 2, sliding window 4", "gemma2", None, 4),
    ("GPT-J (eager by default)", "gptj", None, None),
    ("GPT-2, eager", "gpt2", "eager", None),
    ("Llama, eager", "llama", "eager", None),
    ("Qwen3-MoE, sliding window 4, eager", "qwen3_moe", "eager", 4),
]
REWARD = "def length(prompts, completions, **kw):\n    return [len(c) / 10 for c in completions]\n"


def make_world(root: str) -> str:
    import random

    from rlhf.models import train_tokenizer

    rng = random.Random(0)
    words = "my order is late again this is unacceptable sorry refund the box arrived broken thanks help".split()

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    rows = {"sft": [{"prompt": text(rng.randint(3, 9)), "completion": text(rng.randint(4, 14))} for _ in range(16)],
            "pairs": [{"prompt": text(rng.randint(3, 9)), "chosen": text(rng.randint(4, 14)),
                       "rejected": text(rng.randint(2, 10))} for _ in range(16)],
            "prompts": [{"prompt": text(rng.randint(3, 9))} for _ in range(16)]}
    for name, rs in rows.items():
        with open(os.path.join(root, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rs)
    with open(os.path.join(root, "zoo_reward.py"), "w") as f:
        f.write(REWARD)
    return train_tokenizer([text(12) for _ in range(200)], vocab_size=300)


def build(root: str, tokenizer, arch: str, kernel: str | None, window: int | None) -> str:
    from rlhf.models import save_pretrained, tiny_causal_lm

    extra = {"attn_implementation": kernel} if kernel else {}
    if arch == "gpt2":
        extra.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = tiny_causal_lm(tokenizer, arch, initializer_range=0.2, sliding_window=window, **extra)
    path = os.path.join(root, arch)
    save_pretrained(model, tokenizer, path)
    return path


def step1(root: str, args: list[str], key: str) -> float:
    out = tempfile.mkdtemp(dir=root)
    cmd = [sys.executable, "-m", "rlhf.cli", *args, "--output-dir", out, "--max-steps", "1", "--report-to", "none",
           "--seed", "0"]
    run = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr[-2000:]}")
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if key in x]
    return rows[0][key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma list of architectures to run")
    only = parser.parse_args().only
    root = tempfile.mkdtemp(prefix="packing-cli-")
    tokenizer = make_world(root)
    print("| model | DPO `logps/chosen` shared vs not | GRPO step-1 `entropy` packed vs not "
          "| SFT step-1 `train/loss` packed vs not | worst rel. diff |")
    print("|---|---|---|---|---|")
    for label, arch, kernel, window in MODELS:
        if only and arch not in only.split(","):
            continue
        model = build(root, tokenizer, arch, kernel, window)
        base = ["--model", model] + (["--attn-implementation", kernel] if kernel else [])
        jobs = {
            "dpo": (["dpo", "--data", "pairs.jsonl", "--batch-size", "8"], "--share-prompt", "--no-share-prompt",
                    "logps/chosen"),
            "grpo": (["grpo", "--data", "prompts.jsonl", "--reward-fn", "zoo_reward:length", "--rollout-batch-size", "4",
                      "--num-generations", "4", "--mini-batch-size", "16", "--max-new-tokens", "12"],
                     "--share-prompt", "--no-share-prompt", "entropy"),
            "sft": (["sft", "--data", "sft.jsonl", "--batch-size", "8"], "--packing", "--no-packing", "train/loss"),
        }
        cells, worst = [], 0.0
        for cmd, on, off, key in jobs.values():
            a = step1(root, cmd[:1] + base + cmd[1:] + [on], key)
            b = step1(root, cmd[:1] + base + cmd[1:] + [off], key)
            worst = max(worst, abs(a - b) / max(abs(b), 1e-12))
            cells.append(f"{a:.5g} vs {b:.5g}")
        print(f"| {label} | " + " | ".join(cells) + f" | {worst:.1e} |", flush=True)


if __name__ == "__main__":
    main()
