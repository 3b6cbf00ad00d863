"""Each training loop's options: a ``Config`` dataclass per recipe (``sft``, ``reward``, ``ppo``, ``dpo``,
``grpo``, ``distill``) and ``rl.RLConfig``, which PPO and GRPO share. Field docstrings are the ``--help``
and the ``help(rlhf.X)`` lines. Nothing here imports torch, so ``rlhf <recipe> --help`` and the
parsing of flags and YAML stay light; the recipes import their ``Config`` from here.
"""
