"""The online recipes' multi-turn step: G episodes per prompt in an environment (``--env module:factory``),
played token-in, token-out (:func:`rlhf.rollout.env.run_episodes`), and their rewards.

An episode's score is the sum of the rewards its environment returned plus, when ``--reward-fn`` is
given, the reward functions' score of its final answer (the last assistant message's content, in the
prompt's form, with the row's columns), as in TRL where an environment's reward and ``reward_funcs``
add up.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Callable

import torch

from rlhf import handles
from rlhf.data.encode import PLAIN_CHAT_TEMPLATE
from rlhf.errors import UserError
from rlhf.recipes.rewards import in_prompt_form
from rlhf.rollout import SamplingParams
from rlhf.rollout.env import check_append_only, episodes_to_batch, run_episodes
from rlhf.training.loop import reduce_sum, shard


def load_env_factory(spec: str) -> Callable:
    """``module:factory`` (the working directory importable), or the handle of a callable handed in from Python."""
    fn = handles.lookup(spec)
    if callable(fn):
        return fn
    module, _, name = spec.partition(":")
    if not module or not name:
        raise UserError(f"--env {spec}: expected module:factory")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"--env {spec}: {e}") from None
    if not callable(fn):
        raise UserError(f"--env {spec}: {name} is not callable")
    return fn


class EpisodeSampler:
    """Environments from ``factory`` (one per episode), the chat template they render with, their tools."""

    def __init__(self, spec: str, tokenizer, max_turns: int, max_length: int):
        self.factory = load_env_factory(spec)
        self.name = spec
        self.tokenizer, self.max_turns, self.max_length = tokenizer, max_turns, max_length
        self.template = tokenizer.chat_template or PLAIN_CHAT_TEMPLATE
        probe = self.new_env()
        self.tools = getattr(probe, "schemas", None) or None
        check_append_only(tokenizer, self.template, self.tools)

    @classmethod
    def for_run(cls, cfg, accelerator, tokenizer) -> "EpisodeSampler | None":
        """The sampler of ``cfg.env`` (None without one); refused where processes are sharded."""
        if not cfg.env:
            return None
        if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):  # uneven turn loops would hang the shards
            raise UserError("--env under FSDP or DeepSpeed: not supported yet (use DDP, or one process)")
        return cls(cfg.env, tokenizer, cfg.max_turns, cfg.max_length)

    def new_env(self):
        try:
            env = self.factory()
        except Exception as e:
            raise UserError(f"--env {self.name}: the factory raised {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
        missing = [m for m in ("reset(row)", "step(message)") if not callable(getattr(env, m.split("(")[0], None))]
        if missing:
            raise UserError(f"--env {self.name}: the factory returned {type(env).__name__}, which has no "
                            f"{' and no '.join(missing)} (rlhf.rollout.env.Environment)")
        return env

    def __call__(self, accelerator, rollout, prompts, indices: list[int], sampling: SamplingParams, scorer, timer):
        """Steps 1-3 with episodes: ``(batch, completions, scores, metrics, examples, None)``, as
        :func:`rlhf.recipes.scoring.sample_groups` returns them (the completions: whole episodes, special
        tokens and turns kept, for the samples log)."""
        G = sampling.num_samples
        examples = [prompts.examples[i] for i in shard(indices, accelerator.process_index, accelerator.num_processes)]
        rows = [e for e in examples for _ in range(G)]
        envs = [self.new_env() for _ in rows]
        names = [f"{self.name} ({rows[k].get('_where', f'row {k // G}')})" for k in range(len(rows))]
        one = SamplingParams(sampling.temperature, sampling.top_p, sampling.top_k, sampling.max_new_tokens, 1)
        episodes = run_episodes(rollout, self.tokenizer, self.template, envs, rows, one, self.max_turns,
                                self.max_length, self.tools, names)
        batch = episodes_to_batch(episodes, self.tokenizer.pad_token_id).to(accelerator.device)
        timer.lap("time/generate")
        scores = torch.tensor([e.reward for e in episodes], device=accelerator.device)
        metrics: dict[str, float] = {}
        if scorer is not None:
            answers = [next((m.get("content", "") for m in reversed(e.messages) if m["role"] == "assistant"), "")
                       for e in episodes]
            extras = {k: [r[k] for r in rows] for k in rows[0] if k not in ("prompt", "prompt_ids", "prompt_truncated",
                                                                          "response_truncated", "_where")}
            fn_scores, metrics = scorer(batch, [r["prompt"] for r in rows],
                                        [in_prompt_form(r["prompt"], a) for r, a in zip(rows, answers)], extras,
                                        [r.get("_where") for r in rows])
            scores = scores + fn_scores
        timer.lap("time/score")
        used = [any(m["role"] == "tool" and _contains(_last_answer(e) or "", str(m.get("content") or ""))
                    for m in e.messages) for e in episodes]
        counts = reduce_sum(accelerator, torch.tensor([
            float(sum(e.turns for e in episodes)), float(sum(e.tool_calls for e in episodes)),
            float(sum(e.tool_calls > 0 for e in episodes)), float(sum(used)), float(sum(e.finished for e in episodes)),
            float(sum(e.reward for e in episodes)), float(len(episodes))]))
        n = counts[-1]
        metrics.update({"env/turns": float(counts[0] / n), "env/tool_calls": float(counts[1] / n),
                        "env/tool_call_fraction": float(counts[2] / n), "env/used_tool_result": float(counts[3] / n),
                        "env/finished_fraction": float(counts[4] / n), "env/reward": float(counts[5] / n)})
        completions = [self.tokenizer.decode(e.ids) for e in episodes]
        return batch, completions, scores, metrics, examples, None


def _contains(answer: str, result: str) -> bool:
    """Whether ``result`` appears in ``answer`` as a whole (not "5" inside "15")."""
    return bool(result.strip()) and re.search(rf"(?<![\w.]){re.escape(result.strip())}(?![\w.])", answer) is not None


def _last_answer(e) -> str | None:
    """The content of the episode's last assistant message that came after a tool result."""
    seen_tool = False
    answer = None
    for m in e.messages:
        seen_tool = seen_tool or m["role"] == "tool"
        if m["role"] == "assistant" and seen_tool:
            answer = m.get("content")
    return answer
