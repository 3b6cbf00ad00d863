"""Rule rewards used by the RL tests (importable as ``rule_rewards:NAME``)."""


def vowel_fraction(prompts, completions, **columns):
    """Fraction of a completion's characters that are lowercase vowels (0 for an empty one)."""
    return [sum(c in "aeiou" for c in text) / max(len(text), 1) for text in completions]


def has_answer(prompts, completions, answer=None, **columns):
    """1.0 where the completion contains the dataset's ``answer`` column."""
    return [float(a in text) for text, a in zip(completions, answer)]


def total_length(prompts, completions, **columns):
    """Characters of prompt and completion together, over 20: it differs across prompts even
    where an untrained model gives every prompt the same completion."""
    return [(len(str(p)) + len(text)) / 20 for p, text in zip(prompts, completions)]
