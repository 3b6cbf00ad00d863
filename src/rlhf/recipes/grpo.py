"""GRPO, Dr. GRPO and RLOO: critic-free RL with group baselines and rule rewards.

Each step: 1. sample prompts; 2. generate ``num_generations`` (G) responses per prompt;
3. score them (reward functions, each weighted, and/or a reward model); 4. group-relative
advantages (``--estimator grpo|dr_grpo|rloo``, from ``rlhf.algos``); 5. clipped policy loss,
with the KL to the reference either in the loss (k3, the GRPO paper's form) or in the reward;
6. log and checkpoint. Shao et al. 2024 (DeepSeekMath); Liu et al. 2025 (Dr. GRPO);
Ahmadian et al. 2024 (RLOO).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch

from rlhf.algos import agg_loss, compute_advantages, kl_estimate, masked_mean, ppo_policy_loss
from rlhf.models import disable_dropout, eval_mode
from rlhf.errors import UserError
from rlhf.training.loop import StepPlan, StepTimer, check_trained, clip_grad_norm, count_skip, reduce_sum, shard
from rlhf.training.setup import load_data, load_policy, load_reference, make_accelerator, make_optimizer, start
from rlhf.recipes.logprobs import all_pair_logps, choose_layout, model_response_logprobs, packed_response_logprobs
from rlhf.watch.monitor import Monitor
from rlhf.watch.samples import SampleLog
from rlhf.training.saving import save_final
from rlhf.recipes.scoring import RLConfig, build_rollout, check_prompt_positions, generate_and_score
from rlhf.watch.stopping import BestPolicy, PreferenceEval, watch
from rlhf.rollout import merged_named_weights


@dataclass
class Config(RLConfig):
    """GRPO / RLOO options (defaults after TRL's GRPOTrainer)."""

    lr: float = 1e-6
    """Peak learning rate of AdamW."""
    estimator: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
    """Group baseline: grpo (mean/std), dr_grpo (mean only), rloo (leave-one-out mean)."""
    num_generations: int = 4
    """G: responses sampled per prompt (at least 2: the group is the baseline)."""
    rollout_batch_size: int = 8
    """Prompts per step, across all processes (each gives G responses)."""
    mini_batch_size: int = 32
    """Responses per optimizer step (micro-batches of --batch-size accumulate)."""
    beta: float = 0.04
    """KL coefficient to the reference (0: no reference model at all)."""
    kl_in_reward: bool = False
    """Subtract beta * KL (k1, summed per response) from the reward instead of adding beta * k3 to the loss."""
    clip_eps: float = 0.2
    """Ratio clip epsilon (low side)."""
    clip_eps_high: float | None = None
    """Ratio clip epsilon of the high side (DAPO's clip-higher; default: --clip-eps)."""
    share_prompt: bool = True
    """Score the G responses of a prompt padding-free, the prompt encoded once (flash attention: packed
    without sharing; off where a probe finds the model's result differs from the padded one)."""

    def check(self) -> None:
        super().check()
        if self.num_generations < 2:  # grpo: the std of one score is NaN; dr_grpo: every advantage 0
            raise UserError(f"--estimator {self.estimator} needs --num-generations of at least 2: its baseline "
                            f"is the other samples of the same prompt (got {self.num_generations})")


def grpo_update(cfg: Config, accelerator, model, optimizer, scheduler, buf: dict, logprobs_fn=model_response_logprobs
                ) -> dict[str, float]:
    """Clipped policy loss (+ beta k3 KL) over shuffled minibatches; returns mean metrics.

    ``logprobs_fn`` computes the response log-probs and entropy (:func:`model_response_logprobs` or
    :func:`packed_response_logprobs`).
    """
    world, n, P = accelerator.num_processes, buf["input_ids"].shape[0], buf["prompt_len"]
    mb = max(1, cfg.mini_batch_size // world)
    sums: dict[str, torch.Tensor] = {}
    n_updates = skipped = 0
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(n, device=buf["input_ids"].device)
        for s in range(0, n, mb):
            idx = perm[s : s + mb]
            agg = {"global_tokens": reduce_sum(accelerator, buf["response_mask"][idx].sum().float()).clamp(min=1),
                   "global_seqs": reduce_sum(accelerator, torch.tensor(float(len(idx)))).clamp(min=1)}
            micro = [idx[i : i + cfg.batch_size] for i in range(0, len(idx), cfg.batch_size)]
            for k, mi in enumerate(micro):
                ids, mask = buf["input_ids"][mi], buf["response_mask"][mi]
                with accelerator.no_sync(model) if k < len(micro) - 1 else contextlib.nullcontext():
                    logprobs, entropy = logprobs_fn(model, ids, buf["attention_mask"][mi], P, cfg.temperature,
                                                    with_entropy=True, entropy_grad=False)  # a metric
                    # One epoch, one minibatch: the policy has not moved, so old = current (ratio 1).
                    old = buf["old_logprobs"][mi] if buf["old_logprobs"] is not None else logprobs.detach()
                    loss, m = ppo_policy_loss(logprobs, old, buf["advantages"][mi], mask, clip_eps=cfg.clip_eps,
                                              clip_eps_high=cfg.clip_eps_high, agg=cfg.loss_agg, **agg)
                    if cfg.beta > 0 and not cfg.kl_in_reward:
                        kl_tokens = kl_estimate(logprobs, buf["ref_logprobs"][mi], "k3")
                        kl = agg_loss(kl_tokens, mask, cfg.loss_agg, **agg)
                        loss = loss + cfg.beta * kl
                        sums["kl"] = sums.get("kl", 0.0) + kl.detach()
                        if "kl_tokens" in buf:  # the monitor's: one pass over the batch, the policy not yet moved
                            buf["kl_tokens"][mi] = kl_tokens.detach() * mask
                    accelerator.backward(loss * world)
                share = mask.sum() / agg["global_tokens"]
                for name, value in (("clip_ratio", m["clipfrac"] * share), ("entropy", masked_mean(entropy.detach(), mask) * share),
                                    ("loss/policy", loss.detach())):
                    sums[name] = sums.get(name, 0.0) + value
            grad_norm = clip_grad_norm(accelerator, params, cfg.max_grad_norm)
            if torch.isfinite(torch.as_tensor(grad_norm)):
                optimizer.step()
                scheduler.step()
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
            n_updates += 1
    out = {k: float(reduce_sum(accelerator, v)) / n_updates for k, v in sums.items()}
    return {**out, "train/updates": float(n_updates), "train/skipped_updates": float(skipped)}


def monitor_kl(cfg: Config, buf: dict) -> tuple[torch.Tensor | None, float]:
    """The per-token KL that the monitor weighs against the scores, and its coefficient beta: k1 of the
    rollout policy when the KL is in the reward, else the loss's k3 (from the update's single pass when
    the old log-probs were not computed). ``(None, 0.0)`` without a reference (beta 0).

    Shape:
        -> (B, T), 0 outside the response mask.
    """
    if buf["ref_logprobs"] is None:
        return None, 0.0
    if "kl_tokens" in buf:
        return buf["kl_tokens"], cfg.beta
    estimator = "k1" if cfg.kl_in_reward else "k3"
    return kl_estimate(buf["old_logprobs"], buf["ref_logprobs"], estimator) * buf["response_mask"], cfg.beta


def run(cfg: Config) -> dict[str, float]:
    cfg.check()  # the command line checked it already; the Python API gets the same errors
    accelerator = make_accelerator(cfg)
    tokenizer, policy = load_policy(cfg)
    disable_dropout(policy)
    ref = load_reference(cfg, policy, tokenizer).to(accelerator.device) if cfg.beta > 0 else None
    scorer = cfg.scorer(tokenizer, accelerator.device)
    prompts = load_data(cfg, cfg.data, "prompt", tokenizer, accelerator.print)
    check_prompt_positions(cfg, policy, prompts)
    plan = StepPlan(len(prompts), cfg.rollout_batch_size, 1, cfg.seed)
    total = plan.total_steps(cfg.epochs, cfg.max_steps)
    n_completions = cfg.rollout_batch_size * cfg.num_generations
    updates = total * cfg.ppo_epochs * max(1, -(-n_completions // cfg.mini_batch_size))
    optimizer, scheduler = make_optimizer(cfg, policy.parameters(), updates)
    model, optimizer, state, checkpointer, logger = start(cfg, accelerator, policy, optimizer, scheduler, total,
                                                          {"reward": "reward", "kl": "kl"})
    cfg.warn_truncated_sampling(logger, state.step)
    monitor = Monitor(cfg, state.extra) if cfg.monitor else None
    samples = SampleLog(cfg.output_dir, cfg.log_samples, cfg.log_every, total, state.step, accelerator.is_main_process)
    rollout = build_rollout(cfg, accelerator.unwrap_model(model), tokenizer, accelerator)
    G = cfg.num_generations
    sampling = cfg.sampling(num_samples=G)
    reuse_old = cfg.ppo_epochs == 1 and cfg.mini_batch_size >= n_completions
    layout = choose_layout(policy, cfg.share_prompt, "shared", accelerator.print, accelerator.mixed_precision != "no")
    logprobs_fn = partial(packed_response_logprobs, layout=layout) if layout else model_response_logprobs
    metrics: dict[str, float] = {}
    # Held-out preference pairs (implicit preference accuracy, step 0 first; without a reference, --beta 0,
    # the step-0 policy's log-probs are the reference) and --stop-on-overoptimisation.
    pref_eval = (PreferenceEval(cfg, accelerator, tokenizer, accelerator.unwrap_model(model), ref, state.extra,
                                state.step, all_pair_logps) if cfg.eval_data else None)
    if pref_eval is not None and monitor is not None:
        pref_eval.add_rule(monitor)
    if pref_eval is not None and state.step == 0:
        logger.log(0, pref_eval.evaluate(0))
    title = f"GRPO policy ({cfg.estimator})"
    best = (BestPolicy(cfg, accelerator, lambda d, m: save_final(accelerator, model, tokenizer,
                                                                 dataclasses.replace(cfg, output_dir=d), title, m,
                                                                 checkpointer, announce=False),
                       state.extra, "reward (before any KL in the reward)") if cfg.stop_on_overoptimisation else None)
    stop = False

    while state.step < total:
        timer = StepTimer()  # laps: generate, score, old_logprob_pass, reference_pass, advantages, train, weight_sync
        # 1. Prompts.
        examples = [prompts.examples[i]
                    for i in shard(plan.step_indices(state.step)[0], accelerator.process_index, accelerator.num_processes)]
        # 2-3. G samples of each prompt (contiguous), and their rewards.
        batch, completions, scores, score_metrics = generate_and_score(rollout, examples, sampling, tokenizer, scorer,
                                                                       accelerator.device, timer)
        if best is not None:  # the policy that sampled this rollout may be the best so far: keep it before it moves
            best.offer(state.step + 1, float(reduce_sum(accelerator, scores.sum()) / (len(completions)
                                                                                      * accelerator.num_processes)))
            timer.lap("time/score")
        mask, P = batch.response_mask, batch.prompt_ids.shape[1]
        # Old and reference log-probs, without gradients (old ones only when the policy will move first).
        old_logprobs = ref_logprobs = None
        with torch.no_grad(), eval_mode(model):
            if not reuse_old or (cfg.beta > 0 and cfg.kl_in_reward):
                old_logprobs, _ = logprobs_fn(model, batch.input_ids, batch.attention_mask, P, cfg.temperature)
                timer.lap("time/old_logprob_pass")
            if ref is not None:
                ref_logprobs, _ = logprobs_fn(ref, batch.input_ids, batch.attention_mask, P, cfg.temperature)
                timer.lap("time/reference_pass")
        raw_scores = scores
        if cfg.beta > 0 and cfg.kl_in_reward:
            scores = scores - cfg.beta * (kl_estimate(old_logprobs, ref_logprobs, "k1") * mask).sum(1)
        # 4. Group-relative advantages.
        advantages, _ = compute_advantages(cfg.estimator, response_mask=mask, scores=scores, group_size=G)
        timer.lap("time/advantages")
        # 5. Policy update.
        buf = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "response_mask": mask,
               "old_logprobs": None if reuse_old and not cfg.kl_in_reward else old_logprobs,
               "ref_logprobs": ref_logprobs, "advantages": advantages, "prompt_len": P}
        if monitor is not None and old_logprobs is None and ref_logprobs is not None:
            buf["kl_tokens"] = torch.zeros(mask.shape, device=mask.device)  # filled by the update's single pass
        train_metrics = grpo_update(cfg, accelerator, model, optimizer, scheduler, buf, logprobs_fn)
        timer.lap("time/train")
        rollout.load_weights(merged_named_weights(accelerator.unwrap_model(model)))  # the sampler follows the policy
        timer.lap("time/weight_sync")
        state.step += 1
        logger.advance()
        count_skip(cfg, state, train_metrics["train/skipped_updates"] == train_metrics["train/updates"], checkpointer)
        # 6. Log and checkpoint.
        grouped = scores.view(-1, G)
        metrics = {"reward": float(scores.mean()), "reward_std": float(grouped.std(1).mean()) if G > 1 else 0.0,
                   "frac_reward_zero_std": float((grouped.std(1) < 1e-6).float().mean()) if G > 1 else 1.0,
                   "completions/mean_length": float(mask.sum(1).float().mean()),
                   "completions/clipped_ratio": float((~batch.finished).float().mean()),
                   "speed/completions_per_second": len(completions) * accelerator.num_processes
                                                   / timer.metrics()["time/step"],
                   **timer.metrics(), **score_metrics, **train_metrics}
        if monitor is not None:  # over-optimisation signals of this rollout, against step 0
            metrics.update(monitor.measure(state.step, batch.response_ids, mask, raw_scores, *monitor_kl(cfg, buf),
                                           member_scores=scorer.last_member_scores))
        stop = watch(state.step, total, metrics, monitor, pref_eval, best, logger)  # warnings; stop at one?
        if state.step % cfg.log_every == 0 or state.step == total or stop:
            logger.log(state.step, metrics)
        samples.write(state.step, [e["prompt"] for e in examples], completions, raw_scores, mask, group_size=G)
        if cfg.save_every and state.step % cfg.save_every == 0:
            checkpointer.save(state.step)
        if stop or logger.stop_requested:  # the monitor's warning, or a callback of the Python API
            break

    if monitor is not None:
        monitor.summary(state.step, logger)
    logger.close()
    check_trained(state)
    save_last = lambda: save_final(accelerator, model, tokenizer, cfg, title, metrics, checkpointer)  # noqa: E731
    if best is not None:  # on a stop, the best policy before the warning; else the last step's
        best.finish(stop, state.step, save_last)
    else:
        save_last()
    return metrics
