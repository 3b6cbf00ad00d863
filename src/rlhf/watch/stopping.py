"""Held-out preference pairs as a monitor signal, and stopping a run that over-optimises (issue 15).

:class:`PreferenceEval` scores ``--eval-data`` preference pairs (the format ``rlhf dpo`` reads)
with the policy and the reference, through the log-prob function the recipe hands it (DPO's own,
:func:`rlhf.recipes.logprobs.all_pair_logps`), and logs the implicit preference accuracy
(:func:`rlhf.algos.implicit_preference_accuracy`) at step 0, every ``--eval-every`` steps and at
the end. A fall below its step-0 value by ``--monitor-pref-accuracy-drop`` is a monitor warning.

:class:`BestPolicy` serves ``--stop-on-overoptimisation``. Its criterion needs no gold: among the
policies whose samples the monitor saw before its first warning, the one whose rollout had the
highest mean score (reward model and reward functions, before any KL penalty). The score logged at
step s is of the samples of the policy after s - 1 updates, drawn before step s's update, so that
policy is saved (``OUTPUT/.tmp-best``) before the update, and made ``OUTPUT/best`` once the
monitor has looked at step s without a warning. On a stop the final model is ``best/``; a run that
ends without a warning keeps the last step's model and leaves ``best/`` for inspection.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from functools import partial

import torch

from rlhf.algos import implicit_preference_accuracy
from rlhf.data import collate_preference
from rlhf.models import eval_mode
from rlhf.training.checkpoints import release_output_dir
from rlhf.errors import UserError
from rlhf.training.loop import reduce_sum
from rlhf.training.setup import load_data
from rlhf.training.saving import remember, staged

ACCURACY = "eval/implicit_pref_accuracy"
ACCURACY_DROP = "eval/implicit_pref_accuracy_vs_start"


class PreferenceEval:
    """Implicit preference accuracy of the policy on ``--eval-data`` pairs, against its step-0 value.

    The reference log-probs are computed once, by the recipe's reference model. Without one (GRPO
    with ``--beta 0``) they are the policy's own at step 0: the reference is a frozen copy of the
    step-0 policy anyway, so the numbers are the same. They are then kept in ``extra`` (the run's
    ``TrainState.extra``) with the step-0 accuracy, so a resumed run compares with the same start.
    Log-probs are at temperature 1, as DPO's. ``policy`` is the unwrapped causal LM.
    """

    def __init__(self, cfg, accelerator, tokenizer, policy, ref, extra: dict, step: int, all_pair_logps: Callable):
        self.cfg, self.accelerator, self.policy = cfg, accelerator, policy
        self.all_pair_logps = all_pair_logps  # (accelerator, model, pairs, collate, batch_size) -> (N, 2)
        self.pairs = load_data(cfg, cfg.eval_data, "preference", tokenizer, accelerator.print).examples
        self.collate = partial(collate_preference, pad_id=tokenizer.pad_token_id)
        key = hashlib.sha256(json.dumps([[e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]]
                                         for e in self.pairs]).encode()).hexdigest()[:32]
        self.state = extra.setdefault("implicit_pref", {})
        if self.state.get("pairs") != key:  # new pairs (or none before): their start is now
            self.state.clear()
            self.state["pairs"] = key
        if ref is not None:
            self.ref_logps = self.logps(ref)
        elif "ref_logps" in self.state:
            self.ref_logps = torch.tensor(self.state["ref_logps"])
        elif step == 0:
            self.ref_logps = self.logps(policy)
            self.state["ref_logps"] = self.ref_logps.tolist()
        else:
            raise UserError(f"--eval-data {cfg.eval_data}: without a reference model (--beta 0) the step-0 policy's "
                            "log-probs are the reference, and the checkpoint resumed at step "
                            f"{step} holds none for these pairs; give --eval-data from the start of the run")

    @torch.no_grad()
    def logps(self, model) -> torch.Tensor:
        """(N, 2): chosen and rejected log-probs of every pair, summed over the reply's tokens."""
        with self.accelerator.autocast():
            return self.all_pair_logps(self.accelerator, model, self.pairs, self.collate, self.cfg.batch_size)

    def due(self, step: int, total: int) -> bool:
        """At step 0, every --eval-every steps and at the last step."""
        return step == 0 or step == total or bool(self.cfg.eval_every and step % self.cfg.eval_every == 0)

    def evaluate(self, step: int) -> dict[str, float]:
        """``eval/implicit_pref_accuracy``, ``eval/implicit_margin`` and the accuracy's change since step 0."""
        with eval_mode(self.policy):
            logps = self.logps(self.policy)
        accuracy, margin = implicit_preference_accuracy(logps[:, 0], logps[:, 1], self.ref_logps[:, 0],
                                                        self.ref_logps[:, 1])
        self.state.setdefault("start", float(accuracy))
        self.state.setdefault("start_step", step)
        return {ACCURACY: float(accuracy), "eval/implicit_margin": float(margin),
                ACCURACY_DROP: float(accuracy) - self.state["start"]}

    def add_rule(self, monitor) -> None:
        """The monitor warns, once, when the accuracy falls ``--monitor-pref-accuracy-drop`` below its start."""
        monitor.add_rule(ACCURACY_DROP, "--monitor-pref-accuracy-drop", self.cfg.monitor_pref_accuracy_drop,
                         lambda v, t: v <= -t, "the implicit preference accuracy on --eval-data moved {value} "
                         "since step 0 (the policy drifts away from the preferred replies)")


class BestPolicy:
    """``--stop-on-overoptimisation``: the best policy before the monitor's first warning, in ``OUTPUT/best``.

    ``save(directory, metrics)`` is the recipe's final save (policy, LoRA merged or not, value head
    or critic) into another directory. The best step and score live in ``extra`` for --resume.
    """

    def __init__(self, cfg, accelerator, save: Callable[[str, dict], None], extra: dict, criterion: str):
        self.cfg, self.accelerator, self.save, self.criterion = cfg, accelerator, save, criterion
        self.dir = os.path.join(cfg.output_dir, "best")
        self.tmp = os.path.join(cfg.output_dir, ".tmp-best")
        self.state = extra.setdefault("best", {"step": None, "value": None, "stop": None})
        self.pending: tuple[int, float] | None = None

    def offer(self, step: int, value: float) -> None:
        """Before step ``step``'s update: the policy now (after ``step - 1`` updates) scored ``value``."""
        if self.state["value"] is None or value > self.state["value"]:
            if self.accelerator.is_main_process:
                shutil.rmtree(self.tmp, ignore_errors=True)  # a candidate left by an interrupted run
            self.save(self.tmp, {self.criterion: value})
            self.pending = (step - 1, value)

    def after_monitor(self, step: int, monitor, logger) -> bool:
        """Once the monitor has looked at step ``step``: keep the candidate unless it warned; True to stop.

        Any process's warning stops every process (each monitors its own rows).
        """
        warned = dict(monitor.state["warned"])
        stop = bool(reduce_sum(self.accelerator, torch.tensor(float(bool(warned)))) > 0)
        if self.pending is not None and not stop and self.accelerator.is_main_process:
            best_step, value = self.pending
            record = {"step": best_step, "criterion": self.criterion, "value": value, "rollout_step": step,
                      "why": f"highest mean {self.criterion} among the rollouts the over-optimisation monitor saw "
                             f"without a warning; the policy after {best_step} updates sampled the rollout "
                             f"logged at step {step}"}
            with open(os.path.join(self.tmp, "best.json"), "w") as f:
                json.dump(record, f, indent=1)
            shutil.rmtree(self.dir + ".old", ignore_errors=True)
            if os.path.isdir(self.dir):
                os.replace(self.dir, self.dir + ".old")
            os.replace(self.tmp, self.dir)
            shutil.rmtree(self.dir + ".old", ignore_errors=True)
        if self.pending is not None and not stop:
            self.state.update(step=self.pending[0], value=self.pending[1])
        if self.accelerator.is_main_process:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.pending = None
        if stop:
            name, first = min(warned.items(), key=lambda x: x[1]) if warned else ("another process's signal", step)
            self.state["stop"] = {"step": step, "signal": name}
            logger.event(step, f"stopping (--stop-on-overoptimisation): the over-optimisation monitor warned on "
                               f"{name} at step {first}", signal=name)
        return stop

    def finish(self, stopped: bool, step: int, save_last: Callable[[], None]) -> None:
        """The final model: ``best/`` on a stop (when there is one), else the last step's (``save_last``)."""
        out, best = self.cfg.output_dir, self.state["step"]
        if not stopped or best is None:
            save_last()
            why = "no over-optimisation warning" if not stopped else "no policy before the first warning to keep"
            kept = f"; the best by {self.criterion} is in {self.dir} (step {best})" if best is not None else ""
            self.accelerator.print(f"{why}: saved the policy of the last step (step {step}) to {out}{kept}")
            return
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            install(self.dir, out)
        self.accelerator.wait_for_everyone()
        release_output_dir(out)
        remember(out, is_final=True)  # the best policy's weights are on disk only: the policy in memory moved on
        self.accelerator.print(f"stopped at step {step}: saved the best policy, of step {best} ({self.criterion} "
                               f"{self.state['value']:.4g}, {self.dir}), to {out}")


def install(best: str, out: str) -> None:
    """Copy the model in ``best`` into ``out`` as :func:`save_final` writes one (through
    :func:`staged`, ``config.json`` last; ``best.json`` stays in ``best``)."""
    try:
        with staged(out) as tmp:
            shutil.copytree(best, tmp, ignore=shutil.ignore_patterns("best.json"), dirs_exist_ok=True)
    except OSError as e:
        raise UserError(f"--output-dir {out}: cannot copy the best policy from {best} ({e.strerror or e}); "
                        f"it is still in {best}") from None


def watch(step: int, total: int, metrics: dict[str, float], monitor, pref_eval: PreferenceEval | None,
          best: BestPolicy | None, logger) -> bool:
    """The monitor's part of a step, after its signals are in ``metrics``: the --eval-data pairs when due,
    the warnings, and (--stop-on-overoptimisation) the best policy so far; True when the run stops here."""
    if pref_eval is not None and pref_eval.due(step, total):
        metrics.update(pref_eval.evaluate(step))
    if monitor is not None:
        monitor.warn(step, metrics, logger)
    stop = best is not None and best.after_monitor(step, monitor, logger)
    if stop and pref_eval is not None and ACCURACY not in metrics:  # the end of the run: evaluate there too
        metrics.update(pref_eval.evaluate(step))
    return stop
