"""GRPO and its family (DAPO, Dr. GRPO, CISPO, SAPO, GSPO...), RLOO and REINFORCE++: critic-free RL
with group or batch baselines and rule rewards.

Each step: 1. sample prompts; 2. generate ``num_generations`` (G) responses per prompt (with
``--dynamic-sampling``, more prompts until no group's scores all tie); 3. score them (reward functions,
each weighted, and/or a reward model; DAPO's overlong shaping); 4. advantages (``--estimator``, from
``rlhf.algos``); 5. the ``--loss-type`` policy loss, with the KL to the reference either in the loss
(k3, the GRPO paper's form) or in the reward; 6. log and checkpoint. Shao et al. 2024 (DeepSeekMath);
Yu et al. 2025 (DAPO); Liu et al. 2025 (Dr. GRPO); Ahmadian et al. 2024 (RLOO); Hu 2025 (REINFORCE++);
the losses' sources are in :mod:`rlhf.algos.policy_losses`.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch

from rlhf.recipes.configs.grpo import Config
from rlhf.algos import (LOSS_TYPES, compute_advantages, importance_log_ratio, kl_estimate, kl_penalized_rewards,
                        masked_mean, normalise_policy_loss, overlong_penalty, policy_loss_terms, tied_groups)
from rlhf.models import disable_dropout, eval_mode, unwrap
from rlhf.errors import UserError
from rlhf.training.loop import (StepPlan, StepTimer, check_trained, clip_grad_norm, count_skip, mean_over_processes,
                                micro_batch, reduce_sum)
from rlhf.training.setup import load_data, load_policy, load_reference, make_accelerator, make_optimizer, start
from rlhf.recipes.logprobs import all_pair_logps, choose_layout, model_response_logprobs, packed_response_logprobs
from rlhf.watch.monitor import Monitor
from rlhf.watch.samples import SampleLog
from rlhf.training.saving import save_final
from rlhf.recipes.episodes import EpisodeSampler
from rlhf.recipes.scoring import (build_rollout, check_prompt_positions, make_scorer, reward_fn_metrics, sample_groups,
                                  sampling_params)
from rlhf.watch.stopping import BestPolicy, PreferenceEval, watch
from rlhf.rollout import merged_named_weights




def grpo_update(cfg: Config, accelerator, model, optimizer, scheduler, buf: dict, logprobs_fn=model_response_logprobs
                ) -> dict[str, float]:
    """The ``--loss-type`` policy loss (+ beta k3 KL, aggregated with it, as TRL does) over shuffled
    minibatches; returns mean metrics.

    ``logprobs_fn`` computes the response log-probs and entropy (:func:`model_response_logprobs` or
    :func:`packed_response_logprobs`). ``buf["response_mask"]`` is the loss mask (truncated responses
    already out under --mask-truncated-completions).
    """
    world, n, P = accelerator.num_processes, buf["input_ids"].shape[0], buf["prompt_len"]
    device = buf["input_ids"].device
    # The planned number of updates per rollout (what the LR schedule counts), whatever n is: with
    # --dynamic-sampling a step may keep fewer groups, split into as many (smaller) minibatches.
    n_minibatches = max(1, -(-cfg.rollout_batch_size * cfg.num_generations // cfg.mini_batch_size))
    mb = max(1, -(-n // n_minibatches))
    micro_size = max(1, cfg.batch_size // world)  # --batch-size is global
    normalisation = LOSS_TYPES[cfg.loss_type].normalisation
    rollout_tokens, rollout_seqs = reduce_sum(accelerator, torch.stack([
        buf["response_mask"].sum().float(), torch.tensor(float(n), device=device)]))
    sums: dict[str, torch.Tensor] = {}
    n_updates = skipped = 0
    # The optimizer's parameters: after a rollout FSDP2 leaves the root's parameters unsharded, and
    # model.parameters() would then list those stand-ins, whose gradients are never set (clipping missed them).
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(n, device=device)
        for s in range(0, n, mb):
            idx = perm[s : s + mb]
            micro = [idx[i : i + micro_size] for i in range(0, len(idx), micro_size)]
            step_tokens, step_seqs, step_micro = reduce_sum(accelerator, torch.stack([
                buf["response_mask"][idx].sum().float(), torch.tensor(float(len(idx)), device=device),
                torch.tensor(float(len(micro)), device=device)]))
            # TRL's dapo normalises by the rollout's tokens over its optimizer steps (num_items_in_batch).
            norm = partial(normalise_policy_loss, normalisation=normalisation, global_seqs=step_seqs,
                           global_tokens=rollout_tokens * step_seqs / rollout_seqs, global_micro_batches=step_micro,
                           max_new_tokens=cfg.max_new_tokens)
            for k, mi in enumerate(micro):
                ids, mask = buf["input_ids"][mi], buf["response_mask"][mi]
                with micro_batch(accelerator, model, last=k == len(micro) - 1):
                    logprobs, entropy = logprobs_fn(model, ids, buf["attention_mask"][mi], P, cfg.temperature,
                                                    with_entropy=True, entropy_grad=False)  # a metric
                    # One epoch, one minibatch: the policy has not moved, so old = current (ratio 1).
                    old = buf["old_logprobs"][mi] if buf["old_logprobs"] is not None else logprobs.detach()
                    per_token, m = policy_loss_terms(
                        cfg.loss_type, logprobs, old, buf["advantages"][mi], mask, clip_eps=cfg.clip_eps,
                        clip_eps_high=cfg.clip_eps_high, importance_sampling_level=cfg.importance_sampling_level,
                        delta=cfg.delta, sapo_temperature_pos=cfg.sapo_temperature_pos,
                        sapo_temperature_neg=cfg.sapo_temperature_neg,
                        vespo_params=(cfg.vespo_k_pos, cfg.vespo_lambda_pos, cfg.vespo_k_neg, cfg.vespo_lambda_neg))
                    policy_loss = norm(per_token, mask)
                    loss = policy_loss
                    if cfg.beta > 0 and not cfg.kl_in_reward:
                        kl_tokens = kl_estimate(logprobs, buf["ref_logprobs"][mi], "k3")
                        if cfg.use_bias_correction_kl:  # k3 x the importance ratio (TRL's use_bias_correction_kl)
                            kl_tokens = kl_tokens * torch.exp(importance_log_ratio(
                                logprobs, old, mask, cfg.importance_sampling_level))
                        loss = loss + cfg.beta * norm(kl_tokens, mask)  # normalised as the loss (TRL)
                        if "kl_tokens" in buf:  # the monitor's: one pass over the batch, the policy not yet moved
                            buf["kl_tokens"][mi] = kl_tokens.detach() * mask
                    accelerator.backward(loss * world)
                share = mask.sum() / step_tokens.clamp(min=1)
                m = {"clip_ratio": m["clip_ratio/region_mean"], **m} if "clip_ratio/region_mean" in m else m
                if cfg.beta > 0 and not cfg.kl_in_reward:  # logged as TRL logs it: the per-token mean
                    m = {**m, "kl": masked_mean(kl_tokens.detach(), mask)}
                for name, value in (*((k2, v * share) for k2, v in m.items()),
                                    ("entropy", masked_mean(entropy.detach(), mask) * share),
                                    ("loss/policy", policy_loss.detach()), ("loss", loss.detach())):
                    sums[name] = sums.get(name, 0.0) + value
            grad_norm = clip_grad_norm(accelerator, params, cfg.max_grad_norm)
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + torch.as_tensor(float(grad_norm)) / world
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
    scorer = make_scorer(cfg, tokenizer, accelerator.device) if not cfg.env or cfg.reward_fn or cfg.reward_model else None
    episodes = EpisodeSampler.for_run(cfg, accelerator, tokenizer)
    prompts = load_data(cfg, cfg.data, "prompt", tokenizer, accelerator.print)
    check_prompt_positions(cfg, policy, prompts)
    plan = StepPlan(len(prompts), cfg.rollout_batch_size, 1, cfg.seed)
    total = plan.total_steps(cfg.epochs, cfg.max_steps)
    n_completions = cfg.rollout_batch_size * cfg.num_generations
    updates = total * cfg.ppo_epochs * max(1, -(-n_completions // cfg.mini_batch_size))
    optimizer, scheduler = make_optimizer(cfg, policy.parameters(), updates)
    model, optimizer, state, checkpointer, logger = start(cfg, accelerator, policy, optimizer, scheduler, total,
                                                          {"loss": "loss", "reward": "reward", "kl": "kl"})
    cfg.warn_truncated_sampling(logger, state.step)
    monitor = Monitor(cfg, state.extra) if cfg.monitor else None
    samples = SampleLog(cfg.output_dir, cfg.log_samples, cfg.log_every, total, state.step, accelerator.is_main_process)
    rollout = build_rollout(cfg, unwrap(model), tokenizer, accelerator)
    G = cfg.num_generations
    sampling = sampling_params(cfg, num_samples=G)
    reuse_old = cfg.ppo_epochs == 1 and cfg.mini_batch_size >= n_completions
    layout = choose_layout(policy, cfg.share_prompt, "shared", accelerator.print, accelerator.mixed_precision != "no")
    logprobs_fn = partial(packed_response_logprobs, layout=layout) if layout else model_response_logprobs
    metrics: dict[str, float] = {}
    # Held-out preference pairs (implicit preference accuracy, step 0 first; without a reference, --beta 0,
    # the step-0 policy's log-probs are the reference) and --stop-on-overoptimisation.
    pref_eval = (PreferenceEval(cfg, accelerator, tokenizer, unwrap(model), ref, state.extra,
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
        # 1-3. Prompts, G samples of each (contiguous), and their rewards (with --dynamic-sampling: untied groups).
        indices = plan.step_indices(state.step)[0]
        if episodes is not None:  # multi-turn: G episodes per prompt in the environment
            batch, completions, scores, score_metrics, examples, member_scores = episodes(
                accelerator, rollout, prompts, indices, sampling, scorer, timer)
        else:
            batch, completions, scores, score_metrics, examples, member_scores = sample_groups(
                accelerator, rollout, prompts, indices, sampling, tokenizer, scorer, timer,
                dynamic_rounds=cfg.dynamic_sampling_max_rounds if cfg.dynamic_sampling else 0,
                seed=cfg.seed * 1_000_003 + state.step)
        if scores.isnan().any() and cfg.estimator != "grpo":
            raise UserError(f"no reward function applied to some completions (every one returned None): only "
                            f"--estimator grpo leaves such completions out (as TRL), not {cfg.estimator}")
        if best is not None:  # the policy that sampled this rollout may be the best so far: keep it before it moves
            best.offer(state.step + 1, float(reduce_sum(accelerator, scores.nan_to_num(0.0).sum()) / (
                len(completions) * accelerator.num_processes)))
            timer.lap("time/score")
        mask, P = batch.loss_mask, batch.prompt_ids.shape[1]  # the model's tokens (an episode's observations: 0)
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
        if cfg.overlong_buffer:  # DAPO's soft overlong punishment
            penalty = overlong_penalty(mask.sum(1), cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
            scores = scores + penalty
            score_metrics["overlong/penalty_mean"] = float(reduce_sum(accelerator, penalty.sum())
                                                           / (len(completions) * accelerator.num_processes))
        # 4. Advantages: group-relative, or REINFORCE++'s whitened returns of per-token rewards.
        over_processes = partial(reduce_sum, accelerator)
        if cfg.estimator == "reinforce_pp":
            if cfg.beta > 0:
                rewards, _ = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, cfg.beta, "k1")
            else:
                zeros = torch.zeros(mask.shape, device=mask.device)
                rewards, _ = kl_penalized_rewards(scores, zeros, zeros, mask, 0.0)
            advantages, _ = compute_advantages("reinforce_pp", response_mask=mask, rewards=rewards,
                                               reduce_sum=over_processes)
        else:
            if cfg.beta > 0 and cfg.kl_in_reward:
                scores = scores - cfg.beta * (kl_estimate(old_logprobs, ref_logprobs, "k1") * mask).sum(1)
            advantages, _ = compute_advantages(cfg.estimator, response_mask=mask, scores=scores, group_size=G,
                                               scale=None if cfg.scale_rewards == "none" else cfg.scale_rewards,
                                               eps=cfg.scale_rewards_eps, reduce_sum=over_processes)
        timer.lap("time/advantages")
        loss_mask = mask * batch.finished[:, None] if cfg.mask_truncated_completions else mask  # DAPO
        # 5. Policy update.
        buf = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "response_mask": loss_mask,
               "old_logprobs": None if reuse_old and not cfg.kl_in_reward else old_logprobs,
               "ref_logprobs": ref_logprobs, "advantages": advantages, "prompt_len": P}
        if monitor is not None and old_logprobs is None and ref_logprobs is not None:
            buf["kl_tokens"] = torch.zeros(mask.shape, device=mask.device)  # filled by the update's single pass
        train_metrics = grpo_update(cfg, accelerator, model, optimizer, scheduler, buf, logprobs_fn)
        timer.lap("time/train")
        rollout.load_weights(merged_named_weights(unwrap(model)))  # the sampler follows the policy
        timer.lap("time/weight_sync")
        state.step += 1
        logger.advance()
        count_skip(cfg, state, train_metrics["train/skipped_updates"] == train_metrics["train/updates"], checkpointer)
        # 6. Log and checkpoint.
        all_scores = accelerator.gather(scores.contiguous())  # every process's groups: what 1 process would log
        lengths = accelerator.gather(mask.sum(1).float().contiguous())
        grouped = all_scores.view(-1, G)
        metrics = {"reward": float(all_scores.nanmean()),
                   "reward_std": float(grouped.std(1).nanmean()) if G > 1 else 0.0,
                   "frac_reward_zero_std": float(tied_groups(all_scores, G).float().mean()),
                   "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
                   "completions/max_length": float(lengths.max()),
                   "completions/clipped_ratio": float(accelerator.gather((~batch.finished).float()).mean()),
                   "speed/completions_per_second": len(completions) * accelerator.num_processes
                                                   / timer.metrics()["time/step"],
                   "learning_rate": scheduler.get_last_lr()[0], "epoch": state.step / plan.steps_per_epoch,
                   **timer.metrics(), **mean_over_processes(accelerator, score_metrics), **train_metrics,
                   **(reward_fn_metrics(accelerator, scorer.last_fn_scores) if scorer is not None else {})}
        if monitor is not None:  # over-optimisation signals of this rollout, against step 0
            metrics.update(monitor.measure(state.step, batch.response_ids, mask, raw_scores.nan_to_num(0.0),
                                           *monitor_kl(cfg, buf),
                                           member_scores=member_scores))
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
