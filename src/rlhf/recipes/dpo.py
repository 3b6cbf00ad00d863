"""Direct Preference Optimization and its variants, straight from preference pairs (seed 002 Part 6).

Loss types: ``sigmoid`` (DPO), ``ipo`` (on per-token mean log-probs, as TRL), ``hinge``, and
``--label-smoothing`` for cDPO. The reference is a frozen copy, or the LoRA base with adapters
disabled. Its log-probabilities are computed once before training in one pass and cached
beside the run (``ref_logps.safetensors``, keyed on a hash of the reference's weights and of
the tokenised pairs), or on the fly with ``--no-precompute-ref``. Chosen
and rejected go through one concatenated forward. Dropout is off in the policy (TRL's
``disable_dropout=True``), so at step 1 policy and reference agree exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import partial

import torch
from safetensors.torch import load_file, save_file

from rlhf.recipes.configs.dpo import Config
from rlhf.algos import dpo_loss
from rlhf.data import collate_preference, collate_preference_shared
from rlhf.models import Reference, disable_dropout, eval_mode, unwrap
from rlhf.training.loop import StepPlan, fit
from rlhf.training.setup import load_data, load_reference, load_policy, make_accelerator, make_optimizer, start
from rlhf.recipes.logprobs import all_pair_logps, choose_layout, count_pairs, pair_lengths, pair_logps
from rlhf.recipes.scoring import is_sharded
from rlhf.rollout import SamplingParams, make_rollout
from rlhf.training.saving import save_final
from rlhf.watch.samples import SampleLog




def reference_fingerprint(ref: Reference, examples: list[dict]) -> str:
    """What the reference log-probs depend on, hashed: the reference's weights (names, dtypes,
    shapes and bytes; a LoRA policy's base without its adapters), its config, and the token ids
    of every pair (so the data, tokenizer, chat template and length limits). Not the model's
    path: a model retrained into the same directory gets a new fingerprint, a moved one keeps it.

    Hashing reads each weight once (SHA-256, about a second per GB on CPU), far less than the
    reference pass it saves.
    """
    model = ref.model if ref.model is not None else ref.policy.get_base_model()
    h = hashlib.sha256(b"ref_logps v2")
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if "lora_" in name:  # the adapters are off in the reference
                continue
            h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
            h.update(t.detach().reshape(-1).view(torch.uint8).cpu().numpy())
    for e in examples:
        h.update(json.dumps([e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]]).encode())
    return h.hexdigest()[:32]


def cached_reference_logps(cfg: Config, accelerator, ref: Reference, examples, collate) -> torch.Tensor:
    """Reference log-probs from ``OUTPUT_DIR/ref_logps.safetensors`` if its fingerprint
    (:func:`reference_fingerprint`) matches, else computed and saved."""
    path = os.path.join(cfg.output_dir, "ref_logps.safetensors")
    key = reference_fingerprint(ref, examples)
    if os.path.exists(path):
        saved = load_file(path)
        if saved.get("fingerprint") is not None and bytes(saved["fingerprint"].tolist()).decode() == key:
            return saved["logps"]
    logps = all_pair_logps(accelerator, ref, examples, collate, cfg.batch_size)
    if accelerator.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        save_file({"logps": logps, "fingerprint": torch.tensor(list(key.encode()), dtype=torch.uint8)}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return logps


@torch.no_grad()
def write_samples(cfg: Config, accelerator, model, tokenizer, examples: list[dict], samples: SampleLog,
                  step: int) -> None:
    """The policy's greedy completions of ``examples``' prompts to samples.jsonl, for ``rlhf report``. Every
    process samples them (sharded weights make each forward a collective); the main one writes."""
    if not examples or not samples.due(step):
        return
    prompts = [e["prompt_ids"] for e in examples]
    room = cfg.max_length - max(len(p) for p in prompts)
    params = SamplingParams(temperature=0.0, max_new_tokens=max(1, min(cfg.sample_max_new_tokens, room)))
    rollout = make_rollout("loop", unwrap(model), tokenizer.pad_token_id, tokenizer.eos_token_id,
                           accelerator.device, sharded=is_sharded(accelerator))
    with eval_mode(model):
        batch = rollout.generate(prompts, params)
    ids = batch.response_ids.masked_fill(batch.response_mask == 0, tokenizer.pad_token_id)
    samples.write(step, tokenizer.batch_decode(prompts, skip_special_tokens=True),
                  tokenizer.batch_decode(ids, skip_special_tokens=True), None, batch.response_mask)


def run(cfg: Config) -> dict[str, float]:
    accelerator = make_accelerator(cfg)
    log = accelerator.print
    tokenizer, policy = load_policy(cfg)
    disable_dropout(policy)  # as TRL's DPOTrainer by default: the reference is scored without dropout too
    ref = load_reference(cfg, policy, tokenizer).to(accelerator.device)  # default: LoRA base / frozen copy

    # 1. Preference pairs, checked before training; each example remembers its index.
    train = load_data(cfg, cfg.data, "preference", tokenizer, log)
    held_out = load_data(cfg, cfg.eval_data, "preference", tokenizer, log) if cfg.eval_data else None
    for i, e in enumerate(train.examples):
        e["index"] = i
    with accelerator.autocast():  # the probe runs as the training forwards will: on the device, under autocast
        layout = choose_layout(policy.to(accelerator.device), cfg.share_prompt, "shared", log,
                               accelerator.mixed_precision != "no")
    collate = (partial(collate_preference_shared, pad_id=tokenizer.pad_token_id, row_tokens=max(256, cfg.max_length),
                       shared=layout == "shared")
               if layout else partial(collate_preference, pad_id=tokenizer.pad_token_id))

    # 2. Reference log-probs: once, in one pass, cached beside the run (held-out ones too).
    ref_logps = cached_reference_logps(cfg, accelerator, ref, train.examples, collate) if cfg.precompute_ref else None
    ref_eval = all_pair_logps(accelerator, ref, held_out.examples, collate, cfg.batch_size) if held_out else None
    if cfg.precompute_ref:
        ref = None  # no longer needed: free the frozen copy

    def collate_with_ref(examples):
        batch = collate(examples)
        if ref_logps is not None:
            batch["ref_logps"] = ref_logps[[e["index"] for e in examples]]  # (B, 2)
        return batch

    def loss_fn(model, batch):
        chosen, rejected = pair_logps(model, batch)
        if "ref_logps" in batch:
            ref_c, ref_r = batch["ref_logps"][:, 0], batch["ref_logps"][:, 1]
        else:
            with torch.no_grad():
                ref_c, ref_r = pair_logps(ref, batch)
        n_c, n_r = pair_lengths(batch)  # IPO averages over these
        loss, m = dpo_loss(chosen, rejected, ref_c, ref_r, cfg.beta, cfg.loss_type, cfg.label_smoothing,
                           chosen_lengths=n_c, rejected_lengths=n_r)
        return loss, {"rewards/chosen": m["rewards_chosen"], "rewards/rejected": m["rewards_rejected"],
                      "rewards/accuracies": m["accuracy"], "rewards/margins": m["margin"],
                      "logps/chosen": chosen.detach().mean(), "logps/rejected": rejected.detach().mean()}

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        with eval_mode(model):
            pol, n = all_pair_logps(accelerator, model, held_out.examples, collate, cfg.batch_size, with_lengths=True)
        _, m = dpo_loss(pol[:, 0], pol[:, 1], ref_eval[:, 0], ref_eval[:, 1], cfg.beta, cfg.loss_type,
                        cfg.label_smoothing, chosen_lengths=n[:, 0], rejected_lengths=n[:, 1])
        return {"eval/rewards/accuracies": float(m["accuracy"]), "eval/rewards/margins": float(m["margin"]),
                "eval/rewards/chosen": float(m["rewards_chosen"]), "eval/rewards/rejected": float(m["rewards_rejected"])}

    # 3. Optimise the DPO loss.
    plan = StepPlan(len(train), cfg.batch_size, cfg.grad_accum, cfg.seed)
    total = plan.total_steps(cfg.epochs, cfg.max_steps)
    optimizer, scheduler = make_optimizer(cfg, policy.parameters(), total)
    model, optimizer, state, checkpointer, logger = start(cfg, accelerator, policy, optimizer, scheduler, total,
                                                          {"train/loss": "loss", "rewards/margins": "margin"})
    # Samples for rlhf report: step 0 (before any update), each --eval-every step, the end.
    samples = SampleLog(cfg.output_dir, cfg.log_samples, cfg.eval_every or total, total, state.step,
                        accelerator.is_main_process)
    sample = partial(write_samples, cfg, accelerator, model, tokenizer,
                     (held_out or train).examples[: cfg.log_samples], samples)
    if state.step == 0:
        sample(0)

    def evaluate_and_sample() -> dict[str, float]:
        sample(state.step)
        return evaluate()

    metrics = fit(cfg=cfg, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
                  examples=train.examples, collate=collate_with_ref, count=count_pairs,
                  loss_fn=loss_fn, state=state, plan=plan, total_steps=total, logger=logger,
                  checkpointer=checkpointer, evaluate=evaluate_and_sample if held_out else None, where=train.where)

    # 4. Final evaluation, samples and the HF-format model.
    if held_out:
        metrics.update(evaluate())
        logger.log(state.step, {k: v for k, v in metrics.items() if k.startswith("eval/")})
    if not (held_out and cfg.eval_every and state.step % cfg.eval_every == 0):  # not written at this step already
        sample(state.step)
    logger.close()
    save_final(accelerator, model, tokenizer, cfg, f"DPO policy ({cfg.loss_type})", metrics, checkpointer)
    return metrics
