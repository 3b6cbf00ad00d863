"""The built-in distillation example: a teacher taught by SFT, distilled on-policy into a smaller student.

The task is counting: "Count from 3 to 7." -> " 3 4 5 6 7". A teacher (a 2-layer model, hidden 64,
untrained) learns it by ``rlhf sft``; a student of width 48 (about half the teacher's weights), untrained,
then learns it by ``rlhf distill`` from the teacher alone, never seeing a completion. Held-out ranges
(start and length pairs the training prompts never ask for) measure the student's per-token reverse
KL to the teacher and its exact-match accuracy against the teacher's. Everything runs on a CPU with
no download; it prints the table and writes ``summary.json``. The commands it runs are the README's
("On-policy distillation").
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

from rlhf.errors import UserError


@dataclass
class Config:
    """Distillation demo options."""

    output_dir: str = "runs/distill-demo"
    """Where data, the teacher, the student and summary.json go."""
    seed: int = 0
    """Seed of the data, the models and the sampling."""
    teacher_steps: int = 300
    """SFT steps of the teacher."""
    distill_steps: int = 600
    """Distillation steps of the student."""

    def check(self) -> None:
        if not self.output_dir:
            raise UserError("--output-dir must not be empty")
        if self.teacher_steps < 1 or self.distill_steps < 1:
            raise UserError("--teacher-steps and --distill-steps must be at least 1")


def exact_count(prompts, completions, completion=None, **columns):
    """1.0 where the completion is the data's completion (the counting is right), else 0."""
    return [float(c.strip() == a.strip()) for c, a in zip(completions, completion)]


def counting_rows(seed: int) -> tuple[list[dict], list[dict]]:
    """Training rows and held-out rows: "Count from S to E." -> " S S+1 ... E", with the (S, length)
    pairs split so the held-out ones are never asked for in training."""
    pairs = [(s, n) for s in range(10) for n in range(1, 7)]
    random.Random(seed).shuffle(pairs)
    held, train = pairs[:12], pairs[12:]

    def row(s: int, n: int) -> dict:
        return {"prompt": f"Count from {s} to {s + n - 1}.", "completion": " " + " ".join(map(str, range(s, s + n)))}

    rng = random.Random(seed + 1)
    return [row(*rng.choice(train)) for _ in range(400)], [row(s, n) for s, n in held for _ in range(2)]


def run(cfg: Config) -> dict:
    from rlhf import api
    from rlhf.models import save_pretrained, tiny_causal_lm, train_tokenizer

    cfg.check()
    out = cfg.output_dir
    os.makedirs(out, exist_ok=True)
    train, held = counting_rows(cfg.seed)
    for name, rows in (("sft.jsonl", train), ("eval.jsonl", held)):
        with open(os.path.join(out, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    tok = train_tokenizer([r["prompt"] + r["completion"] for r in train + held], vocab_size=300)
    import torch

    torch.manual_seed(cfg.seed)
    save_pretrained(tiny_causal_lm(tok, "llama", hidden_size=64, num_layers=2), tok, os.path.join(out, "teacher-init"))
    save_pretrained(tiny_causal_lm(tok, "llama", hidden_size=48, num_layers=2), tok, os.path.join(out, "student-init"))
    common = dict(report_to="none", seed=cfg.seed, overwrite_output_dir=True, batch_size=16, lr=3e-3)
    # 1. The teacher learns the task from demonstrations:
    #    rlhf sft --model teacher-init --data sft.jsonl --output-dir teacher --max-steps 300 --batch-size 16 --lr 3e-3
    api.sft(os.path.join(out, "teacher-init"), data=os.path.join(out, "sft.jsonl"),
             output_dir=os.path.join(out, "teacher"), max_steps=cfg.teacher_steps, log_every=50, **common)
    # 2. The student learns it from the teacher on its own samples (the data's completions are only read by the
    #    evaluation's exact-match metric):
    #    rlhf distill --model student-init --teacher teacher --data sft.jsonl --eval-data eval.jsonl
    #      --eval-reward-fn rlhf.demo.distill:exact_count --eval-every 100 --max-steps 600 --batch-size 16 --lr 3e-3
    result = api.distill(os.path.join(out, "student-init"), teacher=os.path.join(out, "teacher"),
                          data=os.path.join(out, "sft.jsonl"), eval_data=os.path.join(out, "eval.jsonl"),
                          eval_reward_fn="rlhf.demo.distill:exact_count", eval_every=100, max_new_tokens=16,
                          output_dir=os.path.join(out, "student"), max_steps=cfg.distill_steps, log_every=50, **common)
    rows = [json.loads(x) for x in open(os.path.join(out, "student", "metrics.jsonl")) if '"eval/reverse_kl"' in x]
    first, last = rows[0], rows[-1]
    summary = {"reverse_kl": [first["eval/reverse_kl"], last["eval/reverse_kl"]],
               "student_exact_match": [first["eval/reward"], last["eval/reward"]],
               "teacher_exact_match": last["eval/teacher_reward"], "distill_steps": cfg.distill_steps,
               "model_path": result.model_path}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\n{'held-out prompts (' + str(len(held)) + ')':<34}{'step 0':>10}{'step ' + str(last['step']):>12}")
    print(f"{'reverse KL to the teacher / token':<34}{first['eval/reverse_kl']:>10.3f}{last['eval/reverse_kl']:>12.3f}")
    print(f"{'student exact match':<34}{first['eval/reward']:>10.3f}{last['eval/reward']:>12.3f}")
    print(f"{'teacher exact match':<34}{last['eval/teacher_reward']:>10.3f}{last['eval/teacher_reward']:>12.3f}")
    return summary
