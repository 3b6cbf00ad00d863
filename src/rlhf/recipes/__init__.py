"""The training loops, each a short script that reads like the seeds' steps: ``sft``, ``reward``,
``ppo``, ``dpo``, ``grpo``, ``distill``; and what they share: ``scoring`` (the RL loops' rollout and reward),
``rewards`` (Python reward functions, called as TRL calls them) and ``logprobs`` (log-probs of
responses and of preference pairs).

Each module has ``run(config)`` and the ``Config`` dataclass it takes, defined in :mod:`rlhf.recipes.configs`
(its field docstrings are the ``--help`` and ``help(rlhf.X)``; nothing there imports torch). The machinery
they use is in :mod:`rlhf.training`, the tools that watch them in :mod:`rlhf.watch`.
"""

# Each stage's command and Python function name -> its module and one line about it (rlhf.api, rlhf.cli).
STAGES = {
    "sft": ("rlhf.recipes.sft", "Stage 1: supervised fine-tuning on (prompt, ideal response) pairs."),
    "rm": ("rlhf.recipes.reward", "Stage 2: train a reward model with the Bradley-Terry loss."),
    "ppo": ("rlhf.recipes.ppo", "Stage 3: PPO actor-critic RLHF against a reward model and/or reward functions."),
    "dpo": ("rlhf.recipes.dpo", "Direct preference optimisation (sigmoid, ipo, hinge, robust, cdpo) from preference pairs."),
    "grpo": ("rlhf.recipes.grpo", "GRPO and the RLVR loss family (DAPO, Dr. GRPO, CISPO, SAPO, GSPO...), RLOO and "
                                  "REINFORCE++, with group baselines and rule rewards."),
    "distill": ("rlhf.recipes.distill", "On-policy distillation (GKD): the student learns the teacher's per-token "
                                        "distributions on its own samples."),
}


def config_module(stage: str) -> str:
    """The module of ``stage``'s ``Config``, which imports no torch: ``rlhf.recipes.configs.grpo``."""
    return "rlhf.recipes.configs." + STAGES[stage][0].rsplit(".", 1)[-1]
