"""The built-in multi-turn example: a tiny model learns, by GRPO on episodes, to call a calculator tool.

The task is two-digit arithmetic ("What is 37 * 48?"), which a tiny model cannot do in its head but can
with a ``calculator`` tool: call it (``<tool_call>{"name": "calculator", "arguments": {"expression":
"37 * 48"}}</tool_call>``), read the result, and answer with it. A tiny model (Llama-shaped, untrained)
is first taught by ``rlhf sft`` on conversations of which 40% use the tool (the rest answer with a
random number), then trained by ``rlhf grpo --env`` on episodes, rewarded 1 for the right answer.
Everything runs on a CPU with no download; it prints the table and writes ``summary.json``.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass

from rlhf.errors import UserError

# Qwen's tool-calling style over the tiny tokenizer's role tokens: tool results come back in a user turn.
TOOL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>Tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}<|end|>"
    "{% endif %}{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}"
    "{% if m.tool_calls is defined %}{% for c in m.tool_calls %}<tool_call>{{ {'name': c['function']['name'], "
    "'arguments': c['function']['arguments']} | tojson }}</tool_call>{% endfor %}{% endif %}<|end|>"
    "{% elif m['role'] == 'tool' %}<|user|><tool_response>{{ m['content'] }}</tool_response><|end|>"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass
class Config:
    """Calculator-tool demo options."""

    output_dir: str = "runs/calculator-demo"
    """Where data, the SFT model, the GRPO policy and summary.json go."""
    seed: int = 0
    """Seed of the data, the models and the sampling."""
    sft_steps: int = 3000
    """SFT steps on the demonstrations."""
    grpo_steps: int = 60
    """GRPO steps on episodes."""

    def check(self) -> None:
        if not self.output_dir:
            raise UserError("--output-dir must not be empty")
        if self.sft_steps < 1 or self.grpo_steps < 1:
            raise UserError("--sft-steps and --grpo-steps must be at least 1")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression of integers with +, - and *.

    Args:
        expression: The expression, such as 37 * 48.
    """
    if not re.fullmatch(r"\s*\d+(\s*[-+*]\s*\d+)*\s*", expression):
        return "error: only integers with +, - and *"
    numbers = [int(n) for n in re.findall(r"\d+", expression)]
    ops = re.findall(r"[-+*]", expression)
    terms, signs = [numbers[0]], []
    for op, n in zip(ops, numbers[1:]):  # products first, then sums, left to right
        if op == "*":
            terms[-1] *= n
        else:
            terms.append(n)
            signs.append(1 if op == "+" else -1)
    return str(terms[0] + sum(s * t for s, t in zip(signs, terms[1:])))


def calculator_env():
    """One episode's environment: the calculator as its one tool (rlhf grpo --env rlhf.demo.calculator:calculator_env)."""
    from rlhf.rollout.env import ToolEnv

    return ToolEnv([calculator])


def correct(prompts, completions, answer=None, **columns):
    """1.0 where the final answer is the right number."""
    text = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(t.strip() == a) for t, a in zip(text, answer)]


def question(rng: random.Random) -> tuple[str, str, str]:
    a, b, op = rng.randint(10, 99), rng.randint(10, 99), rng.choice("+-*")
    expression = f"{a} {op} {b}"
    return f"What is {expression}?", expression, calculator(expression)


# What the template writes for the tools of an episode, as a message: SFT's conversations open with it too.
SYSTEM = {"role": "system", "content": "Tools: calculator"}


def demonstrations(seed: int, n: int = 2000, with_tool: float = 0.4) -> list[dict]:
    """SFT conversations: a ``with_tool`` share call the calculator and answer with its result; the rest
    answer at once with a guess (a random number)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q, expression, result = question(rng)
        if rng.random() < with_tool:
            call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}
            messages = [SYSTEM, {"role": "user", "content": q}, {"role": "assistant", "content": "", "tool_calls": [call]},
                        {"role": "tool", "name": "calculator", "content": result},
                        {"role": "assistant", "content": result}]
        else:
            guess = str(rng.randint(-99, 9999))
            messages = [SYSTEM, {"role": "user", "content": q}, {"role": "assistant", "content": guess}]
        rows.append({"messages": messages})
    return rows


def run(cfg: Config) -> dict:
    import torch

    from rlhf import api
    from rlhf.models import save_pretrained, tiny_causal_lm, train_tokenizer
    from rlhf.rollout.env import tool_schemas

    cfg.check()
    out = cfg.output_dir
    os.makedirs(out, exist_ok=True)
    sft_rows = demonstrations(cfg.seed)
    rng = random.Random(cfg.seed + 1)
    prompts = [{"prompt": q, "answer": r} for q, _, r in (question(rng) for _ in range(256))]
    for name, rows in (("sft.jsonl", sft_rows), ("prompts.jsonl", prompts)):
        with open(os.path.join(out, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    texts = []
    rng_text = random.Random(cfg.seed + 2)
    for _ in range(2000):
        q, e, r = question(rng_text)
        call = json.dumps({"name": "calculator", "arguments": {"expression": e}})
        texts.append(f"Tools: calculator {q} <tool_call>{call}</tool_call> <tool_response>{r}</tool_response> {r}")
    tok = train_tokenizer(texts, vocab_size=400)
    tok.chat_template = TOOL_TEMPLATE
    tools = tool_schemas([calculator])
    torch.manual_seed(cfg.seed)
    save_pretrained(tiny_causal_lm(tok, "llama", hidden_size=64, num_layers=2), tok, os.path.join(out, "init"))
    common = dict(report_to="none", seed=cfg.seed, overwrite_output_dir=True)
    # 1. rlhf sft --model init --data sft.jsonl --output-dir sft --max-steps 3000 --batch-size 16 --lr 3e-3
    api.sft(os.path.join(out, "init"), data=os.path.join(out, "sft.jsonl"), output_dir=os.path.join(out, "sft"),
            max_steps=cfg.sft_steps, batch_size=16, lr=3e-3, log_every=100, **common)
    # 2. rlhf grpo --model sft --data prompts.jsonl --env rlhf.demo.calculator:calculator_env
    #      --reward-fn rlhf.demo.calculator:correct --max-turns 3 --max-new-tokens 40 ...
    api.grpo(os.path.join(out, "sft"), data=os.path.join(out, "prompts.jsonl"), env="rlhf.demo.calculator:calculator_env",
             reward_fn="rlhf.demo.calculator:correct", output_dir=os.path.join(out, "grpo"), max_steps=cfg.grpo_steps,
             max_turns=3, max_new_tokens=40, rollout_batch_size=8, num_generations=8, mini_batch_size=64,
             batch_size=16, lr=1e-3, log_every=1, **common)
    rows = [json.loads(x) for x in open(os.path.join(out, "grpo", "metrics.jsonl")) if '"env/turns"' in x]
    k = max(1, len(rows) // 5)

    def mean(key, part):
        return sum(r[key] for r in part) / len(part)

    keys = ("reward", "env/tool_call_fraction", "env/used_tool_result", "env/turns")
    summary = {key: [mean(key, rows[:k]), mean(key, rows[-k:])] for key in keys}
    summary.update({"grpo_steps": cfg.grpo_steps, "steps_averaged": k, "tools": tools})
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\n{'GRPO episodes (mean of ' + str(k) + ' steps)':<36}{'first':>10}{'last':>10}")
    for key in keys:
        print(f"{key:<36}{summary[key][0]:>10.3f}{summary[key][1]:>10.3f}")
    return summary
