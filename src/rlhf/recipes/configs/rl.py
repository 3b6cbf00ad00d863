"""Options the online recipes share (PPO, GRPO): prompts, sampling, rewards, minibatches, the monitor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from rlhf.errors import UserError
from rlhf.training.config import TrainConfig


@dataclass
class RLConfig(TrainConfig):
    """Options shared by the online recipes (PPO, GRPO): prompts, sampling, rewards, minibatches."""

    prompts: str | None = None
    """Prompt file (same as --data)."""
    ref_model: str | None = None
    """Reference model pi_ref: a directory or hub id with the policy's tokenizer (default: a frozen copy of
    --model; with --lora, the base with the adapters off)."""
    reward_model: str | None = None
    """Frozen reward model directory (from rlhf rm), or a reward-model ensemble directory (rlhf rm --ensemble K):
    K members take K times the reward model's memory and scoring time."""
    reward_aggregation: Literal["mean", "mean_minus_std", "min"] | None = None
    """How an ensemble's member scores (each whitened by its own statistics) become one: mean; mean_minus_std,
    the mean minus --reward-uncertainty-coef times their population std (Coste et al. 2023's uncertainty-weighted
    reward, with the std where they take the variance); min, the worst case (default: the ensemble's ensemble.json, mean). With one reward model
    every aggregation is its score."""
    reward_uncertainty_coef: float = 1.0
    """Lambda of --reward-aggregation mean_minus_std (0 or more)."""
    reward_fn: str | None = None
    """Python reward(s) module:function[:weight], comma-separated; added to the reward model's score."""
    normalize_reward: bool = True
    """Whiten reward-model scores with the mean and std stored by rlhf rm."""
    score_clip: float | None = None
    """Clip scores to [-x, x]."""
    missing_eos_penalty: float | None = None
    """Subtract this from the score of responses that never produced EOS."""
    max_new_tokens: int = 32
    """Longest response sampled."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (below 1 needs --allow-truncated-sampling)."""
    top_k: int = 0
    """Sample among the k likeliest tokens (0: all; above 0 needs --allow-truncated-sampling)."""
    allow_truncated_sampling: bool = False
    """Let --top-k/--top-p truncate sampling although every log-prob scores the full softmax
    (the updates are then off-policy)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    rollout_engine: Literal["auto", "static", "loop", "generate"] = "auto"
    """Sampler: loop (our KV-cache loop), generate (transformers'), static (static KV cache, CUDA-graph decode on its own bf16 copy of the policy); auto: the measured fastest (the loop until the GPU benchmark has run)."""
    env: str | None = None
    """Multi-turn episodes: module:factory, the factory returning one environment per episode (reset(row) ->
    messages, step(message) -> (observations, reward, done); rlhf.rollout.env.ToolEnv for plain-function tools).
    Episodes are token-in token-out (GRPO: G per prompt); only the model's tokens are trained (PPO: values and
    GAE over them); --reward-fn then scores the final answer, added to the environment's rewards."""
    max_turns: int = 4
    """With --env: the most assistant turns of an episode (each at most --max-new-tokens; all within
    --max-length)."""
    log_samples: int = 4
    """Prompts whose response (GRPO: the first of each group), score and length go to samples.jsonl at step 1
    and each logged step (0: none); rlhf report shows them."""
    monitor: bool = True
    """Over-optimisation monitor: log monitor/... signals of each rollout batch against the SFT model's samples
    at step 0, and warn once per signal when one crosses its --monitor-* threshold (--no-monitor: none of it)."""
    monitor_distinct_drop: float | None = 0.3
    """Warn when distinct-2 across responses falls by this fraction of its step-0 value (none: never)."""
    monitor_length_growth: float | None = 0.5
    """Warn when the mean response length grows by this fraction of its step-0 value (none: never)."""
    monitor_reward_length_corr: float | None = 0.7
    """Warn when |Pearson r| between scores and response lengths in a batch reaches this (none: never)."""
    monitor_kl_fraction: float | None = 0.5
    """Warn when the KL penalty (coefficient x summed KL per response) reaches this fraction of the mean |score|
    (none: never)."""
    monitor_disagreement_growth: float | None = 0.5
    """Warn when a reward-model ensemble's disagreement (monitor/rm_disagreement) grows by this fraction of its
    step-0 value (none: never; only with an ensemble --reward-model)."""
    monitor_pref_accuracy_drop: float | None = 0.1
    """Warn when the implicit preference accuracy on --eval-data falls this much (absolute) below its step-0
    value (none: never)."""
    stop_on_overoptimisation: bool = False
    """Stop at the monitor's first warning; the final model is then the best policy before it (OUTPUT/best,
    by the rollout's mean score)."""

    def check(self) -> None:
        if self.prompts:
            self.data = self.prompts
        super().check()
        for name in ("max_new_tokens", "rollout_batch_size", "mini_batch_size", "ppo_epochs"):
            if getattr(self, name, 1) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if not (math.isfinite(self.reward_uncertainty_coef) and self.reward_uncertainty_coef >= 0):
            raise UserError(f"--reward-uncertainty-coef must be 0 or more, got {self.reward_uncertainty_coef}")
        if self.log_samples < 0:
            raise UserError(f"--log-samples must be 0 (none) or more, got {self.log_samples}")
        if self.truncated_sampling() and not self.allow_truncated_sampling:
            raise UserError(f"{self.truncated_sampling()}: sampling from a truncated distribution while the old, "
                            "reference and new log-probs score the full softmax makes every update off-policy; "
                            "pass --allow-truncated-sampling to do it anyway")
        recipe = type(self).__module__.rsplit(".", 1)[-1]
        if self.eval_every and not self.eval_data:  # --eval-data: preference pairs (implicit preference accuracy)
            raise UserError(f"--eval-every: {recipe} evaluates --eval-data preference pairs; give --eval-data too")
        if self.stop_on_overoptimisation and not self.monitor:
            raise UserError("--stop-on-overoptimisation stops at the monitor's first warning; drop --no-monitor")
        if self.max_turns < 1:
            raise UserError(f"--max-turns must be at least 1, got {self.max_turns}")
        if self.grad_accum != 1:
            raise UserError(f"--grad-accum: {recipe} accumulates micro-batches of --batch-size into each "
                            "--mini-batch-size update; set those instead")

    def truncated_sampling(self) -> str:
        """The flags that truncate the sampling distribution (``''`` when none does).

        PPO and GRPO refuse them unless ``--allow-truncated-sampling``: samples would come from
        the truncated, renormalised distribution while old, reference and new log-probs all
        score the full softmax (issue 13 measured 10.75 nats per 16-token response at top-k 5).
        TRL's GRPOTrainer samples with top_k/top_p and scores the full softmax (trl#6789), and
        vLLM's RFC #42259 lists the same mismatch in verl and SkyRL, so a TRL or OpenRLHF user
        expects the flags to work; we keep them, but make the off-policy choice explicit and
        logged, and the full softmax the default (the first update's ratio is then exactly 1).
        """
        return " and ".join(f for f, on in (("--top-k", self.top_k > 0), ("--top-p", self.top_p < 1.0)) if on)

    def warn_truncated_sampling(self, logger, step: int) -> None:
        """One line in the log when truncated sampling was allowed."""
        if self.truncated_sampling():
            logger.event(step, f"warning: {self.truncated_sampling()}: sampling is truncated while log-probs score "
                               "the full softmax, so the updates are off-policy (--allow-truncated-sampling)")
