"""Stage 3: PPO, the seeds' actor-critic RLHF loop (seed 002 Parts 3-5; seed 003 Phase 3).

Each step: 1. sample prompts; 2. generate; 3. score the responses; 4. old and reference
log-probs and values, one forward each without gradients; 5. per-token reward = score - beta KL; 6. GAE,
then whitening; 7. ``ppo_epochs`` passes over shuffled minibatches of the buffer with
``-L^CLIP + c1 L^VF - c2 S``; 8. adapt beta; 9. log and checkpoint. Where the update is one forward and
backward over the whole rollout (one epoch, one minibatch, one micro-batch), the policy's forward of step 4
is that of the update itself, and steps 5-6 run on its detached outputs: the same numbers (the ratio is
then exactly 1, as TRL's GRPO skips its old log-probs), one forward fewer. Implementation details
follow Huang et al. 2024 ("The N+ Implementation Details of RLHF with PPO") and OpenAI's
lm-human-preferences. Run: ``rlhf ppo --model SFT_DIR --reward-model RM_DIR --data prompts.jsonl``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from functools import partial

import torch

from rlhf.recipes.configs.ppo import Config
from rlhf.algos import (
    AdaptiveKLController, FixedKLController, agg_loss, gae, kl_penalized_rewards, masked_mean, masked_whiten, ppo_loss, ppo_policy_loss, value_loss,
)
from rlhf.models import (
    Critic, PolicyAndCritic, PolicyWithValueHead, disable_dropout, eval_mode, load_sequence_classifier,
    save_pretrained, unwrap,
)
from rlhf.errors import UserError
from rlhf.training.loop import (StepTimer, StepPlan, check_trained, clip_grad_norm, count_skip, mean_over_processes,
                                micro_batch, reduce_sum, shard)
from rlhf.training.setup import adamw, load_data, load_policy, load_reference, make_accelerator, start
from rlhf.recipes.logprobs import all_pair_logps, model_response_logprobs, policy_forward
from rlhf.training.logs import write_model_card
from rlhf.watch.monitor import Monitor
from rlhf.watch.samples import SampleLog
from rlhf.training.saving import announce_saved, full_state_dict, save_final
from rlhf.recipes.episodes import EpisodeSampler
from rlhf.recipes.scoring import (build_rollout, check_prompt_positions, generate_and_score, is_sharded, make_scorer,
                                  reward_fn_metrics, sampling_params)
from rlhf.watch.stopping import BestPolicy, PreferenceEval, watch
from rlhf.rollout import RolloutBatch, merged_named_weights




# ---- forwards ---------------------------------------------------------------------------------

@torch.no_grad()
def rollout_forwards(cfg, model, critic, ref, batch: RolloutBatch, chunk: int, policy: bool = True):
    """Step 4: old log-probs and values from the policy (unless not ``policy``: then None), log-probs
    from the reference.

    Returns ``(old_logprobs, values, ref_logprobs, seconds)``, ``seconds`` those of the reference's passes.
    """
    prompt_len = batch.prompt_ids.shape[1]
    ids, mask = batch.input_ids, batch.attention_mask
    old, values, refs = [], [], []
    seconds = 0.0
    with eval_mode(*(m for m in (model, critic) if m is not None)):
        for i in range(0, ids.shape[0], chunk):
            if policy:
                lp, v, _ = policy_forward(model, critic, ids[i : i + chunk], mask[i : i + chunk], prompt_len,
                                          cfg.temperature)
                old.append(lp)
                values.append(v)
            t1 = time.perf_counter()
            ref_lp, _ = model_response_logprobs(ref, ids[i : i + chunk], mask[i : i + chunk], prompt_len, cfg.temperature)
            seconds += time.perf_counter() - t1
            refs.append(ref_lp)
    return (torch.cat(old) if policy else None), (torch.cat(values) if policy else None), torch.cat(refs), seconds


def rewards_and_advantages(cfg, accelerator, kl_coef: float, scores, ref_logprobs, mask, old_logprobs, old_values
                           ) -> dict[str, torch.Tensor]:
    """Steps 5-6: per-token rewards (the score at the last token minus beta KL at every token), GAE (gamma,
    lambda) advantages and value targets, the advantages whitened with the global batch's statistics.

    Shape:
        scores: (B,); the rest (B, R) -> ``old_logprobs``, ``old_values``, ``rewards``, ``kl``, ``advantages``,
        ``returns``, each (B, R).
    """
    rewards, kl = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef, cfg.kl_estimator)
    advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask, reduce_sum=lambda t: reduce_sum(accelerator, t))
    return {"old_logprobs": old_logprobs, "old_values": old_values, "rewards": rewards, "kl": kl,
            "advantages": advantages, "returns": returns}


def single_pass(cfg, n_rows: int, world: int) -> bool:
    """Whether the update is one forward and backward over the whole rollout of ``n_rows`` (this process's):
    then that forward also serves as step 4's (:func:`ppo_update`)."""
    return cfg.ppo_epochs == 1 and n_rows <= min(max(1, cfg.mini_batch_size // world), cfg.batch_size)


# ---- the inner loop -------------------------------------------------------------------------

def ppo_update(cfg: Config, accelerator, model, critic, optimizers: list, schedulers: list, buffer: dict) -> dict:
    """Step 7: ``ppo_epochs`` passes over shuffled minibatches; returns mean metrics.

    A buffer with ``"advantages_of"`` (:func:`single_pass`) holds no old log-probs and values yet: the one
    forward gives them, detached, in the rollout's row order, to ``advantages_of`` (steps 5-6), whose results
    join the buffer; they are bit for bit those of a forward without gradient (dropout is off).
    """
    world = accelerator.num_processes
    n = buffer["input_ids"].shape[0]
    mb = max(1, cfg.mini_batch_size // world)
    prompt_len = buffer["prompt_len"]
    sums: dict[str, torch.Tensor] = {}
    n_updates = skipped = 0
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(n, device=buffer["input_ids"].device)
        for start_ in range(0, n, mb):
            idx = perm[start_ : start_ + mb]
            mask_mb = buffer["response_mask"][idx]
            tokens = reduce_sum(accelerator, mask_mb.sum().float()).clamp(min=1)
            seqs = reduce_sum(accelerator, (mask_mb.sum(1) > 0).sum().float()).clamp(min=1)
            agg = {"global_tokens": tokens, "global_seqs": seqs}
            micro = [idx[i : i + cfg.batch_size] for i in range(0, len(idx), cfg.batch_size)]
            for k, mi in enumerate(micro):
                b = {key: buffer[key][mi] for key in ("input_ids", "attention_mask", "response_mask")}
                mask = b["response_mask"]
                with micro_batch(accelerator, model, critic, last=k == len(micro) - 1):
                    logprobs, values, entropy = policy_forward(model, critic, b["input_ids"], b["attention_mask"],
                                                               prompt_len, cfg.temperature, with_entropy=True)
                    if "advantages_of" in buffer:  # the rollout's forward is this one: steps 5-6 on its outputs
                        back = torch.argsort(mi)  # to the rollout's row order
                        buffer.update(buffer.pop("advantages_of")(logprobs.detach()[back], values.detach()[back]))
                    b.update({key: buffer[key][mi] for key in ("old_logprobs", "old_values", "advantages", "returns")})
                    pg_loss, pg_m = ppo_policy_loss(logprobs, b["old_logprobs"], b["advantages"], mask,
                                                    clip_eps=cfg.clip_eps, agg=cfg.loss_agg, **agg)
                    vf_loss, vf_m = value_loss(values, b["old_values"], b["returns"], mask,
                                               clip_eps=cfg.clip_eps_value, agg=cfg.loss_agg, **agg)
                    ent = agg_loss(entropy, mask, cfg.loss_agg, **agg)
                    loss = ppo_loss(pg_loss, vf_loss, ent, cfg.vf_coef, cfg.ent_coef)
                    accelerator.backward(loss * world)  # DDP averages over processes
                # Metrics stay tensors (no sync in the loop); each micro weighs by its share of tokens.
                share = mask.sum() / tokens
                for name, value in (("policy/clipfrac", pg_m["clipfrac"] * share),
                                    ("policy/approxkl", pg_m["approx_kl"] * share),
                                    ("policy/ratio_mean", pg_m["ratio_mean"] * share),
                                    ("val/clipfrac", vf_m["clipfrac"] * share),
                                    ("val/explained_variance", vf_m["explained_variance"] * share),
                                    ("loss/policy", pg_loss.detach()), ("val/loss", vf_loss.detach()),
                                    ("objective/entropy", ent.detach())):
                    sums[name] = sums.get(name, 0.0) + value
            # Actor and critic clipped apart, over their parameters as prepare left them (FSDP replaces them).
            norms = [clip_grad_norm(accelerator, g["params"], cfg.max_grad_norm)
                     for o in optimizers for g in o.param_groups if g["params"]]
            if all(torch.isfinite(torch.as_tensor(x)) for x in norms):
                for o, sch in zip(optimizers, schedulers):
                    o.step()
                    sch.step()
            else:
                skipped += 1
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            n_updates += 1
    out = {k: float(reduce_sum(accelerator, v)) / n_updates for k, v in sums.items()}
    out["train/skipped_updates"] = float(skipped)
    out["train/updates"] = float(n_updates)
    return out


# ---- the outer loop -------------------------------------------------------------------------

def build_models(cfg: Config, accelerator):
    """Actor (+ value head or separate critic) and the frozen reference."""
    tokenizer, policy = load_policy(cfg)
    disable_dropout(policy)
    ref = load_reference(cfg, policy, tokenizer).to(accelerator.device)  # default: LoRA base / frozen copy
    critic = None
    if cfg.critic == "shared":
        model = PolicyWithValueHead(policy)
    else:
        model = policy
        critic = Critic(disable_dropout(load_sequence_classifier(cfg.critic_model or cfg.reward_model or cfg.model,
                                                                attn_implementation=cfg.attn_implementation,
                                                                first_member=True)))
        if accelerator.distributed_type.value == "DEEPSPEED":  # one engine per backward: one module, two parts
            model, critic = PolicyAndCritic(policy, critic), None
    return tokenizer, model, critic, ref


def value_part(model, critic):
    """What holds the values' parameters: the separate critic, the value head, or the critic inside
    :class:`PolicyAndCritic` (a Critic, whose ``model`` is saved)."""
    if critic is not None:
        return critic
    return model.critic if isinstance(model, PolicyAndCritic) else model.value_head


def save_models(accelerator, unwrapped, critic, tokenizer, cfg: Config, metrics: dict[str, float], checkpointer,
                directory: str | None = None) -> None:
    """The policy (HF format, LoRA merged or not), and its value head or critic, in ``directory``
    (default --output-dir; ``OUTPUT/best`` for --stop-on-overoptimisation)."""
    final = directory is None
    if not final:
        cfg = dataclasses.replace(cfg, output_dir=directory)
    save_final(accelerator, unwrapped.policy if critic is None else unwrapped, tokenizer, cfg, "PPO policy", metrics,
               checkpointer, announce=False)
    part = value_part(unwrapped, unwrap(critic) if critic is not None else None)
    critic_model = part.model if isinstance(part, Critic) else None
    # Sharded, every process takes part in gathering the value head or the critic; the main one writes.
    gathered = full_state_dict(accelerator, part if critic_model is None else critic_model)
    if accelerator.is_main_process:
        try:
            if critic_model is None:
                unwrapped.save_value_head(cfg.output_dir, gathered)
            else:
                critic_dir = os.path.join(cfg.output_dir, "critic")
                save_pretrained(critic_model, None, critic_dir, merge_adapters=False, state_dict=gathered)
                write_model_card(cfg, critic_dir, "PPO critic", metrics)
        except OSError as e:
            raise UserError(f"--output-dir {cfg.output_dir}: the policy was saved, but not the critic "
                            f"({e.strerror or e}); last checkpoint: {checkpointer.latest() or 'none'}") from None
    accelerator.wait_for_everyone()
    if final:
        announce_saved(accelerator, cfg.output_dir)


def run(cfg: Config) -> dict[str, float]:
    cfg.check()  # the command line checked it already; the Python API gets the same errors
    accelerator = make_accelerator(cfg)
    if accelerator.distributed_type.value == "DEEPSPEED" and cfg.max_grad_norm:
        accelerator.print("--max-grad-norm under DeepSpeed: the engine clips the policy and its critic together "
                          "(one norm, as TRL's PPO does), not apart")
    tokenizer, model, critic, ref = build_models(cfg, accelerator)
    scorer = make_scorer(cfg, tokenizer, accelerator.device) if not cfg.env or cfg.reward_fn or cfg.reward_model else None
    episodes = EpisodeSampler.for_run(cfg, accelerator, tokenizer)
    prompts = load_data(cfg, cfg.data, "prompt", tokenizer, accelerator.print)
    check_prompt_positions(cfg, model.policy if critic is None else model, prompts)
    plan = StepPlan(len(prompts), cfg.rollout_batch_size, 1, cfg.seed)
    total = plan.total_steps(cfg.epochs, cfg.max_steps)

    actor_params = [p for p in (model.policy if critic is None else model).parameters() if p.requires_grad]
    critic_params = list(value_part(model, critic).parameters())
    from transformers import get_scheduler

    n_updates = total * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.mini_batch_size)
    groups = [{"params": actor_params, "lr": cfg.lr}, {"params": critic_params, "lr": cfg.critic_lr or cfg.lr}]
    schedule = lambda o: get_scheduler(cfg.lr_scheduler, o, int(cfg.warmup_ratio * n_updates), n_updates)  # noqa: E731
    if critic is None:  # one model: one optimizer, a group for the policy and one for its value head
        optimizers = [adamw(cfg, groups)]
    else:  # two models, each prepared with its own optimizer (FSDP2 prepares a model together with it)
        optimizers = [adamw(cfg, groups[:1]), adamw(cfg, groups[1:])]
        critic, optimizers[1] = accelerator.prepare(critic, optimizers[1])
        accelerator.register_for_checkpointing(critic_scheduler := schedule(optimizers[1]))
    scheduler = schedule(optimizers[0])
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(cfg.kl_coef))
    accelerator.register_for_checkpointing(kl_ctl)
    model, optimizers[0], state, checkpointer, logger = start(
        cfg, accelerator, model, optimizers[0], scheduler, total, {"objective/scores": "reward", "objective/kl": "kl"})
    schedulers = [scheduler] + ([critic_scheduler] if critic is not None else [])
    cfg.warn_truncated_sampling(logger, state.step)
    monitor = Monitor(cfg, state.extra) if cfg.monitor else None
    samples = SampleLog(cfg.output_dir, cfg.log_samples, cfg.log_every, total, state.step, accelerator.is_main_process)
    unwrapped = unwrap(model)
    # Sharded (FSDP, DeepSpeed), the shared model is sampled and scored through its root, which gathers the weights.
    sampled_policy = unwrapped.policy if critic is None and not is_sharded(accelerator) else unwrapped
    rollout = build_rollout(cfg, sampled_policy, tokenizer, accelerator)
    sampling = sampling_params(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    metrics: dict[str, float] = {}
    # Held-out preference pairs (implicit preference accuracy, step 0 first) and --stop-on-overoptimisation.
    pref_eval = (PreferenceEval(cfg, accelerator, tokenizer, sampled_policy, ref, state.extra, state.step,
                                all_pair_logps)
                 if cfg.eval_data else None)
    if pref_eval is not None and monitor is not None:
        pref_eval.add_rule(monitor)
    if pref_eval is not None and state.step == 0:
        logger.log(0, pref_eval.evaluate(0))
    best = (BestPolicy(cfg, accelerator, lambda d, m: save_models(accelerator, unwrapped, critic, tokenizer, cfg, m,
                                                                  checkpointer, d), state.extra, "objective/scores")
            if cfg.stop_on_overoptimisation else None)
    stop = False

    while state.step < total:
        timer = StepTimer()  # laps: generate, score, policy_value_pass, reference_pass, train, weight_sync
        # 1. Sample a batch of prompts.
        examples = [prompts.examples[i] for i in shard(plan.step_indices(state.step)[0], rank, world)]
        # 2-3. Generate responses (KV cache, left padding, stop when all have finished) and score them;
        # with --env, play an episode per prompt (its observations are attended to, never trained).
        if episodes is not None:
            batch, completions, scores, score_metrics, examples, _ = episodes(
                accelerator, rollout, prompts, plan.step_indices(state.step)[0], sampling, scorer, timer)
        else:
            batch, completions, scores, score_metrics = generate_and_score(rollout, examples, sampling, tokenizer,
                                                                           scorer, accelerator.device, timer)
        if scores.isnan().any():
            raise UserError("no reward function applied to some responses (every one returned None): PPO needs a "
                            "score for every response (GRPO leaves them out)")
        if best is not None:  # the policy that sampled this rollout may be the best so far: keep it before it moves
            best.offer(state.step + 1, float(reduce_sum(accelerator, scores.sum()) / (len(examples) * world)))
            timer.lap("time/score")
        # 4. Old log-probs, values and reference log-probs, without gradients, dropout off (the policy's from
        #    the update's own forward where that is one pass over the whole rollout).
        one_pass = single_pass(cfg, batch.input_ids.shape[0], world)
        old_logprobs, old_values, ref_logprobs, ref_seconds = rollout_forwards(cfg, model, critic, ref, batch,
                                                                               cfg.batch_size, policy=not one_pass)
        timer.lap("time/policy_value_pass", time_reference_pass=ref_seconds)
        mask = batch.loss_mask  # the model's tokens: GAE's time steps (an episode's observations are holes)
        # 5-6. Per-token rewards (score - beta KL), GAE advantages and value targets, whitened over all processes.
        kl_coef = kl_ctl.value
        advantages_of = partial(rewards_and_advantages, cfg, accelerator, kl_coef, scores, ref_logprobs, mask)
        # 7. The experience buffer, and ppo_epochs over it.
        buffer = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "response_mask": mask,
                  "prompt_len": batch.prompt_ids.shape[1]}
        buffer.update({"advantages_of": advantages_of} if one_pass else advantages_of(old_logprobs, old_values))
        train_metrics = ppo_update(cfg, accelerator, model, critic, optimizers, schedulers, buffer)
        rewards, kl, old_values = buffer["rewards"], buffer["kl"], buffer["old_values"]
        timer.lap("time/train")
        rollout.load_weights(merged_named_weights(sampled_policy))  # the sampler follows the policy
        timer.lap("time/weight_sync")
        # 8. Adapt beta to the measured KL.
        kl_per_seq = float(reduce_sum(accelerator, kl.sum(1).sum()) / (len(examples) * world))
        kl_ctl.update(kl_per_seq, n_steps=cfg.rollout_batch_size)
        state.step += 1
        logger.advance()
        count_skip(cfg, state, train_metrics["train/skipped_updates"] == train_metrics["train/updates"], checkpointer)
        # 9. Log and checkpoint.
        metrics = {
            "objective/scores": float(reduce_sum(accelerator, scores.sum()) / (len(examples) * world)),
            "objective/rlhf_reward": float(reduce_sum(accelerator, rewards.sum()) / (len(examples) * world)),
            "objective/kl": kl_per_seq, "objective/kl_coef": kl_ctl.value,
            **mean_over_processes(accelerator, {  # equally many rows on every process
                "val/mean": float(masked_mean(old_values, mask)), "response/length_mean": float(mask.sum(1).float().mean()),
                "response/no_eos_fraction": float((~batch.finished).float().mean())}),
            "speed/tokens_per_second": float(mask.sum() * world) / timer.metrics()["time/step"],
            **timer.metrics(), **mean_over_processes(accelerator, score_metrics), **train_metrics,
            **(reward_fn_metrics(accelerator, scorer.last_fn_scores) if scorer is not None else {}),
        }
        if monitor is not None:  # over-optimisation signals of this rollout, against step 0
            metrics.update(monitor.measure(state.step, batch.response_ids, mask, scores, kl, kl_coef,
                                           member_scores=scorer.last_member_scores))
        stop = watch(state.step, total, metrics, monitor, pref_eval, best, logger)  # warnings; stop at one?
        if state.step % cfg.log_every == 0 or state.step == total or stop:
            logger.log(state.step, metrics)
        samples.write(state.step, [e["prompt"] for e in examples], completions, scores, mask)
        if cfg.save_every and state.step % cfg.save_every == 0:
            checkpointer.save(state.step)
        if stop or logger.stop_requested:  # the monitor's warning, or a callback of the Python API
            break

    if monitor is not None:
        monitor.summary(state.step, logger)
    logger.close()
    check_trained(state)
    save_last = lambda: save_models(accelerator, unwrapped, critic, tokenizer, cfg, metrics, checkpointer)  # noqa: E731
    if best is not None:  # on a stop, the best policy before the warning; else the last step's
        best.finish(stop, state.step, save_last)
    else:
        save_last()
    return metrics
