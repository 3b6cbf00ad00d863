"""On-policy distillation (GKD): a student learns a teacher's next-token distributions on its own samples.

Each step: 1. prompts (each routed to its teacher by the ``teacher`` column when several are given);
2. the student samples a completion of each (or, on a ``1 - --lmbda`` share of the steps, the data's
own completions: GKD's mix); 3. student and teacher score every position of those completions;
4. the student minimises the per-token divergence from the teacher (reverse KL by default, forward KL
or the generalised JSD by ``--beta``), averaged over the completion tokens; 5. log, evaluate and
checkpoint. Agarwal et al. 2024 (GKD, "On-Policy Distillation of Language Models", algorithm 1);
Thinking Machines 2025 (on-policy distillation: reverse KL on the student's samples).

Left out: the teacher generating the completions (GKD's supervised "seq_kd" mix) and the importance-
sampled sampled-token estimator of the reverse KL; the full-vocabulary divergence is used instead.
"""

from __future__ import annotations


import torch

from rlhf.recipes.configs.distill import Config
from rlhf.errors import UserError
from rlhf.models import disable_dropout, eval_mode, unwrap
from rlhf.recipes.logprobs import response_divergence
from rlhf.recipes.scoring import build_rollout, check_prompt_positions
from rlhf.rollout import RolloutBatch, SamplingParams, merged_named_weights, response_mask_from_ids
from rlhf.training.loop import StepPlan, StepTimer, check_trained, clip_grad_norm, count_skip, reduce_sum, shard
from rlhf.training.saving import save_final
from rlhf.training.setup import load_data, load_policy, make_accelerator, make_optimizer, start
from rlhf.watch.samples import SampleLog




def load_teachers(cfg: Config, tokenizer) -> dict:
    """Each teacher, frozen; one whose tokenizer differs from the student's is refused, naming the first
    token that differs."""
    from rlhf.models import ModelLoadError, freeze, load_causal_lm, load_tokenizer

    student_vocab = tokenizer.get_vocab()
    teachers = {}
    for name, path in cfg.teachers().items():
        try:
            vocab = load_tokenizer(path, trust_remote_code=cfg.trust_remote_code).get_vocab()
        except ModelLoadError as e:
            raise UserError(f"--teacher {e}") from None
        if vocab != student_vocab:
            by_id = {i: t for t, i in vocab.items()}
            student_by_id = {i: t for t, i in student_vocab.items()}
            first = min(set(by_id) ^ set(student_by_id) | {i for i in by_id if student_by_id.get(i) != by_id[i]})
            raise UserError(f"--teacher {path}: its tokenizer differs from the student's at token id {first} "
                            f"({by_id.get(first)!r} against {student_by_id.get(first)!r}); distillation compares "
                            "the two distributions token by token")
        teachers[name] = freeze(load_causal_lm(path, trust_remote_code=cfg.trust_remote_code,
                                               attn_implementation=cfg.attn_implementation))
    return teachers


def route(cfg: Config, teachers: dict, examples: list[dict], where: list[str]) -> None:
    """Check every row names a teacher (several teachers) before training; one line naming the row."""
    if len(teachers) == 1:  # one teacher, named or not: every row is its
        return
    for e, at in zip(examples, where):
        if e.get(cfg.teacher_column) not in teachers:
            raise UserError(f"{at}: {cfg.teacher_column} {e.get(cfg.teacher_column)!r} is none of the --teacher "
                            f"names ({', '.join(teachers)})")


def data_completions(cfg: Config, examples: list[dict], tokenizer, device) -> RolloutBatch:
    """The data's own completions of ``examples`` as a batch (GKD's off-policy share), cut to
    --max-new-tokens; prompts left-padded, completions right-padded, EOS appended as in SFT."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    responses = []
    for e in examples:
        ids = tokenizer(str(e["completion"]), add_special_tokens=False).input_ids
        responses.append((ids if ids[-1:] == [eos] else ids + [eos])[: cfg.max_new_tokens])
    P, R = max(len(e["prompt_ids"]) for e in examples), max(len(r) for r in responses)
    prompt_ids = torch.tensor([[pad] * (P - len(e["prompt_ids"])) + e["prompt_ids"] for e in examples])
    prompt_mask = torch.tensor([[0] * (P - len(e["prompt_ids"])) + [1] * len(e["prompt_ids"]) for e in examples])
    response_ids = torch.tensor([r + [pad] * (R - len(r)) for r in responses])
    mask, finished = response_mask_from_ids(response_ids, eos)
    mask = mask * torch.tensor([[1] * len(r) + [0] * (R - len(r)) for r in responses])
    return RolloutBatch(prompt_ids, prompt_mask, response_ids, mask, finished).to(device)


def divergences(cfg: Config, model, teachers: dict, batch: RolloutBatch, examples: list[dict],
                vocab: int) -> dict:
    """:func:`response_divergence` of each row against its teacher (one student forward). Shape: each (B, R)."""
    if len(teachers) == 1:
        routes = [(next(iter(teachers.values())), torch.arange(len(examples)))]
    else:
        routes = [(t, torch.tensor([i for i, e in enumerate(examples) if e.get(cfg.teacher_column) == name],
                                   dtype=torch.long)) for name, t in teachers.items()]
    return response_divergence(model, routes, batch.input_ids, batch.attention_mask, batch.prompt_ids.shape[1],
                               cfg.beta, cfg.temperature, cfg.teacher_top_k, vocab)


def evaluate(cfg: Config, accelerator, model, teachers: dict, rollout, tokenizer, held_out, scorer,
             teacher_reward: list) -> dict[str, float]:
    """Held-out prompts: the student's per-token reverse KL to its teacher on its own samples, and the task
    metric (--eval-reward-fn) of the student's samples and, computed once, of the teacher's: sampled under
    a random state of its own seeded with --seed, so the training samples (and a resumed run) are untouched."""
    params = SamplingParams(cfg.temperature, 1.0, 0, cfg.max_new_tokens, 1)
    sums = torch.zeros(4)  # reverse KL sum, tokens, reward sum, rows
    mine = shard(list(range(len(held_out.examples))), accelerator.process_index, accelerator.num_processes)
    first_time = not teacher_reward
    teacher_sum = torch.zeros(1)
    with torch.no_grad(), eval_mode(model):
        for i in range(0, max(len(mine), 1), cfg.batch_size):
            examples = [held_out.examples[j] for j in mine[i : i + cfg.batch_size]] or [held_out.examples[0]]
            weight = 1.0 if mine[i : i + cfg.batch_size] else 0.0  # a process without rows still steps the sampler
            batch = rollout.generate([e["prompt_ids"] for e in examples], params).to(accelerator.device)
            d = divergences(cfg, model, teachers, batch, examples, len(tokenizer))
            mask = batch.response_mask.float()
            sums += weight * torch.tensor([float((d["reverse_kl"] * mask).sum()), float(mask.sum()),
                                           float(_task_reward(scorer, batch, examples, tokenizer).sum()), len(examples)])
            if scorer is not None and first_time:
                for name, teacher in teachers.items():
                    rows = [e for e in examples if len(teachers) == 1 or e.get(cfg.teacher_column) == name]
                    if rows:
                        with torch.random.fork_rng(devices=[]):
                            torch.manual_seed(cfg.seed + i)
                            tb = build_rollout(cfg, teacher, tokenizer, accelerator).generate(
                                [e["prompt_ids"] for e in rows], params).to(accelerator.device)
                        teacher_sum += weight * float(_task_reward(scorer, tb, rows, tokenizer).sum())
    total = reduce_sum(accelerator, torch.cat([sums, teacher_sum]))
    out = {"eval/reverse_kl": float(total[0] / total[1].clamp(min=1))}
    if scorer is not None:
        out["eval/reward"] = float(total[2] / total[3].clamp(min=1))
        if first_time:
            teacher_reward.append(float(total[4] / total[3].clamp(min=1)))
        out["eval/teacher_reward"] = teacher_reward[0]
    return out


def _task_reward(scorer, batch: RolloutBatch, examples: list[dict], tokenizer) -> torch.Tensor:
    if scorer is None:
        return torch.zeros(len(examples))
    from rlhf.recipes.rewards import in_prompt_form

    ids = batch.response_ids.masked_fill(batch.response_mask == 0, tokenizer.pad_token_id)
    completions = tokenizer.batch_decode(ids, skip_special_tokens=True)
    prompts = [e["prompt"] for e in examples]
    extras = {k: [e[k] for e in examples] for k in examples[0] if k not in ("prompt", "prompt_ids", "prompt_truncated",
                                                                            "response_truncated", "_where")}
    scores, _ = scorer(batch, prompts, [in_prompt_form(p, c) for p, c in zip(prompts, completions)], extras,
                       [e.get("_where") for e in examples])
    return scores.float().cpu()


def run(cfg: Config) -> dict[str, float]:
    cfg.check()
    accelerator = make_accelerator(cfg)
    tokenizer, student = load_policy(cfg)
    disable_dropout(student)
    teachers = {name: t.to(accelerator.device) for name, t in load_teachers(cfg, tokenizer).items()}
    prompts = load_data(cfg, cfg.data, "prompt", tokenizer, accelerator.print)
    route(cfg, teachers, prompts.examples, prompts.where)
    if cfg.lmbda < 1.0 and any(not isinstance(e.get("completion"), str) for e in prompts.examples):
        at = next(w for e, w in zip(prompts.examples, prompts.where) if not isinstance(e.get("completion"), str))
        raise UserError(f"{at}: --lmbda {cfg.lmbda} trains {1 - cfg.lmbda:.0%} of the steps on the data's "
                        "completions, and this row has no completion (a string)")
    held_out = load_data(cfg, cfg.eval_data, "prompt", tokenizer, accelerator.print) if cfg.eval_data else None
    if held_out is not None:
        route(cfg, teachers, held_out.examples, held_out.where)
    check_prompt_positions(cfg, student, prompts)
    from rlhf.recipes.rewards import load_reward_fns
    from rlhf.recipes.scoring import Scorer

    scorer = Scorer(None, load_reward_fns(cfg.eval_reward_fn), normalize=False) if cfg.eval_reward_fn else None
    plan = StepPlan(len(prompts), cfg.batch_size, 1, cfg.seed)
    total = plan.total_steps(cfg.epochs, cfg.max_steps)
    optimizer, scheduler = make_optimizer(cfg, student.parameters(), total)
    model, optimizer, state, checkpointer, logger = start(cfg, accelerator, student, optimizer, scheduler, total,
                                                          {"distill/loss": "loss", "distill/reverse_kl": "reverse_kl"})
    rollout = build_rollout(cfg, unwrap(model), tokenizer, accelerator)
    teacher_reward: list[float] = []
    samples = SampleLog(cfg.output_dir, cfg.log_samples, cfg.log_every, total, state.step, accelerator.is_main_process)
    params = SamplingParams(cfg.temperature, 1.0, 0, cfg.max_new_tokens, 1)
    run_eval = (lambda: evaluate(cfg, accelerator, unwrap(model), teachers, rollout, tokenizer,
                                 held_out, scorer, teacher_reward))
    if held_out is not None and state.step == 0:
        logger.log(0, run_eval())
    params_list = [p for g in optimizer.param_groups for p in g["params"]]  # as prepare left them (not stand-ins)
    metrics: dict[str, float] = {}
    while state.step < total:
        timer = StepTimer()
        # 1. Prompts.
        examples = [prompts.examples[i]
                    for i in shard(plan.step_indices(state.step)[0], accelerator.process_index, accelerator.num_processes)]
        # 2. Completions: the student's own (a --lmbda share of the steps, drawn from the step's seed) or the data's.
        coin = torch.rand((), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + state.step))
        on_policy = bool(coin < cfg.lmbda)
        with torch.no_grad(), eval_mode(model):
            batch = (rollout.generate([e["prompt_ids"] for e in examples], params).to(accelerator.device) if on_policy
                     else data_completions(cfg, examples, tokenizer, accelerator.device))
        timer.lap("time/generate")
        # 3-4. Both models score every completion position; the student minimises the token-mean divergence.
        mask = batch.response_mask.float()
        global_tokens = reduce_sum(accelerator, mask.sum()).clamp(min=1)
        d = divergences(cfg, model, teachers, batch, examples, len(tokenizer))
        loss = (d["divergence"] * mask).sum() / global_tokens
        accelerator.backward(loss * accelerator.num_processes)
        grad_norm = clip_grad_norm(accelerator, params_list, cfg.max_grad_norm)
        finite = bool(torch.isfinite(torch.as_tensor(grad_norm)))
        if finite:
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        timer.lap("time/train")
        rollout.load_weights(merged_named_weights(unwrap(model)))  # the sampler follows the student
        state.step += 1
        logger.advance()
        count_skip(cfg, state, not finite, checkpointer)
        # 5. Log, evaluate and checkpoint.
        token_sums = reduce_sum(accelerator, torch.stack([(d[k].detach() * mask).sum() for k in (
            "reverse_kl", "student_logprobs", "teacher_logprobs", "entropy")]) / global_tokens)
        n = reduce_sum(accelerator, torch.tensor([float(len(examples)), float((~batch.finished).sum()),
                                                  float(mask.sum())]))
        metrics = {"distill/loss": float(reduce_sum(accelerator, loss.detach())), "distill/reverse_kl": float(token_sums[0]),
                   "logps/student": float(token_sums[1]), "logps/teacher": float(token_sums[2]),
                   "entropy": float(token_sums[3]), "distill/on_policy": float(on_policy),
                   "completions/mean_length": float(n[2] / n[0]), "completions/clipped_ratio": float(n[1] / n[0]),
                   "grad_norm": float(grad_norm), "train/lr": scheduler.get_last_lr()[0],
                   "train/skipped_steps": float(state.skipped_steps), **timer.metrics()}
        if cfg.teacher_top_k:
            mass = reduce_sum(accelerator, torch.stack([(d["top_k_mass"] * mask).sum(), mask.sum()]))
            metrics["distill/teacher_top_k_mass"] = float(mass[0] / mass[1].clamp(min=1))
        if held_out is not None and (state.step == total or (cfg.eval_every and state.step % cfg.eval_every == 0)):
            metrics.update(run_eval())
        if state.step % cfg.log_every == 0 or state.step == total:
            logger.log(state.step, metrics)
        completions = tokenizer.batch_decode(batch.response_ids.masked_fill(batch.response_mask == 0,
                                                                            tokenizer.pad_token_id),
                                             skip_special_tokens=True)
        samples.write(state.step, [e["prompt"] for e in examples], completions,
                      -(d["reverse_kl"].detach() * mask).sum(1), batch.response_mask)
        if cfg.save_every and state.step % cfg.save_every == 0:
            checkpointer.save(state.step)
        if logger.stop_requested:
            break
    logger.close()
    check_trained(state)
    save_final(accelerator, model, tokenizer, cfg, f"distilled student (beta {cfg.beta})", metrics, checkpointer)
    return metrics
