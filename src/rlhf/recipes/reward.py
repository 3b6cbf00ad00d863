"""Stage 2: a reward model trained on (prompt, chosen, rejected) with the Bradley-Terry loss.

The SFT model's LM head is replaced by a scalar head (seed 003, Phase 2) and trained on
``-log sigmoid(r(chosen) - r(rejected) - margin)``. After training it measures the mean and
std of its scores on the training data and stores them in its config, for whitening in PPO
(seed 003: reward calibration and normalisation).

With ``--ensemble K`` it trains K such reward models one after another from the same start,
member i with seed ``--seed + i``, and saves them as one ensemble directory (:func:`run_ensemble`).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
from functools import partial

import torch
from accelerate import PartialState

from rlhf.recipes.configs.reward import Config
from rlhf.algos import bradley_terry_loss, ensemble_std
from rlhf.data import collate_preference
from rlhf.models import (
    ENSEMBLE_FILE, Critic, gather_at, get_score_stats, is_ensemble, load_sequence_classifier, load_tokenizer,
    read_ensemble, score_index, set_score_stats, unwrap,
)
from rlhf.models.lora import set_gradient_checkpointing
from rlhf.errors import UserError
from rlhf.training.loop import StepPlan, fit, pass_batches, to_device
from rlhf.training.setup import (check_positions, fit_default_length, load_data, make_accelerator, make_optimizer,
                                 process_options, start, with_lora)
from rlhf.training.checkpoints import (
    RUN_FILE, CheckpointError, Checkpointer, check_same_run, previous_results, remove_old_run, run_record,
)
from rlhf.training.logs import write_model_card
from rlhf.training.saving import remember, save_final, staged




def pair_scores(scorer, batch: dict, pad_token_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected scores from one concatenated forward, each read where transformers
    reads it (:func:`rlhf.models.score_index`: with PAD == EOS, the token before the EOS).

    Shapes: (B,), (B,).
    """
    per_token = scorer(batch["input_ids"], batch["attention_mask"])  # (2B, L)
    scores = gather_at(per_token, score_index(batch["input_ids"], batch["attention_mask"], pad_token_id))  # (2B,)
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def loss_fn(scorer, batch: dict, pad_token_id: int | None):
    chosen, rejected = pair_scores(scorer, batch, pad_token_id)
    loss, m = bradley_terry_loss(chosen, rejected, batch.get("margin"))
    return loss, {"train/accuracy": m["accuracy"], "rewards/margins": m["margin"],
                  "rewards/chosen": chosen.detach().mean(), "rewards/rejected": rejected.detach().mean()}


@torch.no_grad()
def score_all(accelerator, scorer, examples: list[dict], collate, batch_size: int,
              pad_token_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected scores of every example, gathered from all processes (in the order of the
    processes' shares, not of ``examples``)."""
    scorer.eval()
    rows = []  # (chosen, rejected, counts) of each row of each batch
    for idx, k in pass_batches(len(examples), accelerator.process_index, accelerator.num_processes, batch_size):
        batch = to_device(collate([examples[j] for j in idx]), accelerator.device)
        c, r = pair_scores(scorer, batch, pad_token_id)
        rows.append(torch.stack([c.float(), r.float(), (torch.arange(len(idx), device=c.device) < k).float()], 1))
    rows = torch.cat(rows) if rows else torch.zeros(0, 3, device=accelerator.device)
    if accelerator.num_processes > 1:  # every process has as many rows (pass_batches)
        rows = accelerator.gather(rows)
    rows = rows[rows[:, 2] > 0]
    return rows[:, 0], rows[:, 1]


def evaluate(accelerator, scorer, examples, collate, batch_size, pad_token_id) -> dict[str, float]:
    chosen, rejected = score_all(accelerator, scorer, examples, collate, batch_size, pad_token_id)
    both = torch.cat([chosen, rejected])
    return {"eval/accuracy": float((chosen > rejected).float().mean()),
            "eval/margin": float((chosen - rejected).mean()),
            "eval/reward_mean": float(both.mean()), "eval/reward_std": float(both.std())}


def bootstrap(examples: list[dict], where: list[str], seed: int) -> tuple[list[dict], list[str]]:
    """A bootstrap resample: ``len(examples)`` pairs drawn with replacement, seeded."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(examples), (len(examples),), generator=g).tolist()
    return [examples[i] for i in picks], [where[i] for i in picks]


def run(cfg: Config) -> dict[str, float]:
    """One reward model in ``--output-dir``, or with ``--ensemble K`` an ensemble (:func:`run_ensemble`)."""
    cfg.check()
    return run_ensemble(cfg) if cfg.ensemble > 1 else train_one(cfg)


def train_one(cfg: Config, bootstrap_seed: int | None = None) -> dict[str, float]:
    """Train and save one reward model (``bootstrap_seed``: on a bootstrap resample of the pairs)."""
    accelerator = make_accelerator(cfg)
    log = accelerator.print
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    classifier = load_sequence_classifier(cfg.model, trust_remote_code=cfg.trust_remote_code,
                                          attn_implementation=cfg.attn_implementation)
    classifier.config.pad_token_id = tokenizer.pad_token_id
    fit_default_length(cfg, classifier, f"--model {cfg.model}")
    check_positions(classifier, cfg.max_length, "--max-length", f"--model {cfg.model}")
    if cfg.lora:
        classifier = with_lora(cfg, classifier, task_type="SEQ_CLS")
    set_gradient_checkpointing(classifier, cfg.gradient_checkpointing)
    scorer = Critic(classifier)  # the scalar head read at every token; we take transformers' one

    # 1. Preference pairs, checked before training.
    train = load_data(cfg, cfg.data, "preference", tokenizer, log)
    held_out = load_data(cfg, cfg.eval_data, "preference", tokenizer, log) if cfg.eval_data else None
    collate = partial(collate_preference, pad_id=tokenizer.pad_token_id)
    examples, where = train.examples, train.where
    if bootstrap_seed is not None:
        examples, where = bootstrap(examples, where, bootstrap_seed)

    # 2. Optimiser, schedule, checkpoints.
    plan = StepPlan(len(examples), cfg.batch_size, cfg.grad_accum, cfg.seed)
    total = plan.total_steps(cfg.epochs, cfg.max_steps)
    optimizer, scheduler = make_optimizer(cfg, scorer.parameters(), total)
    scorer, optimizer, state, checkpointer, logger = start(cfg, accelerator, scorer, optimizer, scheduler, total,
                                                           {"train/loss": "loss", "train/accuracy": "acc"})
    pad_id = tokenizer.pad_token_id
    eval_fn = ((lambda: evaluate(accelerator, scorer, held_out.examples, collate, cfg.batch_size, pad_id))
               if held_out else None)

    # 3. Bradley-Terry: push r(chosen) above r(rejected).
    metrics = fit(cfg=cfg, accelerator=accelerator, model=scorer, optimizer=optimizer, scheduler=scheduler,
                  examples=examples, collate=collate, count=lambda b: b["input_ids"].shape[0] // 2,
                  loss_fn=partial(loss_fn, pad_token_id=pad_id), state=state, plan=plan, total_steps=total,
                  logger=logger, checkpointer=checkpointer, evaluate=eval_fn, where=where)

    # 4. Held-out accuracy, then score statistics for PPO's normalisation (on all the pairs).
    if eval_fn:
        metrics.update(eval_fn())
    chosen, rejected = score_all(accelerator, scorer, train.examples, collate, cfg.batch_size, pad_id)
    both = torch.cat([chosen, rejected])
    metrics.update({"train/reward_mean": float(both.mean()), "train/reward_std": float(both.std())})
    logger.log(state.step, {k: v for k, v in metrics.items() if k.startswith(("eval/", "train/reward_"))})
    logger.close()
    model = unwrap(scorer).model
    if cfg.normalize_scores:
        set_score_stats(model.get_base_model() if hasattr(model, "get_base_model") else model,
                        metrics["train/reward_mean"], metrics["train/reward_std"])
    save_final(accelerator, model, tokenizer, cfg, "Reward model", metrics, checkpointer)
    return metrics


# ---- ensembles: K members trained one after another, saved as one directory ------------------

def member_names(k: int) -> list[str]:
    return [f"member-{i}" for i in range(k)]


def check_ensemble_dir(cfg: Config) -> None:
    """Refuse, before any training, an --output-dir holding another run's results (top level or any
    member), unless --resume or --overwrite-output-dir; --resume takes no checkpoint path here."""
    if cfg.resume not in (None, "auto"):
        raise UserError(f"--resume {cfg.resume}: an ensemble resumes with plain --resume: each member from the "
                        f"newest checkpoint in {os.path.join(cfg.output_dir, 'member-I', 'checkpoints')}")
    if cfg.resume or cfg.overwrite_output_dir or not os.path.isdir(cfg.output_dir):
        return
    found = [n for n in (ENSEMBLE_FILE,) if os.path.exists(os.path.join(cfg.output_dir, n))]
    found += previous_results(cfg.output_dir)
    for name in member_names(cfg.ensemble):
        found += [os.path.join(name, f) for f in previous_results(os.path.join(cfg.output_dir, name))]
    if found:
        raise UserError(f"--output-dir {cfg.output_dir} holds another run's results ({', '.join(found[:4])}); pass "
                        "--resume to continue that run or --overwrite-output-dir to replace it")


def member_config(cfg: Config, i: int) -> Config:
    """Member i's config: its own output directory and seed; on --resume, its own newest checkpoint,
    or a fresh start (replacing what it left) when it had none yet."""
    out = os.path.join(cfg.output_dir, member_names(cfg.ensemble)[i])
    resume, overwrite = None, cfg.overwrite_output_dir
    if cfg.resume:
        has_checkpoint = Checkpointer(None, out, 0).latest() is not None
        resume, overwrite = ("auto", False) if has_checkpoint else (None, True)
    return dataclasses.replace(cfg, output_dir=out, seed=cfg.seed + i, resume=resume, overwrite_output_dir=overwrite)


def check_ensemble_resume(cfg: Config, names: list[str]) -> None:
    """--resume of an ensemble: something to resume, and every finished member (and a finished
    ensemble's ``ensemble.json``) trained by this same config; else one line naming what differs."""
    started = [n for n in names if is_finished(os.path.join(cfg.output_dir, n))
               or Checkpointer(None, os.path.join(cfg.output_dir, n), 0).latest() is not None]
    if not started:
        raise CheckpointError(f"--resume: no member of an ensemble in {cfg.output_dir} has a checkpoint or a saved "
                              "model to resume (drop --resume to start afresh)")
    for i, name in enumerate(names):
        member_dir = os.path.join(cfg.output_dir, name)
        if is_finished(member_dir) and os.path.exists(os.path.join(member_dir, RUN_FILE)):
            check_same_run(member_dir, member_config(cfg, i))
    if is_ensemble(cfg.output_dir):
        saved = read_ensemble(cfg.output_dir).get("run")
        now = run_record(cfg)
        differ = [k for k in now if saved and k in saved and saved[k] != now[k]]
        if differ:
            what = "; ".join(f"--{k.replace('_', '-')} {saved[k]!r} there, {now[k]!r} now" for k in differ)
            raise CheckpointError(f"--resume {cfg.output_dir}: an ensemble trained by another run ({what}); resume "
                                  "with the same config, or start afresh with --overwrite-output-dir")


def is_finished(member_dir: str) -> bool:
    """A member whose final save completed (``save_final`` moves ``config.json`` last)."""
    return os.path.isfile(os.path.join(member_dir, "config.json"))


def run_ensemble(cfg: Config) -> dict[str, float]:
    """Train ``cfg.ensemble`` reward models and save them as one ensemble directory::

        OUTPUT_DIR/ensemble.json      members, default aggregation, how they were trained, metrics
        OUTPUT_DIR/member-0/ ...      each a plain AutoModelForSequenceClassification directory
        OUTPUT_DIR/tokenizer files    shared by all members

    Each member is :func:`train_one` in its own directory (its own checkpoints, metrics.jsonl, model
    card and score statistics). ``ensemble.json`` is written last, atomically, so a directory with
    one is complete. --resume skips finished members and resumes the others from their checkpoints,
    so it ends with the same members as an uninterrupted run.
    """
    check_ensemble_dir(cfg)
    names = member_names(cfg.ensemble)
    if cfg.resume:
        check_ensemble_resume(cfg, names)
    # Prints and writes once, from the main process. The members' accelerators share this state, so it is made
    # as theirs are: a default PartialState() would leave each process of a launch to train alone (on CPU).
    cpu, group = process_options(cfg)
    state = PartialState(cpu, **(group.to_kwargs() if group else {}))
    for i, name in enumerate(names):
        member = member_config(cfg, i)
        if cfg.resume and is_finished(member.output_dir):
            state.print(f"{name}: already trained in {member.output_dir}")
            continue
        state.print(f"{name} of {cfg.ensemble}: seed {member.seed}"
                    + (", bootstrap resample" if cfg.ensemble_bootstrap else ""))
        train_one(member, bootstrap_seed=member.seed if cfg.ensemble_bootstrap else None)
        if state.is_main_process:  # what trained it, for a later --resume to check
            with open(os.path.join(member.output_dir, RUN_FILE), "w") as f:
                json.dump(run_record(member), f)
        gc.collect()  # one member's weights and optimiser state at a time
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    metrics = ensemble_metrics(cfg, names)
    save_ensemble(cfg, names, metrics)
    return metrics


def ensemble_metrics(cfg: Config, names: list[str]) -> dict[str, float]:
    """Each member's score statistics and held-out accuracy, and those of the members' mean.

    The mean is taken over scores normalised by each member's own statistics (as PPO/GRPO see them
    with --reward-aggregation mean); ``eval/member_std`` is the mean over held-out responses of the
    members' population std, the disagreement at the start.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=process_options(cfg)[0])  # the state the members made
    tokenizer = load_tokenizer(os.path.join(cfg.output_dir, names[0]), trust_remote_code=cfg.trust_remote_code)
    held_out = load_data(cfg, cfg.eval_data, "preference", tokenizer, accelerator.print) if cfg.eval_data else None
    collate = partial(collate_preference, pad_id=tokenizer.pad_token_id)
    metrics: dict[str, float] = {}
    chosen, rejected = [], []
    for name in names:
        model = load_sequence_classifier(os.path.join(cfg.output_dir, name), trust_remote_code=cfg.trust_remote_code,
                                         attn_implementation=cfg.attn_implementation)
        stats = get_score_stats(model)
        if stats:
            metrics.update({f"train/{name}/reward_mean": stats[0], f"train/{name}/reward_std": stats[1]})
        if held_out is None:
            continue
        c, r = score_all(accelerator, Critic(model).to(accelerator.device), held_out.examples, collate,
                         cfg.batch_size, tokenizer.pad_token_id)
        metrics.update({f"eval/{name}/accuracy": float((c > r).float().mean()),
                        f"eval/{name}/margin": float((c - r).mean())})
        mean, std = stats if stats else (0.0, 1.0)
        chosen.append((c.cpu() - mean) / max(std, 1e-6))
        rejected.append((r.cpu() - mean) / max(std, 1e-6))
        del model
    if held_out is not None:
        c, r = torch.stack(chosen, 1), torch.stack(rejected, 1)  # (N, K) each
        metrics.update({"eval/accuracy": float((c.mean(1) > r.mean(1)).float().mean()),
                        "eval/margin": float((c.mean(1) - r.mean(1)).mean()),
                        "eval/member_std": float(ensemble_std(torch.cat([c, r])).mean())})
    return metrics


def save_ensemble(cfg: Config, names: list[str], metrics: dict[str, float]) -> None:
    """The top of the ensemble directory: tokenizer, model card, then ``ensemble.json`` (atomically, last).

    --overwrite-output-dir removes here what an earlier run left at the top (a single model's
    files) and member directories beyond K.
    """
    state, out = PartialState(), cfg.output_dir
    state.wait_for_everyone()
    if state.is_main_process:
        if cfg.overwrite_output_dir:
            remove_old_run(out, keep=tuple(names))  # also an earlier ensemble's members beyond K
        manifest = {
            "format": "rlhf reward-model ensemble", "members": names, "aggregation": "mean", "run": run_record(cfg),
            "std": "population (divide by K)",
            "trained": {"by": f"rlhf rm --ensemble {cfg.ensemble}", "model": cfg.model, "data": cfg.data,
                        "seeds": [cfg.seed + i for i in range(len(names))],
                        "diversity": "seed and bootstrap resample" if cfg.ensemble_bootstrap else "seed",
                        "normalized_scores": cfg.normalize_scores},
            "metrics": metrics,
        }
        try:
            with staged(out, last=ENSEMBLE_FILE) as tmp:
                tokenizer = load_tokenizer(os.path.join(out, names[0]), trust_remote_code=cfg.trust_remote_code)
                tokenizer.save_pretrained(tmp)
                write_model_card(cfg, tmp, f"Reward-model ensemble ({len(names)} members)", metrics)
                with open(os.path.join(tmp, "README.md"), "a") as f:
                    f.write(f"\n## Members\n\n{', '.join(names)}: each a plain reward model, loadable with "
                            "`AutoModelForSequenceClassification.from_pretrained(DIR/member-i)`. `rlhf ppo` and "
                            "`rlhf grpo --reward-model DIR` score with all of them (see ensemble.json).\n")
                with open(os.path.join(tmp, ENSEMBLE_FILE), "w") as f:
                    json.dump(manifest, f, indent=1)
        except OSError as e:
            raise UserError(f"--output-dir {out}: cannot save the ensemble ({e.strerror or e}); its members are "
                            f"saved in {os.path.join(out, 'member-*')}; rerun with --resume to finish") from None
        print(f"Reward-model ensemble of {len(names)} saved in {out}" + (
            f": held-out accuracy of the mean {metrics['eval/accuracy']:.3f}" if "eval/accuracy" in metrics else ""))
    state.wait_for_everyone()
    remember(out, is_final=True)  # the run's model is the ensemble, not its last member
