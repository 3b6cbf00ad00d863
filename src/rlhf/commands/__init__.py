"""Commands that are not training: ``rlhf generate`` and ``rlhf chat`` (``inference``), and
``rlhf explain`` (``explain``: the seeds' Part 5 table for one real rollout, computed with the PPO
recipe's own functions, which is why it sits above :mod:`rlhf.recipes`)."""
