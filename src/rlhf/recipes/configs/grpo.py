"""Options of ``rlhf grpo`` (:mod:`rlhf.recipes.grpo`): GRPO and its loss family, RLOO and REINFORCE++.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlhf.errors import UserError
from rlhf.recipes.configs.rl import RLConfig
from rlhf.training.options import trl_grpo_batch


@dataclass
class Config(RLConfig):
    """GRPO / RLOO / REINFORCE++ options. TRL's GRPOConfig names mean what they mean in TRL (``loss_type``,
    ``scale_rewards``, ``importance_sampling_level``, ``epsilon_high``, ``delta``, ``mask_truncated_completions``,
    ``use_bias_correction_kl``...), and the loss's defaults are TRL 1.13's (dapo, beta 0, the bias-corrected
    k3 KL, scale_rewards group with 1e-4), so a TRL config that leaves them out trains TRL's loss."""

    lr: float = 1e-6
    """Peak learning rate of AdamW."""
    estimator: Literal["grpo", "rloo", "reinforce_pp"] = "grpo"
    """Advantage: grpo (the group's mean subtracted, scaled by --scale-rewards), rloo (leave-one-out mean,
    unscaled), reinforce_pp (REINFORCE++: per-token returns of the score minus beta x KL (k1) on every token,
    whitened over the batch; the KL is then always in the reward). Dr. GRPO is --loss-type dr_grpo
    --scale-rewards none."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"] = "dapo"
    """Policy loss and its normalisation, TRL's names and meanings (README, "GRPO losses"): grpo (token mean per
    sequence), bnpo (token mean per micro-batch), dr_grpo (token sum / (sequences x --max-new-tokens)), dapo
    (token sum / the rollout's tokens), cispo (clipped, detached ratio x A x log-prob), sapo (soft gate),
    luspo (token sum per sequence), vespo (Gamma-weighted sequence ratio)."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """The importance ratio per token, or GSPO's one per sequence (the mean of its tokens' log-ratios)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """grpo's advantage divided by the std of the group's scores, of the whole batch's, or not at all
    (Dr. GRPO). TRL's true / false mean group / none."""
    scale_rewards_eps: float = 1e-4
    """Added to that std (TRL's 1e-4): a group whose scores differ by less gets advantages below +-1."""
    num_generations: int = 4
    """G: responses sampled per prompt (at least 2: the group is the baseline)."""
    rollout_batch_size: int = 8
    """Prompts per step, across all processes (each gives G responses)."""
    mini_batch_size: int = 32
    """Responses per optimizer step (micro-batches of --batch-size accumulate)."""
    beta: float = 0.0
    """KL coefficient to the reference (0, TRL's default: no reference model at all; the GRPO paper used 0.04)."""
    kl_in_reward: bool = False
    """Subtract beta * KL (k1, summed per response) from the reward instead of adding beta * k3 to the loss."""
    use_bias_correction_kl: bool = True
    """The loss's k3 KL times the importance ratio (TRL 1.13's default): unbiased when the policy has moved
    since sampling; false: plain k3, the GRPO paper's."""
    clip_eps: float = 0.2
    """Ratio clip epsilon (low side)."""
    clip_eps_high: float | None = None
    """Ratio clip epsilon of the high side (DAPO's clip-higher; default: --clip-eps). With --loss-type cispo:
    the cap of the ratio itself (TRL's epsilon_high; ScaleRL uses 5.0), and required."""
    delta: float | None = None
    """Two-sided clipping (INTELLECT-2): the unclipped ratio is capped at delta (> 1 + --clip-eps-high)."""
    sapo_temperature_pos: float = 1.0
    """sapo's gate temperature where the advantage is positive."""
    sapo_temperature_neg: float = 1.05
    """sapo's gate temperature where the advantage is 0 or negative."""
    vespo_k_pos: float = 2.0
    """vespo's power k (advantage >= 0)."""
    vespo_lambda_pos: float = 3.0
    """vespo's decay lambda (advantage >= 0)."""
    vespo_k_neg: float = 3.0
    """vespo's power k (advantage < 0)."""
    vespo_lambda_neg: float = 2.0
    """vespo's decay lambda (advantage < 0)."""
    mask_truncated_completions: bool = False
    """Leave responses that hit --max-new-tokens without EOS out of the loss (DAPO; an episode: its last reply)."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment: over the last N tokens before --max-new-tokens the score loses up to
    --overlong-penalty, linearly (0: off)."""
    overlong_penalty: float = 1.0
    """The most the overlong punishment subtracts (at --max-new-tokens)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop the groups whose scores all tie (no signal) and sample more prompts until
    the step's --rollout-batch-size groups are full, at most --dynamic-sampling-max-rounds rounds; logged as
    dynamic_sampling/*."""
    dynamic_sampling_max_rounds: int = 4
    """Sampling rounds per step under --dynamic-sampling (the first included); if the batch is still short,
    the step trains on the untied groups it has."""
    share_prompt: bool = True
    """Score the G responses of a prompt padding-free, the prompt encoded once (flash attention: packed
    without sharing; off where a probe finds the model's result differs from the padded one)."""

    def check(self) -> None:
        trl_grpo_batch(self)  # before the checks: TRL's per-device batch may set the batch sizes
        super().check()
        if self.num_generations < 2 and self.estimator != "reinforce_pp":  # grpo's std of one score is NaN
            raise UserError(f"--estimator {self.estimator} needs --num-generations of at least 2: its baseline "
                            f"is the other samples of the same prompt (got {self.num_generations})")
        if self.ref_model and self.beta == 0:
            raise UserError("--ref-model changes nothing with --beta 0 (TRL's default): there is no KL to a reference; "
                            "set --beta, or leave the reference out")
        if self.loss_type == "cispo" and self.clip_eps_high is None:
            raise UserError("--loss-type cispo caps the importance ratio at --clip-eps-high (TRL's epsilon_high, "
                            "an absolute cap; ScaleRL uses 5.0): give it, since TRL's fallback to epsilon "
                            "(0.2) would scale every token's gradient by 0.2")
        from rlhf.algos import LOSS_TYPES  # torch: not imported for --help

        if self.delta is not None and (LOSS_TYPES[self.loss_type].surrogate != "clip" or self.delta <= 1):
            raise UserError(f"--delta caps the clipped surrogate's ratio and must exceed 1 (INTELLECT-2 recommends "
                            f"more than 1 + --clip-eps-high); got {self.delta} with --loss-type {self.loss_type}")
        for names, loss in ((("sapo_temperature_pos", "sapo_temperature_neg"), "sapo"),
                            (("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"), "vespo")):
            changed = [n for n in names if getattr(self, n) != Config.__dataclass_fields__[n].default]
            if changed and self.loss_type != loss:
                raise UserError(f"--{changed[0].replace('_', '-')} changes nothing with --loss-type "
                                f"{self.loss_type}: it is {loss}'s")
        if self.scale_rewards != "group" and self.estimator != "grpo":
            raise UserError(f"--scale-rewards {self.scale_rewards} changes nothing with --estimator "
                            f"{self.estimator}: only grpo's advantages are scaled")
        if not 0 <= self.overlong_buffer <= self.max_new_tokens:
            raise UserError(f"--overlong-buffer must be 0 (off) to --max-new-tokens ({self.max_new_tokens}), "
                            f"got {self.overlong_buffer}")
        if self.env and (self.dynamic_sampling or self.overlong_buffer):
            raise UserError(f"{'--dynamic-sampling' if self.dynamic_sampling else '--overlong-buffer'} with --env: not "
                            "supported yet (episodes are played in one round; their length spans several turns)")
        if self.dynamic_sampling_max_rounds < 1:
            raise UserError("--dynamic-sampling-max-rounds must be at least 1")
        if self.estimator == "reinforce_pp" and self.loss_type == "vespo":
            raise UserError("--loss-type vespo weighs each sequence by the sign of its one advantage; --estimator "
                            "reinforce_pp gives every token its own")
        if self.estimator == "reinforce_pp" and self.beta > 0:
            self.kl_in_reward = True  # REINFORCE++ penalises the KL in the per-token reward, never in the loss
