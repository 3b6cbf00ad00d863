"""Dataset formats, with TRL's column names so users' datasets work unchanged.

Each record is checked and normalised to one canonical example per kind:

* ``sft``: ``{"prompt": str | messages, "completion": str}`` from ``prompt``/``completion``
  (a string prompt before a message-list completion is one user message) or plain ``text``
  (an empty prompt: the loss covers the whole text); ``{"messages": messages}`` from a
  conversational ``messages`` column ending with an assistant turn, every assistant turn
  of which is trained (TRL's ``assistant_only_loss``; :mod:`rlhf.data.encode`).
* ``preference``: ``{"prompt", "chosen": str, "rejected": str, "margin"?}`` from
  ``prompt``/``chosen``/``rejected`` as strings or message lists. When ``chosen`` and
  ``rejected`` are conversations, their shared leading turns are the prompt (TRL's
  ``maybe_extract_prompt``: UltraFeedback-binarized rows repeat the user turn there beside a
  string ``prompt``); sharing none, a string ``prompt`` is one user message. Also hh-rlhf transcripts
  (``chosen``/``rejected`` hold ``\\n\\nHuman: ... \\n\\nAssistant: ...`` and no prompt),
  split at the last assistant turn of their longest common prefix.
* ``prompt``: ``{"prompt": str | messages, ...}`` from ``prompt`` or ``messages``; other
  columns are kept (reward functions receive them).
"""

from __future__ import annotations

from rlhf.data.readers import Record, RecordError

KINDS = ("sft", "preference", "prompt")
ROLES = ("system", "user", "assistant", "tool")
HH_ASSISTANT = "\n\nAssistant:"


class BadRecord(Exception):
    def __init__(self, field: str | None, problem: str):
        super().__init__(problem)
        self.field, self.problem = field, problem


def _text(record: dict, field: str) -> str:
    if field not in record or record[field] is None:
        raise BadRecord(field, "missing field")
    value = record[field]
    if not isinstance(value, str):
        raise BadRecord(field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRecord(field, "empty")
    return value


def _messages(value, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadRecord(field, "expected a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRecord(f"{field}[{i}]", "expected {\"role\": str, \"content\": str}")
        if m["role"] not in ROLES:
            raise BadRecord(f"{field}[{i}].role", f"unknown role {m['role']!r}; valid: {', '.join(ROLES)}")
        message = {"role": m["role"], "content": m["content"]}
        if m.get("tool_calls") is not None:  # an assistant's tool calls, as transformers' chat templates take them
            if m["role"] != "assistant" or not isinstance(m["tool_calls"], list) or not all(
                    isinstance(c, dict) and isinstance(c.get("function"), dict) for c in m["tool_calls"]):
                raise BadRecord(f"{field}[{i}].tool_calls", "expected an assistant's list of {\"function\": {...}}")
            message["tool_calls"] = m["tool_calls"]
        for key in ("name", "tool_call_id"):  # a tool result's
            if isinstance(m.get(key), str):
                message[key] = m[key]
        out.append(message)
    return out


def _prompt(record: dict, field: str = "prompt"):
    """A prompt is a non-empty string or a list of messages."""
    if field not in record or record[field] is None:
        raise BadRecord(field, "missing field")
    value = record[field]
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord(field, "empty")
        return value
    if isinstance(value, list):
        return _messages(value, field)
    raise BadRecord(field, f"expected a string or a list of messages, got {type(value).__name__}")


def _assistant_reply(value, field: str) -> str:
    """A response given as a string or as messages ending with an assistant turn."""
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord(field, "empty")
        return value
    msgs = _messages(value, field)
    if msgs[-1]["role"] != "assistant":
        raise BadRecord(field, "the last message must be the assistant's")
    if not msgs[-1]["content"].strip():
        raise BadRecord(field, "empty assistant message")
    return msgs[-1]["content"]


def split_hh_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split hh-rlhf transcripts into (prompt, chosen reply, rejected reply).

    The prompt ends at the last ``\\n\\nAssistant:`` inside the longest common prefix.
    """
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, n)
    if cut < 0:
        raise BadRecord("chosen", "hh-rlhf transcript without a shared '\\n\\nAssistant:' turn")
    cut += len(HH_ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def normalize_sft(r: dict) -> dict:
    if "messages" in r and "prompt" not in r:
        msgs = _messages(r["messages"], "messages")
        if msgs[-1]["role"] != "assistant":
            raise BadRecord("messages", "the last message must be the assistant's")
        if msgs[0]["role"] == "assistant" or len(msgs) < 2:
            raise BadRecord("messages", "needs at least one turn before the assistant's reply")
        for i, m in enumerate(msgs):
            if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
                raise BadRecord(f"messages[{i}]", "empty assistant message")
        return {"messages": msgs}
    if "text" in r and "prompt" not in r and "completion" not in r:
        return {"prompt": "", "completion": _text(r, "text")}
    if "prompt" not in r and "completion" not in r:
        raise BadRecord("prompt", "missing field (an SFT record needs prompt/completion, messages or text)")
    if "completion" not in r or r["completion"] is None:
        raise BadRecord("completion", "missing field")
    prompt = _prompt(r)
    if isinstance(prompt, str) and isinstance(r["completion"], list):  # a conversation: the prompt is a user turn
        prompt = [{"role": "user", "content": prompt}]
    return {"prompt": prompt, "completion": _assistant_reply(r["completion"], "completion")}


def _conversational_pair(prompt, chosen: list[dict], rejected: list[dict]) -> dict:
    """``chosen``/``rejected`` as conversations, as TRL's ``maybe_extract_prompt`` reads them.

    Their shared leading turns are the prompt (UltraFeedback-binarized repeats the user turn
    in both, beside a string ``prompt``); each must then end in one assistant turn. When they
    share no turn, the ``prompt`` column is the prompt, a string being one user message.
    """
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        if prompt is None:
            raise BadRecord("chosen", "chosen and rejected must share every turn but the last")
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    else:
        turns = chosen[:n]
    for field, msgs in (("chosen", chosen), ("rejected", rejected)):
        if len(msgs) != n + 1:
            raise BadRecord(field, "chosen and rejected must share every turn but the last")
    return {"prompt": turns, "chosen": _assistant_reply(chosen[n:], "chosen"),
            "rejected": _assistant_reply(rejected[n:], "rejected")}


def normalize_preference(r: dict) -> dict:
    for field in ("chosen", "rejected"):
        if field not in r or r[field] is None:
            raise BadRecord(field, "missing field")
    chosen, rejected = r["chosen"], r["rejected"]
    has_prompt = "prompt" in r and r["prompt"] is not None
    if isinstance(chosen, list) and isinstance(rejected, list):  # conversations: TRL's maybe_extract_prompt
        out = _conversational_pair(_prompt(r) if has_prompt else None, _messages(chosen, "chosen"),
                                   _messages(rejected, "rejected"))
    elif has_prompt:
        out = {"prompt": _prompt(r), "chosen": _assistant_reply(chosen, "chosen"),
               "rejected": _assistant_reply(rejected, "rejected")}
    else:  # hh-rlhf transcripts
        prompt, c, j = split_hh_transcripts(_text(r, "chosen"), _text(r, "rejected"))
        out = {"prompt": prompt, "chosen": c, "rejected": j}
        for field in ("chosen", "rejected"):
            if not out[field].strip():
                raise BadRecord(field, "empty reply after the prompt")
    if out["chosen"] == out["rejected"]:
        raise BadRecord("rejected", "identical to chosen")
    if r.get("margin") is not None:
        if not isinstance(r["margin"], (int, float)) or isinstance(r["margin"], bool):
            try:
                out["margin"] = float(r["margin"])  # CSV gives strings
            except (TypeError, ValueError):
                raise BadRecord("margin", f"expected a number, got {type(r['margin']).__name__}") from None
        else:
            out["margin"] = float(r["margin"])
    return out


def normalize_prompt(r: dict) -> dict:
    if "prompt" in r:
        prompt = _prompt(r)
    elif "messages" in r:
        prompt = _messages(r["messages"], "messages")
        if prompt[-1]["role"] == "assistant":
            prompt = prompt[:-1]
        if not prompt:
            raise BadRecord("messages", "no turn before the assistant's reply")
    else:
        raise BadRecord("prompt", "missing field (a prompt record needs prompt or messages)")
    extra = {k: v for k, v in r.items() if k not in ("prompt", "messages")}
    return {"prompt": prompt, **extra}


NORMALIZERS = {"sft": normalize_sft, "preference": normalize_preference, "prompt": normalize_prompt}


def normalize(records: list[Record], kind: str) -> tuple[list[tuple[str, dict]], list[RecordError]]:
    """Check and normalise every record; return ``[(where, example)]`` and the errors."""
    if kind not in NORMALIZERS:
        raise ValueError(f"unknown data kind {kind!r}; valid: {', '.join(KINDS)}")
    ok, errors = [], []
    for rec in records:
        try:
            ok.append((rec.where, NORMALIZERS[kind](rec.data)))
        except BadRecord as e:
            errors.append(RecordError(rec.where, e.field, e.problem))
    return ok, errors
