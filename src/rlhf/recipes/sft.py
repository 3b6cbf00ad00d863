"""Stage 1: supervised fine-tuning on (prompt, ideal response) pairs.

The loss is next-token cross-entropy on the response tokens (seed 003, Phase 1), every
assistant turn of a ``messages`` conversation (TRL's ``assistant_only_loss``); LoRA is the
memory-saving option. Run it as ``rlhf sft --model DIR --data sft.jsonl --output-dir OUT``,
or under ``accelerate launch`` for DDP, FSDP or DeepSpeed.
"""

from __future__ import annotations

from functools import partial

import torch

from rlhf.recipes.configs.sft import Config
from rlhf.algos import head_token_stats, sft_loss
from rlhf.data import collate_packed, collate_sft
from rlhf.models import packed_logits
from rlhf.training.loop import StepPlan, fit, pass_batches, to_device
from rlhf.training.setup import load_data, load_policy, make_accelerator, make_optimizer, start
from rlhf.recipes.logprobs import choose_layout
from rlhf.training.saving import save_final




def count_tokens(batch: dict) -> int:
    """Labelled tokens of a batch: what the loss averages over."""
    return int((batch["labels"][:, 1:] != -100).sum())


def loss_fn(model, batch: dict):
    """Mean cross-entropy of the labelled tokens, and the token accuracy. Where the batch's logits
    would exceed one chunk of :func:`rlhf.algos.head_token_stats` (a real vocabulary), the LM head
    runs over chunks of the labelled positions only, recomputed in the backward pass: the whole
    ``(B, T, V)`` logits are never held (equal to :func:`rlhf.algos.sft_loss` on them to float32
    rounding, ``tests/test_recipes_sft_rm.py``). Not under FSDP, whose LM head exists whole only
    inside the model's forward (:func:`rlhf.models.lm_head`): there the whole logits are used."""
    from rlhf.algos.tokens import _CHUNK_ELEMENTS
    from rlhf.models import causal_hidden
    from rlhf.models.packing import _text_config

    labels, packed = batch["labels"], "segment_ids" in batch
    split = None
    if labels.numel() * (getattr(_text_config(model), "vocab_size", 0) or 0) > _CHUNK_ELEMENTS:
        split = (packed_logits(model, batch, hidden=True) if packed
                 else causal_hidden(model, batch["input_ids"], batch["attention_mask"]))
    if split is None:
        if packed:  # the layout's mask (rlhf.models.packing)
            logits = packed_logits(model, batch)  # (1, L, V)
        else:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        loss, m = sft_loss(logits, labels)
        return loss, {"train/token_accuracy": m["accuracy"]}
    hidden, head = split
    labels = labels[:, 1:]  # hidden[:, t] predicts labels[:, t + 1]
    keep = labels != -100
    stats = head_token_stats(hidden[:, :-1][keep], head, labels[keep], correct=True)
    n = keep.sum().clamp(min=1)
    return -stats["logprobs"].sum() / n, {"train/token_accuracy": stats["correct"].float().sum() / n}


@torch.no_grad()
def evaluate(accelerator, model, examples: list[dict], collate, batch_size: int) -> dict[str, float]:
    """Token-weighted held-out loss and accuracy, reduced over processes."""
    model.eval()
    totals = torch.zeros(3, device=accelerator.device)  # nll sum, correct, tokens
    for idx, k in pass_batches(len(examples), accelerator.process_index, accelerator.num_processes, batch_size):
        batch = to_device(collate([examples[j] for j in idx]), accelerator.device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       position_ids=batch.get("position_ids"), use_cache=False).logits
        if k:  # the first k rows count; the rest pad this process's last batch
            nll_sum, m = sft_loss(logits[:k], batch["labels"][:k], num_tokens=1.0)
            totals += torch.stack([nll_sum.float(), m["accuracy"] * m["num_tokens"], m["num_tokens"]])
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    n = totals[2].clamp(min=1)
    return {"eval/loss": float(totals[0] / n), "eval/token_accuracy": float(totals[1] / n)}


def run(cfg: Config) -> dict[str, float]:
    accelerator = make_accelerator(cfg)
    log = accelerator.print
    tokenizer, model = load_policy(cfg)

    # 1. Data: every record checked and tokenised before the first step.
    train = load_data(cfg, cfg.data, "sft", tokenizer, log)
    held_out = load_data(cfg, cfg.eval_data, "sft", tokenizer, log) if cfg.eval_data else None
    if not cfg.completion_only_loss:
        for e in train.examples:
            e["labels"] = list(e["input_ids"])

    # 2. Optimiser, schedule, checkpoints (resume restores all of it).
    plan = StepPlan(len(train), cfg.batch_size, cfg.grad_accum, cfg.seed)
    total = plan.total_steps(cfg.epochs, cfg.max_steps)
    optimizer, scheduler = make_optimizer(cfg, model.parameters(), total)
    model, optimizer, state, checkpointer, logger = start(cfg, accelerator, model, optimizer, scheduler, total,
                                                          {"train/loss": "loss"})
    # Padding-free only where a probe on the prepared model (its device, its autocast) agrees.
    packed = choose_layout(model, cfg.packing, "packed", log, accelerator.mixed_precision != "no")
    collate = partial(collate_packed if packed else collate_sft, pad_id=tokenizer.pad_token_id)
    eval_fn = (lambda: evaluate(accelerator, model, held_out.examples, partial(collate_sft, pad_id=tokenizer.pad_token_id),
                                cfg.batch_size)) if held_out else None

    # 3. Cross-entropy on the response tokens, step after step.
    metrics = fit(cfg=cfg, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
                  examples=train.examples, collate=collate, count=count_tokens, loss_fn=loss_fn, state=state,
                  plan=plan, total_steps=total, logger=logger, checkpointer=checkpointer, evaluate=eval_fn,
                  where=train.where)

    # 4. Final evaluation and the HF-format model.
    if eval_fn:
        metrics.update(eval_fn())
        logger.log(state.step, {k: v for k, v in metrics.items() if k.startswith("eval/")})
    logger.close()
    save_final(accelerator, model, tokenizer, cfg, "SFT model", metrics, checkpointer)
    return metrics
