"""Rule rewards used by the RL tests (importable as ``rule_rewards:NAME``).

As in TRL, a completion is a string after a string prompt and ``[{"role": "assistant", "content": ...}]``
after a conversational one; :func:`text` reads either.
"""


def text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def vowel_fraction(prompts, completions, **columns):
    """Fraction of a completion's characters that are lowercase vowels (0 for an empty one)."""
    return [sum(c in "aeiou" for c in text(t)) / max(len(text(t)), 1) for t in completions]


def has_answer(prompts, completions, answer=None, **columns):
    """1.0 where the completion contains the dataset's ``answer`` column."""
    return [float(a in text(t)) for t, a in zip(completions, answer)]


def total_length(prompts, completions, **columns):
    """Characters of prompt and completion together, over 20: it differs across prompts even
    where an untrained model gives every prompt the same completion."""
    return [(len(str(p)) + len(text(t))) / 20 for p, t in zip(prompts, completions)]


def starts_with_vowel(prompts, completions, **columns):
    """1.0 where the completion's first character is a lowercase vowel: a reward whose groups often tie."""
    return [float(text(t)[:1] in tuple("aeiou")) for t in completions]


def item_number(prompts, completions, **columns):
    """The number in the prompt ("Tell me about item 7."), over 32: a reward fixed by the prompt alone."""
    import re

    return [int(re.search(r"\d+", str(p)).group()) / 32 for p in prompts]


def stalls_on_rank_1(prompts, completions, **columns):
    """0 for every completion, after ten minutes' wait on the process of rank 1: a hung process."""
    import os
    import time

    if os.environ.get("RANK") == "1":
        time.sleep(600)
    return [0.0 for _ in completions]


def item_number_of_threes(prompts, completions, **columns):
    """:func:`item_number` where it is a multiple of 3, None (does not apply) elsewhere: processes see different
    counts of them."""
    import re

    numbers = [int(re.search(r"\d+", str(p)).group()) for p in prompts]
    return [n / 32 if n % 3 == 0 else None for n in numbers]
