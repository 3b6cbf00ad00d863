"""Scoring responses for RL: a frozen reward model, Python reward functions (:mod:`rlhf.recipes.rewards`),
or both; and the rollout and scoring step the online recipes (PPO, GRPO) share (their options are
:mod:`rlhf.recipes.configs.rl`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from rlhf.algos import AGGREGATIONS, aggregate_scores, ensemble_std, tied_groups
from rlhf.models import (
    ModelLoadError, freeze, get_score_stats, is_ensemble, load_reward_models, load_tokenizer, member_scores,
    read_ensemble, sequence_scores,
)
from rlhf.errors import UserError
from rlhf.recipes.rewards import RewardFn, call_reward_fn, in_prompt_form, load_reward_fns, reward_value
from rlhf.recipes.configs.rl import RLConfig
from rlhf.training.loop import StepTimer, reduce_sum, shard
from rlhf.training.setup import max_positions
from rlhf.rollout import RolloutBatch, SamplingParams, concat_batches


@dataclass
class Scorer:
    """Turns a rollout into one score per sequence (seed 002 Part 5: the reward model's r).

    ``normalize`` whitens reward-model scores with the mean and std stored in the model's
    config by ``rlhf rm``; ``clip`` bounds the total; ``missing_eos_penalty`` is subtracted
    from responses that never stopped.

    ``reward_model`` may be a list of K ensemble members (``rlhf rm --ensemble K``): each scores
    every sequence and is whitened with its own statistics, giving a (B, K) matrix that
    :func:`rlhf.algos.aggregate_scores` turns into one score by ``aggregation`` (``mean``,
    ``mean_minus_std`` with ``uncertainty_coef`` as lambda, ``min``). The matrix of the last call
    is kept in ``last_member_scores`` for the over-optimisation monitor (``None`` with one model), and each
    reward function's values of the last call (NaN where it returned None) in ``last_fn_scores``, for
    :func:`reward_fn_metrics`.
    """

    reward_model: torch.nn.Module | list[torch.nn.Module] | None = None
    reward_fns: list[RewardFn] = field(default_factory=list)
    normalize: bool = True
    clip: float | None = None
    missing_eos_penalty: float | None = None
    aggregation: str = "mean"
    uncertainty_coef: float = 1.0

    def __post_init__(self):
        if isinstance(self.reward_model, (list, tuple)):
            self.members = list(self.reward_model)
            self.reward_model = self.members[0] if len(self.members) == 1 else self.members
        else:
            self.members = [] if self.reward_model is None else [self.reward_model]
        if self.reward_model is None and not self.reward_fns:
            raise UserError("give a reward: --reward-model DIR and/or --reward-fn module:function")
        if self.aggregation not in AGGREGATIONS:
            raise UserError(f"--reward-aggregation {self.aggregation}: valid: {', '.join(AGGREGATIONS)}")
        member_stats = [get_score_stats(m) for m in self.members] if self.normalize else []
        if any(member_stats) and not all(member_stats):
            raise UserError("--reward-model: some ensemble members store score statistics and some do not, so their "
                            "scores cannot be whitened alike; pass --no-normalize-reward or retrain with rlhf rm")
        self.member_stats = member_stats if all(member_stats) else []
        if len(self.members) > 1 and not self.member_stats and self.aggregation != "mean":
            raise UserError(f"--reward-aggregation {self.aggregation} on raw scores: the Bradley-Terry loss fixes no "
                            "member's offset or scale, so their spread is no disagreement; keep --normalize-reward "
                            "(the statistics rlhf rm stores) or use mean")
        self.stats = self.member_stats[0] if len(self.members) == 1 and self.member_stats else None
        self.last_member_scores: torch.Tensor | None = None
        self.last_fn_scores: dict[str, torch.Tensor] = {}  # name -> (B,)

    @torch.no_grad()
    def __call__(self, batch: RolloutBatch, prompts: list, completions: list[str], extras: dict[str, list],
                 where: list[str] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """One score per completion. A reward function's value that is not a finite number is
        a :class:`UserError` naming the function, the value and the completion's prompt
        (``where[i]``, its ``file:line``)."""
        device = batch.response_ids.device
        scores = torch.zeros(batch.response_ids.shape[0], device=device)
        metrics: dict[str, float] = {}
        if len(self.members) > 1:
            rm = self.ensemble_scores(batch, metrics)
            scores += rm
        elif self.reward_model is not None:
            rm = sequence_scores(self.reward_model, batch.input_ids, batch.attention_mask).float()
            if self.stats:
                rm = (rm - self.stats[0]) / max(self.stats[1], 1e-6)
            metrics["objective/rm_score"] = float(rm.mean())
            scores += rm
        ids = [row[m.bool()].tolist() for row, m in zip(batch.response_ids, batch.loss_mask)]
        applies = torch.zeros_like(scores, dtype=torch.bool) if self.reward_fns and self.reward_model is None else None
        self.last_fn_scores = {}
        for r in self.reward_fns:
            values = call_reward_fn(r, prompts, completions, extras, where, ids)
            if not hasattr(values, "__len__") or isinstance(values, (str, bytes, dict)):
                raise UserError(f"reward function {r.name} returned {type(values).__name__}; expected a list of "
                                f"{len(completions)} numbers, one per completion")
            if len(values) != len(completions):
                raise UserError(f"reward function {r.name} returned {len(values)} values for {len(completions)} completions")
            values = torch.tensor([reward_value(r.name, v, i, where) for i, v in enumerate(values)], device=device)
            self.last_fn_scores[r.name] = values
            if applies is not None:
                applies |= ~values.isnan()
            scores += r.weight * values.nan_to_num(0.0)  # None: left out of the sum (TRL's nansum)
        if applies is not None and not applies.all():  # no function applies: unscorable (NaN), as in TRL
            scores = scores.masked_fill(~applies, math.nan)
        if self.clip is not None:
            scores = scores.clamp(-self.clip, self.clip)
        if self.missing_eos_penalty is not None:
            scores = scores - self.missing_eos_penalty * (~batch.finished).float()
        return scores, metrics

    def ensemble_scores(self, batch: RolloutBatch, metrics: dict[str, float]) -> torch.Tensor:
        """The members' aggregated score, and in ``metrics`` ``objective/rm_score`` (aggregated),
        ``objective/rm_score_mean`` (the members' mean) and ``objective/rm_std`` (their disagreement:
        the mean over sequences of the population std across members).

        Shape:
            -> (B,); ``self.last_member_scores``: (B, K).
        """
        scores = member_scores(self.members, batch.input_ids, batch.attention_mask)  # (B, K)
        if self.member_stats:
            mean = scores.new_tensor([m for m, _ in self.member_stats])
            std = scores.new_tensor([max(s, 1e-6) for _, s in self.member_stats])
            scores = (scores - mean) / std  # each member with its own statistics
        self.last_member_scores = scores
        aggregated = aggregate_scores(scores, self.aggregation, self.uncertainty_coef)  # (B,)
        metrics.update({"objective/rm_score": float(aggregated.mean()),
                        "objective/rm_score_mean": float(scores.mean()),
                        "objective/rm_std": float(ensemble_std(scores).mean())})
        return aggregated




def reward_fn_metrics(accelerator, fn_scores: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each reward function's mean and std over the whole batch, every process's rows: TRL's
    ``rewards/NAME/mean`` and ``rewards/NAME/std`` (and ``rewards/NAME``, the mean, as before). A None (NaN) is
    left out, as TRL's nanmean and nanstd leave it; the std has Bessel's correction, as TRL's. A function that
    applied to no completion logs nothing, and its std needs two values.

    Shape:
        fn_scores: name -> (B,), this process's rows (the same names on every process).
    """
    if not fn_scores:
        return {}
    names = list(fn_scores)
    values = torch.stack([fn_scores[n].float() for n in names])  # (F, B)
    seen = ~values.isnan()
    sums = reduce_sum(accelerator, torch.cat([values.nan_to_num(0.0).sum(1), seen.sum(1).float()]))
    count = sums[len(names):]
    mean = sums[: len(names)] / count.clamp(min=1)  # (F,)
    deviations = torch.where(seen, values - mean[:, None].to(values.device), torch.zeros_like(values))
    squares = reduce_sum(accelerator, (deviations ** 2).sum(1))
    out: dict[str, float] = {}
    for i, name in enumerate(names):
        if count[i] >= 1:
            out[f"rewards/{name}/mean"] = out[f"rewards/{name}"] = float(mean[i])
        if count[i] >= 2:
            out[f"rewards/{name}/std"] = float((squares[i] / (count[i] - 1)).sqrt())
    return out


def sampling_params(cfg: RLConfig, num_samples: int = 1) -> SamplingParams:
    """The rollout's sampling settings from the run's options."""
    return SamplingParams(cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_new_tokens, num_samples)


def make_scorer(cfg: RLConfig, tokenizer, device) -> Scorer:
    """The frozen reward model(s) (if any) and reward functions, as one :class:`Scorer`."""
    reward_models, aggregation = None, cfg.reward_aggregation or "mean"
    if cfg.reward_model:
        try:
            if load_tokenizer(cfg.reward_model).get_vocab() != tokenizer.get_vocab():
                raise UserError(f"--reward-model {cfg.reward_model}: its tokenizer differs from the policy's; "
                                "the reward model must share the policy's tokenizer")
            if is_ensemble(cfg.reward_model) and cfg.reward_aggregation is None:
                aggregation = read_ensemble(cfg.reward_model).get("aggregation", "mean")
            reward_models = load_reward_models(cfg.reward_model, attn_implementation=cfg.attn_implementation)
        except ModelLoadError as e:
            raise UserError(f"--reward-model {e}") from None
        reward_models = [freeze(m).to(device) for m in reward_models]
    return Scorer(reward_models, load_reward_fns(cfg.reward_fn), cfg.normalize_reward, cfg.score_clip,
                  cfg.missing_eos_penalty, aggregation, cfg.reward_uncertainty_coef)


def check_prompt_positions(cfg: RLConfig, policy, prompts) -> None:
    """Refuse at start-up a prompt plus --max-new-tokens beyond the policy's positions, naming
    the longest prompt's ``file:line`` (sampling would fail there mid-run, or run past what the
    model was trained on)."""
    limit = max_positions(policy)
    if limit is None or not prompts.examples:
        return
    longest = max(range(len(prompts.examples)), key=lambda i: len(prompts.examples[i]["prompt_ids"]))
    n = len(prompts.examples[longest]["prompt_ids"])
    if n + cfg.max_new_tokens > limit[0]:
        raise UserError(f"--max-new-tokens {cfg.max_new_tokens} after the longest prompt ({n} tokens, "
                        f"{prompts.where[longest]}) needs {n + cfg.max_new_tokens} positions, beyond the {limit[0]} "
                        f"positions of --model {cfg.model} ({limit[1]} in its config); lower --max-new-tokens or "
                        "--max-prompt-length")


def build_rollout(cfg: RLConfig, policy, tokenizer, accelerator):
    """The sampler named by ``--rollout-engine`` (:func:`rlhf.rollout.make_rollout`) over ``policy``."""
    from rlhf.rollout import make_rollout

    try:
        return make_rollout(cfg.rollout_engine, policy, tokenizer.pad_token_id, tokenizer.eos_token_id,
                            accelerator.device, sharded=is_sharded(accelerator))
    except ValueError as e:
        raise UserError(str(e)) from None


def is_sharded(accelerator) -> bool:
    """Whether the policy's weights are split across processes (FSDP, DeepSpeed): no whole-model engine copy."""
    return accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")


_NOT_EXTRA = ("prompt", "prompt_ids", "prompt_truncated", "response_truncated", "_where")


def generate_and_score(rollout, examples: list[dict], params: SamplingParams, tokenizer, scorer: Scorer, device,
                       timer: StepTimer):
    """Sample ``params.num_samples`` responses per prompt and score them.

    Returns ``(batch, completions, scores, metrics)`` with ``completions`` as text; the reward
    functions receive each prompt, its completion in the prompt's form (:func:`in_prompt_form`)
    and the prompt's extra dataset columns, repeated per sample.
    ``metrics`` holds the scorer's; ``timer`` gets the laps ``time/generate`` and ``time/score``.
    """
    batch = rollout.generate([e["prompt_ids"] for e in examples], params).to(device)
    timer.lap("time/generate")
    ids = batch.response_ids.masked_fill(batch.response_mask == 0, tokenizer.pad_token_id)
    completions = tokenizer.batch_decode(ids, skip_special_tokens=True)
    repeated = [e for e in examples for _ in range(params.num_samples)]
    extras = {k: [e[k] for e in repeated] for k in examples[0] if k not in _NOT_EXTRA}
    prompts = [e["prompt"] for e in repeated]
    scores, metrics = scorer(batch, prompts, [in_prompt_form(p, c) for p, c in zip(prompts, completions)], extras,
                             [e.get("_where") for e in repeated])
    timer.lap("time/score")
    return batch, completions, scores, metrics


def sample_groups(accelerator, rollout, prompts, indices: list[int], sampling: SamplingParams, tokenizer,
                  scorer: Scorer, timer, *, dynamic_rounds: int = 0, seed: int = 0) -> tuple:
    """This process's share of a step's prompts (``indices``), ``sampling.num_samples`` (G) samples of each
    and their scores.

    With ``dynamic_rounds`` > 0, DAPO's dynamic sampling (Yu et al. 2025, section 3.2): the groups whose
    scores all tie are dropped (their group advantages are 0) and more prompts, drawn by a generator
    seeded with ``seed`` (the step's, so a resumed run draws the same), are sampled in rounds until every
    process has as many untied groups as it had prompts, or ``dynamic_rounds`` rounds are done. Every
    process then keeps the same number of groups (the update's collectives need it): the fewest untied
    groups any process has, and at least one, a process without one keeping a tied group. Counts go to
    ``score_metrics`` as ``dynamic_sampling/*``: ``rounds``, ``tied_groups`` (seen and dropped),
    ``kept_groups`` (untied, trained on), ``kept_tied_groups`` and ``missing_groups`` (short of the
    step's prompts).

    Returns:
        ``(batch, completions, scores, score_metrics, examples, member_scores)``.
    """
    rank, world, G = accelerator.process_index, accelerator.num_processes, sampling.num_samples
    examples = [prompts.examples[i] for i in shard(indices, rank, world)]
    batch, completions, scores, score_metrics = generate_and_score(rollout, examples, sampling, tokenizer, scorer,
                                                                   accelerator.device, timer)
    if not dynamic_rounds:
        return batch, completions, scores, score_metrics, examples, scorer.last_member_scores
    want = len(examples)
    rounds = [(batch, completions, scores, examples, scorer.last_member_scores, scorer.last_fn_scores)]
    untied = ~tied_groups(scores, G).cpu()
    extra = torch.Generator().manual_seed(seed)
    while len(rounds) < dynamic_rounds:
        if float(reduce_sum(accelerator, torch.tensor(float(max(0, want - int(untied.sum())))))) == 0:
            break
        drawn = torch.randint(len(prompts.examples), (len(indices),), generator=extra).tolist()
        more = [prompts.examples[i] for i in shard(drawn, rank, world)]
        b, c, sc, _ = generate_and_score(rollout, more, sampling, tokenizer, scorer, accelerator.device, timer)
        rounds.append((b, c, sc, more, scorer.last_member_scores, scorer.last_fn_scores))
        untied = torch.cat([untied, ~tied_groups(sc, G).cpu()])
    n_keep = min(want, int(untied.sum()))
    if world > 1:
        import torch.distributed as dist

        keep = torch.tensor(float(n_keep), device=accelerator.device)
        dist.all_reduce(keep, op=dist.ReduceOp.MIN)
        n_keep = int(keep)
    n_keep = max(n_keep, 1)
    order = torch.cat([untied.nonzero().flatten(), (~untied).nonzero().flatten()])  # untied groups first
    groups = order[:n_keep]
    n_untied = int(untied[groups].sum())
    rows = (groups[:, None] * G + torch.arange(G)).flatten()
    batch = concat_batches([r[0] for r in rounds], tokenizer.pad_token_id).rows(rows.to(batch.finished.device))
    completions = [c for r in rounds for c in r[1]]
    completions = [completions[i] for i in rows.tolist()]
    scores = torch.cat([r[2] for r in rounds])[rows.to(scores.device)]
    all_examples = [e for r in rounds for e in r[3]]
    members = None if rounds[0][4] is None else torch.cat([r[4] for r in rounds])[rows.to(rounds[0][4].device)]
    scorer.last_fn_scores = {name: torch.cat([r[5][name] for r in rounds])[rows.to(scores.device)]
                             for name in rounds[0][5]}  # the kept rows' (reward_fn_metrics)
    counts = reduce_sum(accelerator, torch.tensor([float(len(untied) - int(untied.sum())), float(n_untied),
                                                   float(n_keep - n_untied), float(want - n_untied)]))
    score_metrics.update({"dynamic_sampling/rounds": float(len(rounds)), "dynamic_sampling/tied_groups": float(counts[0]),
                          "dynamic_sampling/kept_groups": float(counts[1]),
                          "dynamic_sampling/kept_tied_groups": float(counts[2]),
                          "dynamic_sampling/missing_groups": float(counts[3])})
    return batch, completions, scores, score_metrics, [all_examples[i] for i in groups.tolist()], members
