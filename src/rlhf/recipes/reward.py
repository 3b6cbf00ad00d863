"""Stage 2: a reward model trained on (prompt, chosen, rejected) with the Bradley-Terry loss.

The SFT model's LM head is replaced by a scalar head (seed 003, Phase 2) and trained on
``-log sigmoid(r(chosen) - r(rejected) - margin)``. After training it measures the mean and
std of its scores on the training data and stores them in its config, for whitening in PPO
(seed 003: reward calibration and normalisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from rlhf.algos import bradley_terry_loss
from rlhf.data import collate_preference
from rlhf.models import (
    Critic, gather_at, load_sequence_classifier, load_tokenizer, score_index, set_score_stats,
)
from rlhf.models.lora import set_gradient_checkpointing
from rlhf.recipes.common import (
    StepPlan, TrainConfig, check_positions, fit, load_data, make_accelerator, make_optimizer, save_final, shard, start,
    to_device, with_lora,
)


@dataclass
class Config(TrainConfig):
    """Reward-model options."""

    lr: float = 1e-5
    """Peak learning rate of AdamW."""
    normalize_scores: bool = True
    """Store the mean and std of the trained model's scores on the training data in its config."""


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
    """Chosen and rejected scores of every example (gathered from all processes)."""
    scorer.eval()
    mine = shard(list(range(len(examples))), accelerator.process_index, accelerator.num_processes)
    chosen, rejected = [], []
    for i in range(0, len(mine), batch_size):
        batch = to_device(collate([examples[j] for j in mine[i : i + batch_size]]), accelerator.device)
        c, r = pair_scores(scorer, batch, pad_token_id)
        chosen.append(c.float())
        rejected.append(r.float())
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    if accelerator.num_processes > 1:
        chosen, rejected = accelerator.gather_for_metrics(chosen), accelerator.gather_for_metrics(rejected)
    return chosen, rejected


def evaluate(accelerator, scorer, examples, collate, batch_size, pad_token_id) -> dict[str, float]:
    chosen, rejected = score_all(accelerator, scorer, examples, collate, batch_size, pad_token_id)
    both = torch.cat([chosen, rejected])
    return {"eval/accuracy": float((chosen > rejected).float().mean()),
            "eval/margin": float((chosen - rejected).mean()),
            "eval/reward_mean": float(both.mean()), "eval/reward_std": float(both.std())}


def run(cfg: Config) -> dict[str, float]:
    accelerator = make_accelerator(cfg)
    log = accelerator.print
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    classifier = load_sequence_classifier(cfg.model, trust_remote_code=cfg.trust_remote_code,
                                          attn_implementation=cfg.attn_implementation)
    classifier.config.pad_token_id = tokenizer.pad_token_id
    check_positions(classifier, cfg.max_length, "--max-length", f"--model {cfg.model}")
    if cfg.lora:
        classifier = with_lora(cfg, classifier, task_type="SEQ_CLS")
    set_gradient_checkpointing(classifier, cfg.gradient_checkpointing)
    scorer = Critic(classifier)  # the scalar head read at every token; we take transformers' one

    # 1. Preference pairs, checked before training.
    train = load_data(cfg, cfg.data, "preference", tokenizer, log)
    held_out = load_data(cfg, cfg.eval_data, "preference", tokenizer, log) if cfg.eval_data else None
    collate = partial(collate_preference, pad_id=tokenizer.pad_token_id)

    # 2. Optimiser, schedule, checkpoints.
    plan = StepPlan(len(train), cfg.batch_size, cfg.grad_accum, cfg.seed)
    total = plan.total_steps(cfg.epochs, cfg.max_steps)
    optimizer, scheduler = make_optimizer(cfg, scorer.parameters(), total)
    scorer, optimizer, state, checkpointer, logger = start(cfg, accelerator, scorer, optimizer, scheduler, total,
                                                           {"train/loss": "loss", "train/accuracy": "acc"})
    pad_id = tokenizer.pad_token_id
    eval_fn = ((lambda: evaluate(accelerator, scorer, held_out.examples, collate, cfg.batch_size, pad_id))
               if held_out else None)

    # 3. Bradley-Terry: push r(chosen) above r(rejected).
    metrics = fit(cfg=cfg, accelerator=accelerator, model=scorer, optimizer=optimizer, scheduler=scheduler,
                  examples=train.examples, collate=collate, count=lambda b: b["input_ids"].shape[0] // 2,
                  loss_fn=partial(loss_fn, pad_token_id=pad_id), state=state, plan=plan, total_steps=total,
                  logger=logger, checkpointer=checkpointer, evaluate=eval_fn, where=train.where)

    # 4. Held-out accuracy, then score statistics for PPO's normalisation.
    if eval_fn:
        metrics.update(eval_fn())
    chosen, rejected = score_all(accelerator, scorer, train.examples, collate, cfg.batch_size, pad_id)
    both = torch.cat([chosen, rejected])
    metrics.update({"train/reward_mean": float(both.mean()), "train/reward_std": float(both.std())})
    logger.log(state.step, {k: v for k, v in metrics.items() if k.startswith(("eval/", "train/reward_"))})
    logger.close()
    model = accelerator.unwrap_model(scorer).model
    if cfg.normalize_scores:
        set_score_stats(model.get_base_model() if hasattr(model, "get_base_model") else model,
                        metrics["train/reward_mean"], metrics["train/reward_std"])
    save_final(accelerator, model, tokenizer, cfg, "Reward model", metrics, checkpointer)
    return metrics
