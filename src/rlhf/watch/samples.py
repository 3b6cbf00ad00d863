"""Sample responses of the online recipes (PPO, GRPO, distill) and of DPO to ``samples.jsonl``, for ``rlhf report``.

At step 1 (the SFT model's own samples, before any update) and at every step that is logged
(``--log-every``, and the last step), the main process appends one line per sample for the
first ``--log-samples`` prompts of its rollout batch::

    {"step": 3, "index": 0, "prompt": "...", "completion": "...", "score": 0.41, "length": 17}

``prompt`` is as in the dataset (text, or a list of chat messages); ``score`` is the scorer's
output before any KL penalty (DPO's samples, greedy completions of a few prompts at step 0, each
``--eval-every`` step and the end, have none); ``length`` is the response's tokens. On ``--resume`` the file
loses the lines written after the checkpoint, as ``metrics.jsonl`` does, so it reads as one run.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from rlhf.training.logs import truncate_metrics

if TYPE_CHECKING:  # rlhf report reads samples.jsonl without torch
    import torch

SAMPLES_FILE = "samples.jsonl"


class SampleLog:
    """``OUTPUT_DIR/samples.jsonl``: a few prompts, their completions, scores and lengths per logged step.

    Args:
        output_dir: the run directory.
        n_samples: prompts written per logged step (``--log-samples``; 0: none, the file stays empty).
        log_every: the run's ``--log-every``.
        total_steps: the run's last step (always written).
        start_step: the step the run starts from (its checkpoint's on ``--resume``, else 0).
        is_main: only the main process writes.
    """

    def __init__(self, output_dir: str, n_samples: int, log_every: int, total_steps: int, start_step: int,
                 is_main: bool):
        self.path = os.path.join(output_dir, SAMPLES_FILE)
        self.n_samples, self.log_every, self.total_steps = n_samples, log_every, total_steps
        self.is_main = is_main
        if is_main:
            truncate_metrics(self.path, start_step)  # the same rule as metrics.jsonl: one run, no later lines

    def due(self, step: int) -> bool:
        """Whether ``step`` writes samples: step 1, every ``log_every``-th step and the last one."""
        return step == 1 or step % self.log_every == 0 or step == self.total_steps

    def write(self, step: int, prompts: list, completions: list[str], scores: torch.Tensor | None,
              response_mask: torch.Tensor, group_size: int = 1) -> None:
        """Append the first ``n_samples`` prompts of the batch, with one completion each, if ``step`` is due.

        With ``group_size`` G > 1 (GRPO) the completions of a prompt are contiguous, and the first
        of each group is written.

        Shape:
            scores: (B * G,) or None (no score); response_mask: (B * G, T); ``prompts``: B; ``completions``: B * G.
        """
        if not (self.is_main and self.n_samples > 0 and self.due(step)):
            return
        lengths = response_mask.sum(1).tolist()
        scores_list = scores.float().tolist() if scores is not None else None
        rows = []
        for i, prompt in enumerate(prompts[: self.n_samples]):
            j = i * group_size
            score = {"score": scores_list[j]} if scores_list is not None else {}
            rows.append({"step": step, "index": i, "prompt": prompt, "completion": completions[j], **score,
                         "length": int(lengths[j])})
        with open(self.path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
