"""Inference (seed 002 Part 8): ``rlhf generate`` prints completions; ``rlhf chat`` is a terminal chat.

Both work on any HF-format causal LM: our SFT, PPO, DPO and GRPO outputs, or a plain
transformers model. A tokenizer with a chat template gets the prompt as a user message
(``--raw`` sends the text as is); one without uses the documented plain template.

``rlhf chat`` streams each reply token by token (transformers' ``generate`` with a streamer).
On a terminal, lines are read through ``readline`` where the platform has it (line editing,
and Up/Down for earlier lines). Ctrl-C during a reply stops that reply only: ``[stopped]`` is
printed and the part already shown stays in the history as the assistant's turn, so the
model sees what the user saw (a reply stopped before its first token is dropped with the user's
turn, so turns keep alternating). Ctrl-C at an empty prompt, Ctrl-D, ``/exit`` or ``/quit``
end the session with exit status 0.
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers.generation.streamers import BaseStreamer

from rlhf.data import Encoder
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.errors import UserError
from rlhf.rollout import HFRollout, SamplingParams


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--model", required=True, help="Model directory or hub id.")
    if name == "generate":
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--prompt", action="append", help="A prompt (repeat for several).")
        src.add_argument("--prompts", help="JSONL/JSON/CSV/Parquet file with a prompt (or messages) column.")
        p.add_argument("--num-samples", type=int, default=1, help="Completions per prompt.")
    if name == "chat":
        p.add_argument("--system", help="A system message opening the conversation (kept across /reset).")
    p.add_argument("--temperature", type=float, default=0.7, help="Sampling temperature (0: greedy).")
    p.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling threshold.")
    p.add_argument("--top-k", type=int, default=0, help="Sample among the k likeliest tokens (0: all).")
    p.add_argument("--max-new-tokens", type=int, default=128, help="Longest completion.")
    p.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    p.add_argument("--raw", action="store_true", help="Send prompts as raw text, without the chat template.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda.")
    p.add_argument("--trust-remote-code", action="store_true", help="Allow model code from the hub.")


class Generator:
    """A model, its tokenizer and sampling settings, ready to complete prompts."""

    def __init__(self, args):
        self.tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
        self.model = load_causal_lm(args.model, device=args.device, trust_remote_code=args.trust_remote_code).eval()
        self.encoder = Encoder(self.tokenizer, max_length=10**9)
        self.rollout = HFRollout(self.model, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, args.device)
        self.raw = args.raw
        self.params = SamplingParams(args.temperature, args.top_p, args.top_k, args.max_new_tokens,
                                     getattr(args, "num_samples", 1))

    def as_prompt(self, text_or_messages):
        if isinstance(text_or_messages, list) or self.raw:
            return text_or_messages
        return [{"role": "user", "content": text_or_messages}]

    def complete(self, prompts: list) -> list[str]:
        ids = [self.encoder.prompt_ids(self.as_prompt(p)) for p in prompts]
        batch = self.rollout.generate(ids, self.params)
        out = batch.response_ids.masked_fill(batch.response_mask == 0, self.tokenizer.pad_token_id)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


class _Stream(BaseStreamer):
    """Receives ``generate``'s tokens (the prompt first, skipped), writes the text they add and keeps it."""

    def __init__(self, tokenizer, write):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.text, self.prompt_seen = "", False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids += value.flatten().tolist()
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.startswith(self.text) and not text.endswith("\ufffd"):  # whole characters only
            self.write(text[len(self.text) :])
            self.text = text

    def end(self) -> None:
        pass


def stream_reply(gen: Generator, messages: list[dict], write) -> tuple[str, bool]:
    """Sample a reply to ``messages``, writing its text as it comes; ``(text, stopped)``, where
    ``stopped`` says Ctrl-C (KeyboardInterrupt) ended it early and ``text`` is what was shown."""
    ids = torch.tensor([gen.encoder.prompt_ids(gen.as_prompt(messages))], device=gen.model.device)
    p = gen.params
    sampling = dict(do_sample=True, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or None) \
        if p.temperature > 0 else dict(do_sample=False)
    stream = _Stream(gen.tokenizer, write)
    try:
        with torch.no_grad():
            gen.model.generate(ids, attention_mask=torch.ones_like(ids), streamer=stream, max_new_tokens=p.max_new_tokens,
                               eos_token_id=gen.tokenizer.eos_token_id, pad_token_id=gen.tokenizer.pad_token_id,
                               **sampling)
    except KeyboardInterrupt:
        return stream.text.strip(), True
    return stream.text.strip(), False


def _read_prompts(path: str) -> list:
    from rlhf.data.formats import normalize
    from rlhf.data.readers import DataError, read_records

    records, errors = read_records(path)
    ok, norm_errors = normalize(records, "prompt")
    errors += norm_errors
    if errors:
        raise DataError(str(errors[0]) + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
    return [ex["prompt"] for _, ex in ok]


def generate(args) -> int:
    torch.manual_seed(args.seed)
    gen = Generator(args)
    prompts = args.prompt if args.prompt else _read_prompts(args.prompts)
    completions = gen.complete(prompts)
    n = gen.params.num_samples
    for i, prompt in enumerate(prompts):
        shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        print(f">>> {shown}")
        for j in range(n):
            print(completions[i * n + j] + ("\n" if n > 1 else ""))
        if n == 1:
            print()
    return 0


def _line_reader(stdin, stdout):
    """``read()`` -> the next line, or None at EOF. On a terminal, ``input`` with ``readline``'s
    line editing and history where the platform has it; otherwise ``stdin.readline``."""
    if stdin is sys.stdin and stdin.isatty() and stdout is sys.stdout:
        try:
            import readline  # noqa: F401  (input() edits lines and keeps history once it is imported)
        except ImportError:  # Windows and some builds have none
            pass

        def read() -> str | None:
            try:
                return input("you> ")
            except EOFError:
                return None
        return read

    def read() -> str | None:
        print("you> ", end="", file=stdout, flush=True)
        return stdin.readline() or None
    return read


def _pending_text() -> str:
    """What was typed at the prompt when Ctrl-C came (readline's buffer; '' without readline)."""
    readline = sys.modules.get("readline")
    return readline.get_line_buffer() if readline is not None else ""


def chat(args, stdin=None, stdout=None) -> int:
    """A terminal chat keeping the conversation's history (the module docstring says how Ctrl-C,
    Ctrl-D and the slash commands act)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    torch.manual_seed(args.seed)
    gen = Generator(args)
    system = getattr(args, "system", None)
    opening = [{"role": "system", "content": system}] if system else []
    history: list[dict] = list(opening)
    print(f"Chatting with {args.model}. /reset clears the history, Ctrl-C stops a reply, /exit or Ctrl-D quits.",
          file=stdout, flush=True)
    read = _line_reader(stdin, stdout)
    while True:
        try:
            line = read()
        except KeyboardInterrupt:  # at the prompt: a typed line is dropped, an empty prompt ends the session
            print(file=stdout, flush=True)
            if _pending_text().strip():
                continue
            return 0
        if line is None or line.strip() in ("/exit", "/quit"):
            print(file=stdout)
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = list(opening)
            print("(history cleared)", file=stdout, flush=True)
            continue
        history.append({"role": "user", "content": text})
        print("bot> ", end="", file=stdout, flush=True)
        reply, stopped = stream_reply(gen, list(history), lambda t: print(t, end="", file=stdout, flush=True))
        if stopped and not reply:
            history.pop()  # stopped before a word: the user's turn goes too, so turns keep alternating
        else:
            history.append({"role": "assistant", "content": reply})
        print(" [stopped]" if stopped else "", file=stdout, flush=True)


def check_args(args) -> None:
    """Refuse impossible sampling settings and an absent device, one line naming the flag."""
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if getattr(args, "num_samples", 1) < 1:
        raise UserError("--num-samples must be at least 1")
    if not args.temperature >= 0:  # also NaN
        raise UserError(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be 0 (all tokens) or more, got {args.top_k}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device}: not a device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {args.device}: there are only {torch.cuda.device_count()} CUDA devices")


def main(args, name: str) -> int:
    check_args(args)
    if name == "generate":
        return generate(args)
    if name == "chat":
        return chat(args)
    raise UserError(f"unknown command {name}")
