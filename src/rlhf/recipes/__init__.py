"""The training loops, each a short script that reads like the seeds' steps: ``sft``, ``reward``,
``ppo``, ``dpo``, ``grpo``; and what only they share: ``scoring`` (the RL loops' options, rollout
and reward) and ``logprobs`` (log-probs of responses and of preference pairs).

Each module has a ``Config`` dataclass (its field docstrings are the ``--help`` and ``help(rlhf.X)``)
and ``run(config)``. The machinery they use is in :mod:`rlhf.training`, the tools that watch them
in :mod:`rlhf.watch`.
"""
