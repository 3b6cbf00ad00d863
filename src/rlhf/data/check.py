"""``rlhf data check``: validate a dataset file and summarise it before any training."""

from __future__ import annotations

from rlhf.data.encode import Encoder, prepare
from rlhf.data.formats import normalize
from rlhf.data.readers import DataError, read_records


def _percentiles(values: list[int]) -> str:
    if not values:
        return "-"
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
    return f"p50 {pick(0.5)}  p90 {pick(0.9)}  p99 {pick(0.99)}  max {s[-1]}"


def trained_spans(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """The example's text with each trained run of tokens (label not -100) in ``[[...]]``."""
    out, run, trained = [], [], None
    for t, label in zip(input_ids, labels):
        now = label != -100
        if run and now != trained:
            text = tokenizer.decode(run)
            out.append(f"[[{text}]]" if trained else text)
            run = []
        run.append(t)
        trained = now
    if run:
        text = tokenizer.decode(run)
        out.append(f"[[{text}]]" if trained else text)
    return "".join(out)


def check_file(path: str, kind: str, tokenizer=None, max_length: int = 1024,
               max_prompt_length: int | None = None, show_labels: bool = False) -> tuple[bool, str]:
    """Return ``(ok, report)``. ``ok`` is False when any record is bad. ``show_labels`` (SFT) prints the
    example with its trained tokens marked ``[[...]]``."""
    lines = [f"{path} ({kind})"]
    if tokenizer is None:
        records, errors = read_records(path)
        ok, norm_errors = normalize(records, kind)
        errors += norm_errors
        lines.append(f"records: {len(records) + len(errors) - len(norm_errors)}  valid: {len(ok)}  bad: {len(errors)}")
        lines.append("(pass --model DIR for token lengths, truncation counts and a rendered example)")
        lines += [f"error: {e}" for e in errors[:50]]
        return not errors, "\n".join(lines)
    encoder = Encoder(tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
    prepared = prepare(path, kind, encoder, on_bad_record="skip")
    ex = prepared.examples
    response_label, trained = "response tokens:", []
    if kind == "sft":  # a conversation's response holds user turns too: count what the loss covers
        prompt_lens = [e["prompt_len"] for e in ex]
        response_lens = [sum(t != -100 for t in e["labels"]) for e in ex]
        response_label = "trained tokens: "
        trained = [f"trained tokens in all: {sum(response_lens)} of {sum(len(e['input_ids']) for e in ex)}"]
    elif kind == "preference":
        prompt_lens = [len(e["prompt_ids"]) for e in ex]
        response_lens = [len(e[k]) for e in ex for k in ("chosen_ids", "rejected_ids")]
    else:
        prompt_lens, response_lens = [len(e["prompt_ids"]) for e in ex], []
    lines += [
        f"records: {prepared.n_records}  valid: {len(ex)}  bad: {len(prepared.errors)}",
        f"prompt tokens:   {_percentiles(prompt_lens)}",
        f"{response_label} {_percentiles(response_lens)}",
        *trained,
        f"truncated (max_length {max_length}, max_prompt_length {max_prompt_length}): "
        f"prompts {prepared.n_prompt_truncated}, responses {prepared.n_response_truncated}",
    ]
    if ex:
        first = ex[0]
        ids = first.get("input_ids") or (first["prompt_ids"] + first.get("chosen_ids", []))
        lines.append(f"example ({prepared.where[0]}):\n{tokenizer.decode(ids)!r}")
        if show_labels and kind == "sft":
            lines.append(f"trained tokens in [[ ]]:\n{trained_spans(tokenizer, first['input_ids'], first['labels'])!r}")
    lines += [f"error: {e}" for e in prepared.errors[:50]]
    if len(prepared.errors) > 50:
        lines.append(f"... and {len(prepared.errors) - 50} more")
    return not prepared.errors, "\n".join(lines)


__all__ = ["DataError", "check_file"]
