"""The over-optimisation monitor of the online recipes (PPO, GRPO/RLOO), issue 15.

Each step it measures the rollout batch with :mod:`rlhf.algos.monitor` and returns the signals
as ``monitor/...`` metrics; the first batch it sees (the SFT model's own samples, drawn before any
update and logged at step 1) is its baseline, kept in the checkpoint's training state so a resumed
run compares with the same start. When a signal crosses its threshold (``--monitor-*``) the run
says so in one line, once per signal, and at the end one line sums up the warnings. It needs no
gold labeller; it reads only the samples, their scores and the KL, and with a reward-model ensemble
(``rlhf rm --ensemble K``) the members' scores: their disagreement, ``monitor/rm_disagreement``, is
the mean over samples of the population std across members of the *normalised* scores (each member
whitened by its own statistics, the scores the aggregation sees). Normalised, because the
Bradley-Terry loss fixes neither a member's offset nor its scale: raw scores of members trained
with other seeds differ by a constant that is no disagreement about any sample.

A signal is logged only at the steps where it is defined: ``monitor/reward_length_corr`` needs lengths
that vary and scores that vary, over at least 3 responses. The first step without it says so in one
line (not a warning), once a run.

The signals are this process's rows (the main process logs them), not a gather over processes.
"""

from __future__ import annotations

import torch

from rlhf.algos import (
    distinct_n, ensemble_std, kl_reward_fraction, relative_drift, repetition_fraction, reward_length,
)

# Signals compared with their step-0 values: metric name -> key of the baseline.
DRIFTS = {"monitor/distinct2_across_vs_start": "monitor/distinct2_across",
          "monitor/distinct2_within_vs_start": "monitor/distinct2_within",
          "monitor/length_vs_start": "monitor/length_mean"}
# Signals measured only with a reward-model ensemble, compared with their step-0 values alike.
ENSEMBLE_DRIFTS = {"monitor/rm_disagreement_vs_start": "monitor/rm_disagreement"}


class Monitor:
    """Over-optimisation signals of each rollout batch, their step-0 baseline, and threshold warnings.

    ``extra`` is the run's ``TrainState.extra`` (registered for checkpointing): the baseline and
    the warnings already given live there, so they survive ``--resume``.
    """

    def __init__(self, cfg, extra: dict):
        self.state = extra.setdefault("monitor", {"baseline": {}, "baseline_step": None, "warned": {}})
        self.state.setdefault("unmeasured", {})  # signal -> the first step it was undefined (said once)
        self.why_unmeasured: dict[str, str] = {}  # this step's undefined signals -> why
        # metric -> (flag, threshold, crossed(value, threshold), what it means)
        self.rules = [
            ("monitor/distinct2_across_vs_start", "--monitor-distinct-drop", cfg.monitor_distinct_drop,
             lambda v, t: v <= -t, "distinct-2 across responses fell {pct} since step 0 (the samples look alike)"),
            ("monitor/length_vs_start", "--monitor-length-growth", cfg.monitor_length_growth,
             lambda v, t: v >= t, "mean response length grew {pct} since step 0"),
            ("monitor/reward_length_corr", "--monitor-reward-length-corr", cfg.monitor_reward_length_corr,
             lambda v, t: abs(v) >= t, "the score follows the response length (Pearson r = {value})"),
            ("monitor/kl_reward_fraction", "--monitor-kl-fraction", cfg.monitor_kl_fraction,
             lambda v, t: v >= t, "the KL penalty gives back {pct} of the mean |score|"),
            ("monitor/rm_disagreement_vs_start", "--monitor-disagreement-growth",
             getattr(cfg, "monitor_disagreement_growth", None), lambda v, t: v >= t,
             ("the reward models disagree {pct} more than at step 0 (the policy may exploit what some of them "
              "reward and others do not)")),
        ]

    def measure(self, step: int, response_ids: torch.Tensor, response_mask: torch.Tensor, scores: torch.Tensor,
                kl: torch.Tensor | None = None, kl_coef: float = 0.0, member_scores: torch.Tensor | None = None
                ) -> dict[str, float]:
        """The signals of one rollout batch (``kl``: per-token KL of the penalty, if any, and its coefficient;
        ``member_scores``: a reward-model ensemble's normalised scores, ``Scorer.last_member_scores``).

        Shape:
            response_ids, response_mask, kl: (B, T); scores: (B,) (before any KL penalty); member_scores: (B, K).
        """
        # One copy to the CPU: n-gram counting is a loop over rows.
        response_ids, response_mask, scores = response_ids.cpu(), response_mask.cpu(), scores.cpu()
        within, across = distinct_n(response_ids, response_mask, n=2)
        corr, mean_length = reward_length(scores, response_mask)
        signals = {"monitor/distinct2_within": float(within), "monitor/distinct2_across": float(across),
                   "monitor/repeat3_fraction": float(repetition_fraction(response_ids, response_mask, n=3)),
                   "monitor/length_mean": float(mean_length)}
        self.why_unmeasured = {}
        if torch.isfinite(corr):
            signals["monitor/reward_length_corr"] = float(corr)
        else:
            self.why_unmeasured["monitor/reward_length_corr"] = _no_correlation(scores, response_mask)
        if kl is not None:
            fraction, penalty = kl_reward_fraction(scores, kl.cpu(), response_mask, kl_coef)
            signals.update({"monitor/kl_penalty": float(penalty), "monitor/kl_reward_fraction": float(fraction)})
        if member_scores is not None and member_scores.shape[1] > 1:
            signals["monitor/rm_disagreement"] = float(ensemble_std(member_scores.cpu()).mean())
        if not self.state["baseline"]:
            self.state["baseline"] = {key: signals[key] for key in DRIFTS.values()}
            self.state["baseline_step"] = step
        for name, key in ENSEMBLE_DRIFTS.items():
            if key in signals:  # the first batch with an ensemble's scores is its baseline
                self.state["baseline"].setdefault(key, signals[key])
        for name, key in {**DRIFTS, **ENSEMBLE_DRIFTS}.items():
            if key in signals:
                signals[name] = relative_drift(signals[key], self.state["baseline"][key])
        return signals

    def warn(self, step: int, signals: dict[str, float], logger) -> None:
        """One line for each signal that crosses its threshold for the first time in the run, and one (not a
        warning) for each signal that could not be measured at this step, the first time in the run."""
        for name, why in self.why_unmeasured.items():
            if name not in self.state["unmeasured"]:
                self.state["unmeasured"][name] = step
                logger.event(step, f"over-optimisation monitor: {name} is not measured at step {step}: {why}; it is "
                                   "logged at the steps where the lengths and the scores both vary")
        for name, flag, threshold, crossed, meaning in self.rules:
            if threshold is None or name not in signals or name in self.state["warned"]:
                continue
            value = signals[name]
            if crossed(value, threshold):
                self.state["warned"][name] = step
                what = meaning.format(pct=f"{abs(value):.0%}", value=f"{value:.2f}")
                logger.event(step, f"warning: over-optimisation monitor: {name} = {value:.4g} crossed "
                                   f"{flag} {threshold:g} at step {step}: {what}",
                             signal=name, value=value, threshold=threshold)

    def summary(self, step: int, logger) -> None:
        """One line at the end of the run: the warnings given, each with its first step."""
        warned, start = self.state["warned"], self.state["baseline_step"]
        fields = {"monitor_warnings": dict(warned), "monitor_baseline_step": start}
        if not warned:
            logger.event(step, "over-optimisation monitor: no warnings", **fields)
            return
        listed = ", ".join(f"{name} (first at step {s})" for name, s in sorted(warned.items(), key=lambda x: x[1]))
        logger.event(step, f"over-optimisation monitor: {len(warned)} warning(s): {listed}", **fields)

    def add_rule(self, name: str, flag: str, threshold: float | None, crossed, meaning: str) -> None:
        """One more signal for :meth:`warn`, read like the built-in ones: a signal a recipe measures
        itself, such as the implicit preference accuracy on --eval-data (:mod:`rlhf.watch.stopping`)."""
        self.rules.append((name, flag, threshold, crossed, meaning))


def _no_correlation(scores: torch.Tensor, response_mask: torch.Tensor) -> str:
    """Why the score-length correlation of a batch is undefined (:func:`rlhf.algos.reward_length`)."""
    lengths = response_mask.sum(1)
    if len(lengths) < 3:
        return f"{len(lengths)} responses, fewer than 3"
    if bool((lengths == lengths[0]).all()):
        return f"every response has {int(lengths[0])} tokens"
    return f"every response has the score {float(scores[0]):.4g}"
