"""Turn normalised examples into token ids: chat templates, masks and truncation.

Rules (tests assert exact ids):

* A message-list prompt goes through ``tokenizer.apply_chat_template`` with the generation
  prompt; a tokenizer without a template gets :data:`PLAIN_CHAT_TEMPLATE`. The rendered text
  is encoded with ``add_special_tokens=False``: a tokenizer's own template owns BOS, so it is
  never doubled. The plain template writes no BOS, so it is rendered like a string prompt.
* A plain-string prompt is encoded as is, with BOS first only if the tokenizer adds one (once:
  not again if the text starts with it).
* A response is its text's ids followed by exactly one EOS (none added if already there).
* A conversation (SFT ``messages``) is rendered whole by the chat template and tokenised
  once, as transformers does; every assistant turn is trained (TRL's ``assistant_only_loss``):
  its tokens are labels, every other token is -100. A template with TRL's ``{% generation %}``
  marks says which tokens are the assistant's (``return_assistant_tokens_mask``, exactly as
  TRL). Otherwise turn i is the text ``messages[:i+1]`` adds to ``messages[:i]`` rendered with
  the generation prompt (a template for which those renders are not prefixes of one another
  is a bad record: :func:`assistant_spans`); each turn and the text between turns are
  tokenised on their own, like a prompt and its reply, so a reply's tokens are those
  generation produces after the generation prompt. A turn's labels stop after its last EOS
  (the end-of-turn token is trained, a newline the template writes after it is not), and
  nothing is kept after the last turn's. Where turns begin and end at special tokens, the
  two ways give the same ids and labels.
* Prompts are truncated from the left (``max_prompt_length``), responses from the right
  (``max_length``). In a conversation the prompt is everything before the first assistant
  token, the response everything from there on. Truncations are counted, never silent; a
  prompt that leaves no room for a response under ``max_length`` is a bad record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from rlhf.data.formats import BadRecord, normalize
from rlhf.data.readers import DataError, RecordError, read_records

# The documented fallback: "Role: content" blocks separated by blank lines, and the
# generation prompt "Assistant: ". An assistant turn ends with EOS, as a reply to a
# string prompt does, so a model trained on conversations stops where generation stops.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}"
    "{{ eos_token if m['role'] == 'assistant' else '' }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)
GENERATION_MARK = re.compile(r"{%-?\s*generation\s*-?%}")


def assistant_spans(render, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and the character span ``[start, end)`` of each assistant turn.

    ``render(messages, add_generation_prompt)`` is the chat template. Turn i spans what
    ``messages[:i+1]`` adds to ``messages[:i]`` with the generation prompt; both renders must be
    prefixes of the whole conversation's, else the template is not prefix-stable (it rewrites
    earlier turns, e.g. drops past reasoning) and :class:`BadRecord` says so.

    Example (the plain template): ``[user "Hi", assistant "Yo"]`` renders
    ``"User: Hi\\n\\nAssistant: Yo</s>\\n\\n"``; the turn spans ``"Yo</s>\\n\\n"``.
    """
    text = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = render(messages[:i], True) if i else "", render(messages[: i + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            raise BadRecord("messages", f"the chat template is not prefix-stable at message {i} (rendering the turns "
                                        "before it with the generation prompt is not a prefix of rendering it), so "
                                        "its tokens cannot be told apart; use a template with {% generation %} marks")
        spans.append((len(before), len(through)))
    return text, spans


class Encoder:
    """Encode prompts and responses for one tokenizer under the truncation limits."""

    def __init__(self, tokenizer, max_length: int = 512, max_prompt_length: int | None = None):
        self.tokenizer = tokenizer
        self.used_plain_template = False
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.eos_id = tokenizer.eos_token_id
        probe = tokenizer("a").input_ids
        bos = tokenizer.bos_token_id
        self.bos_prefix = [bos] if bos is not None and probe[:1] == [bos] else []
        if self.eos_id is None:
            raise ValueError("the tokenizer has no EOS token")

    @property
    def template(self) -> str:
        if not self.tokenizer.chat_template:
            self.used_plain_template = True  # the caller says so once and saves it with the model
        return self.tokenizer.chat_template or PLAIN_CHAT_TEMPLATE

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def render_prompt(self, prompt) -> str:
        """The prompt as text: the chat template (with generation prompt) for messages."""
        return prompt if isinstance(prompt, str) else self.render(prompt, True)

    def prompt_ids(self, prompt) -> list[int]:
        text = self.render_prompt(prompt)
        ids = self.tokenizer(text, add_special_tokens=False).input_ids if text else []
        if isinstance(prompt, list) and self.tokenizer.chat_template:
            return ids  # the tokenizer's own template writes BOS where the model wants it
        return ids if ids[:1] == self.bos_prefix else self.bos_prefix + ids

    def response_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        return ids if ids and ids[-1] == self.eos_id else ids + [self.eos_id]

    def fit_prompt(self, prompt_ids: list[int]) -> tuple[list[int], bool]:
        truncated = False
        if self.max_prompt_length and len(prompt_ids) > self.max_prompt_length:
            prompt_ids, truncated = prompt_ids[-self.max_prompt_length :], True
        if len(prompt_ids) >= self.max_length:
            raise BadRecord("prompt", f"{len(prompt_ids)} tokens, no room for a response under max_length "
                                      f"{self.max_length} (set max_prompt_length to truncate)")
        return prompt_ids, truncated

    def fit_response(self, prompt_ids: list[int], response_ids: list[int]) -> tuple[list[int], bool]:
        room = self.max_length - len(prompt_ids)
        return (response_ids[:room], True) if len(response_ids) > room else (response_ids, False)

    def conversation_ids(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of a whole conversation: labels on every assistant turn, -100 elsewhere."""
        tok = self.tokenizer
        if GENERATION_MARK.search(self.template):  # the template marks the assistant's tokens itself
            out = tok.apply_chat_template(messages, chat_template=self.template, tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
            ids = list(out["input_ids"])
            return ids, [t if m else -100 for t, m in zip(ids, out["assistant_masks"])]
        text, spans = assistant_spans(self.render, messages)
        ids, labels, at = [], [], 0
        for start, end in [*spans, (len(text), len(text))]:  # context, then the turn: each tokenised on its own
            context = tok(text[at:start], add_special_tokens=False).input_ids if start > at else []
            turn = tok(text[start:end], add_special_tokens=False).input_ids if end > start else []
            trained = len(turn) - turn[::-1].index(self.eos_id) if self.eos_id in turn else len(turn)
            ids += context + turn
            labels += [-100] * len(context) + turn[:trained] + [-100] * (len(turn) - trained)
            at = end
        if not tok.chat_template and ids[:1] != self.bos_prefix:  # the plain template writes no BOS
            ids, labels = self.bos_prefix + ids, [-100] * len(self.bos_prefix) + labels
        return ids, labels

    def encode_conversation(self, messages: list[dict]) -> dict:
        """A conversation for SFT; the prompt (before the first assistant token) and the response
        (from it on) are truncated as a string prompt and its reply are."""
        ids, labels = self.conversation_ids(messages)
        trained = [k for k, t in enumerate(labels) if t != -100]
        if not trained:
            raise BadRecord("messages", "the chat template marks no assistant token to train on")
        start = trained[0]
        ids, labels = ids[: trained[-1] + 1], labels[: trained[-1] + 1]  # what follows the last turn trains nothing
        prompt, p_cut = self.fit_prompt(ids[:start])
        response, r_cut = self.fit_response(prompt, ids[start:])
        return {"input_ids": prompt + response, "labels": [-100] * len(prompt) + labels[start : start + len(response)],
                "prompt_len": len(prompt), "prompt_truncated": p_cut, "response_truncated": r_cut}

    def encode_sft(self, ex: dict) -> dict:
        if "messages" in ex:
            return self.encode_conversation(ex["messages"])
        prompt, p_cut = self.fit_prompt(self.prompt_ids(ex["prompt"]))
        response, r_cut = self.fit_response(prompt, self.response_ids(ex["completion"]))
        return {"input_ids": prompt + response, "labels": [-100] * len(prompt) + response,
                "prompt_len": len(prompt), "prompt_truncated": p_cut, "response_truncated": r_cut}

    def encode_preference(self, ex: dict) -> dict:
        prompt, p_cut = self.fit_prompt(self.prompt_ids(ex["prompt"]))
        chosen, c_cut = self.fit_response(prompt, self.response_ids(ex["chosen"]))
        rejected, j_cut = self.fit_response(prompt, self.response_ids(ex["rejected"]))
        out = {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected,
               "prompt_truncated": p_cut, "response_truncated": c_cut or j_cut}
        if "margin" in ex:
            out["margin"] = ex["margin"]
        return out

    def encode_prompt(self, ex: dict) -> dict:
        prompt, p_cut = self.fit_prompt(self.prompt_ids(ex["prompt"]))
        return {**ex, "prompt_ids": prompt, "prompt_truncated": p_cut, "response_truncated": False}


@dataclass
class Prepared:
    """A fully checked, tokenised dataset and what happened on the way."""

    examples: list[dict]
    where: list[str]
    n_records: int
    errors: list[RecordError] = field(default_factory=list)
    n_skipped: int = 0
    n_prompt_truncated: int = 0
    n_response_truncated: int = 0

    def __len__(self) -> int:
        return len(self.examples)


def format_errors(errors: list[RecordError], limit: int = 20) -> str:
    lines = [str(e) for e in errors[:limit]]
    if len(errors) > limit:
        lines.append(f"... and {len(errors) - limit} more bad records")
    return "\n".join(lines)


def prepare(source: str, kind: str, encoder: Encoder, on_bad_record: str = "error") -> Prepared:
    """Read, validate and tokenise every record of ``source`` before any training starts.

    Raises:
        DataError: a file-level problem, or bad records with ``on_bad_record="error"``
            (one line per bad record: ``file:line: field: problem``).
    """
    if on_bad_record not in ("error", "skip"):
        raise ValueError("on_bad_record must be 'error' or 'skip'")
    records, errors = read_records(source)
    n_records = len(records) + len(errors)  # unreadable lines are records too
    normalised, norm_errors = normalize(records, kind)
    errors += norm_errors
    encode = {"sft": encoder.encode_sft, "preference": encoder.encode_preference, "prompt": encoder.encode_prompt}[kind]
    examples, where = [], []
    for loc, ex in normalised:
        try:
            examples.append(encode(ex))
            where.append(loc)
        except BadRecord as e:
            errors.append(RecordError(loc, e.field, e.problem))
    errors.sort(key=lambda e: _order(e.where))
    if len(errors) == 1 and on_bad_record == "error":  # one line, as every other error
        raise DataError(f"{errors[0]} (the one bad record; fix it or pass --on-bad-record skip)")
    if errors and on_bad_record == "error":
        raise DataError(format_errors(errors) + f"\n{len(errors)} bad record(s) in {source}; "
                        "fix them or pass --on-bad-record skip")
    if not examples:
        raise DataError(f"{source}: no usable record")
    return Prepared(examples=examples, where=where, n_records=n_records, errors=errors, n_skipped=len(errors),
                    n_prompt_truncated=sum(e["prompt_truncated"] for e in examples),
                    n_response_truncated=sum(e["response_truncated"] for e in examples))


def _order(where: str):
    # "file:12" and "file[3]" sort by their number.
    tail = where.rsplit(":", 1)[-1].rsplit("[", 1)[-1].rstrip("]")
    return (where.split(":")[0].split("[")[0], int(tail) if tail.isdigit() else 0)
