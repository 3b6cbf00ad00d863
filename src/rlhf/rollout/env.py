"""Multi-turn episodes with tools: the environment interface and a token-in, token-out rollout.

An environment (:class:`Environment`) opens an episode from a data row (``reset``) and answers each
assistant message (``step``) with observation messages (tool results, a user turn), a reward and
whether the episode is over. :class:`ToolEnv` is the common case: plain Python functions as tools,
their JSON schemas from their signatures and docstrings (transformers' ``get_json_schema``, as TRL's
tools), tool calls parsed from the model's text in the chat template's format.

:func:`run_episodes` plays G episodes per row in lockstep, turn by turn, through any
:class:`~rlhf.rollout.Rollout`. The model's sampled tokens are kept as sampled (never decoded and
re-encoded); between turns only what the chat template adds for the new observation turns (and the
generation prompt) is rendered, tokenised and appended, with ``model_mask`` 0: no policy loss, KL or
entropy on it. This needs an append-only template: :func:`check_append_only` refuses one that rewrites
earlier turns. An episode ends at ``done``, after ``max_turns`` assistant turns, at a turn cut by the
per-turn token limit, or when the next turn would not fit in ``max_length`` tokens.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from rlhf.errors import UserError
from rlhf.rollout.base import RolloutBatch, SamplingParams


class Environment(Protocol):
    """One episode's world. A new instance per episode (the factory's job). An environment with tools
    says so in a ``schemas`` attribute (a list of JSON schemas, as :func:`tool_schemas` makes them),
    which reaches the chat template as ``tools=``."""

    def reset(self, row: dict) -> list[dict]:
        """The episode's opening messages (at least the user's first turn), from a data row."""

    def step(self, message: dict) -> tuple[list[dict], float | None, bool]:
        """Answer the assistant's ``message`` (``role``, ``content``, parsed ``tool_calls``): the observation
        messages to append (``role`` "tool" or "user"), a reward (None: none this turn) and whether it is over."""


class EnvError(UserError):
    """Bad environment output: one line naming the environment, the episode and the turn."""


_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def tool_schemas(tools: list[Callable]) -> list[dict]:
    """Each tool's JSON schema from its signature and Google-style docstring (transformers' ``get_json_schema``)."""
    from transformers.utils import get_json_schema

    return [get_json_schema(fn) for fn in tools]


def parse_assistant(tokenizer, text: str, tools: list[dict] | None = None, prefix: str = "") -> dict:
    """The assistant message of the model's ``text``: its content and its tool calls.

    A tokenizer with a response template (``tokenizer.response_template``, transformers 5) parses with
    transformers' ``parse_response`` (``prefix``: the rendered context before the reply); otherwise the
    Hermes format of Qwen 2.5/3 and most tool-calling templates,
    ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``. A call that is not valid JSON with a
    name is kept as ``{"error": ...}``, for the environment to answer (an observation, not a crash).
    """
    if getattr(tokenizer, "response_template", None):
        message = dict(tokenizer.parse_response(text, prefix=prefix, tools=tools))
        message.setdefault("role", "assistant")
        message.setdefault("content", "")
        return message
    calls = []
    for raw in _TOOL_CALL.findall(text):
        try:
            call = json.loads(raw)
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise ValueError("no name")
            args = call.get("arguments", {})
            args = json.loads(args) if isinstance(args, str) else args
            calls.append({"type": "function", "function": {"name": call["name"], "arguments": args}})
        except (ValueError, TypeError) as e:
            calls.append({"type": "function", "function": {"name": "", "arguments": {}}, "error": f"{raw.strip()!r}: {e}"})
    content = _TOOL_CALL.sub("", text).strip() if calls else text.strip()
    message: dict = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return message


class ToolEnv:
    """Plain Python functions as tools; the episode is over when the assistant calls none.

    ``reset`` opens with the row's ``prompt`` (a string becomes one user turn; a message list is used
    as is). Each call runs the named function with its arguments; its result (``str()``) comes back as
    a ``tool`` message. An unknown tool, arguments that do not fit, or a call that did not parse come
    back as a tool message saying so (the model sees its mistake). A tool that raises is an error of
    the environment. The reward is left to the reward functions (None each turn), or to ``reward(row,
    messages)`` when given, once at the end.
    """

    def __init__(self, tools: list[Callable], reward: Callable[[dict, list[dict]], float] | None = None):
        self.tools = {fn.__name__: fn for fn in tools}
        self.schemas = tool_schemas(tools)
        self.reward = reward
        self.row: dict = {}
        self.messages: list[dict] = []

    def reset(self, row: dict) -> list[dict]:
        self.row = row
        prompt = row["prompt"]
        self.messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        return list(self.messages)

    def step(self, message: dict) -> tuple[list[dict], float | None, bool]:
        self.messages.append(message)
        calls = message.get("tool_calls") or []
        if not calls:
            return [], (float(self.reward(self.row, self.messages)) if self.reward else None), True
        out = []
        for call in calls:
            fn = call.get("function", {})
            name, args = fn.get("name", ""), fn.get("arguments", {})
            if "error" in call:
                result = f"error: the tool call is not valid JSON with a name: {call['error']}"
            elif name not in self.tools:
                result = f"error: no tool named {name!r}; tools: {', '.join(self.tools)}"
            elif not isinstance(args, dict):
                result = f"error: the arguments of {name} must be an object"
            else:
                try:
                    result = str(self.tools[name](**args))
                except TypeError as e:  # arguments that do not fit the signature: the model's mistake
                    if "argument" not in str(e):
                        raise
                    result = f"error: {e}"
            out.append({"role": "tool", "name": name, "content": result})
        self.messages += out
        return out, None, False


@dataclass
class Episode:
    """One played episode: ``prompt_ids``, then ``ids`` (the model's turns and the observations'
    renderings, in order) with ``model_mask`` 1 on the model's sampled tokens only."""

    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    model_mask: list[int] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    reward: float = 0.0
    turns: int = 0
    tool_calls: int = 0
    finished: bool = False  # its last reply ended with EOS (TRL's "not truncated")
    done: bool = False


def _render(tokenizer, template: str, messages: list[dict], tools, generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tools=tools or None, tokenize=False,
                                         add_generation_prompt=generation)


def check_append_only(tokenizer, template: str, tools: list[dict] | None) -> None:
    """Refuse a chat template that is not append-only over a tool-calling conversation: each render of
    the first k messages (with the generation prompt before an assistant turn) must be a prefix of the
    render of the first k + 1, else appending observations would not reproduce the whole conversation."""
    call = {"type": "function", "function": {"name": (tools or [{}])[0].get("function", {}).get("name", "tool"),
                                             "arguments": {"x": "1"}}}
    conversation = [{"role": "user", "content": "Question?"},
                    {"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "name": call["function"]["name"], "content": "42"},
                    {"role": "assistant", "content": "The answer is 42."},
                    {"role": "user", "content": "Thanks."}]
    for k in range(1, len(conversation)):
        try:
            before = _render(tokenizer, template, conversation[:k], tools, conversation[k]["role"] == "assistant")
            after = _render(tokenizer, template, conversation[: k + 1], tools, False)
        except Exception as e:  # jinja's TemplateError, or a template that indexes what a tool turn lacks
            raise UserError(f"the chat template cannot render a tool-calling conversation (message {k + 1}, "
                            f"a {conversation[k]['role']} turn): {type(e).__name__}: {str(e).splitlines()[0]}; "
                            "use a model whose template supports tools") from None
        if not after.startswith(before):
            raise UserError(f"the chat template is not append-only: rendering the first {k + 1} messages of a "
                            f"tool-calling conversation does not start with the rendering of the first {k} "
                            f"(message {k + 1} is a {conversation[k]['role']} turn), so a multi-turn episode "
                            "cannot append turns to the sampled tokens; use a template that only appends")


def run_episodes(rollout, tokenizer, template: str, envs: list, rows: list[dict], params: SamplingParams,
                 max_turns: int, max_length: int, tools: list[dict] | None = None,
                 names: list[str] | None = None) -> list[Episode]:
    """Play one episode per (environment, row) pair, all in lockstep: each turn samples the next
    assistant reply of every unfinished episode in one batch (``params.num_samples`` must be 1)."""
    eos = tokenizer.eos_token_id
    eos_text = tokenizer.convert_ids_to_tokens(eos)
    episodes = []
    for i, (env, row) in enumerate(zip(envs, rows)):
        messages = _checked_messages(env.reset(row), names, i, 0, "reset")
        ids = tokenizer(_render(tokenizer, template, messages, tools, True), add_special_tokens=False).input_ids
        if len(ids) >= max_length:
            raise EnvError(f"environment {_name(names, i)}, episode {i}, turn 0: the opening ({len(ids)} tokens with "
                           f"the tools) leaves no room for a reply under --max-length {max_length}")
        episodes.append(Episode(prompt_ids=ids, messages=messages))
    for turn in range(1, max_turns + 1):
        active = [i for i, e in enumerate(episodes) if not e.done]
        if not active:
            break
        room = {i: min(params.max_new_tokens, max_length - len(episodes[i].prompt_ids) - len(episodes[i].ids))
                for i in active}
        batch = rollout.generate([episodes[i].prompt_ids + episodes[i].ids for i in active],
                                 SamplingParams(params.temperature, params.top_p, params.top_k, max(room.values()), 1))
        for k, i in enumerate(active):
            e = episodes[i]
            sampled = batch.response_ids[k][batch.response_mask[k].bool()].tolist()
            ended = bool(batch.finished[k]) and len(sampled) <= room[i]
            sampled = sampled[: room[i]]  # each episode's own budget
            e.ids += sampled
            e.model_mask += [1] * len(sampled)
            e.turns = turn
            text = tokenizer.decode([t for t in sampled if t != eos])
            prefix = (tokenizer.decode(e.prompt_ids + e.ids[: len(e.ids) - len(sampled)])
                      if getattr(tokenizer, "response_template", None) else "")
            message = parse_assistant(tokenizer, text, tools, prefix)
            e.tool_calls += len(message.get("tool_calls") or [])
            observations, reward, done = env_step(envs[i], message, names, i, turn)
            e.reward += reward
            e.finished = ended  # as TRL: whether the last reply ended with EOS
            if done or not ended or turn == max_turns:
                e.done = True
                e.messages.append(message)
                continue
            # What the template adds after the sampled reply (its end-of-turn tail) and for the observations.
            so_far = _render(tokenizer, template, e.messages, tools, True)
            with_reply = _render(tokenizer, template, e.messages + [message], tools, False)
            after = _render(tokenizer, template, e.messages + [message] + observations, tools, True)
            if not (with_reply.startswith(so_far) and after.startswith(with_reply)):
                raise EnvError(f"environment {_name(names, i)}, episode {i}, turn {turn}: the chat template rewrote an "
                               "earlier turn when this one was added (not append-only here), so the observation "
                               "cannot be appended to the sampled tokens")
            reply = with_reply[len(so_far):]
            tail = reply[reply.rfind(eos_text) + len(eos_text):] if eos_text in reply else ""
            added = tokenizer(tail + after[len(with_reply):], add_special_tokens=False).input_ids
            e.messages += [message] + observations
            if len(e.prompt_ids) + len(e.ids) + len(added) >= max_length:
                e.done = True  # the token budget: the next turn would not fit
                continue
            e.ids += added
            e.model_mask += [0] * len(added)
    return episodes


def _checked_messages(messages, names, i: int, turn: int, what: str) -> list[dict]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise EnvError(f"environment {_name(names, i)}, episode {i}, turn {turn}: {what} returned "
                       f"{type(messages).__name__}; expected a list of messages with a role")
    return list(messages)


def _name(names, i: int) -> str:
    return names[i] if names else "env"


def env_step(env, message: dict, names, i: int, turn: int) -> tuple[list[dict], float, bool]:
    """``env.step(message)``, its output checked: one :class:`EnvError` line naming the environment,
    the episode and the turn for a tool that raised, a non-finite reward or malformed observations."""
    try:
        out = env.step(message)
    except Exception as e:  # a tool or the environment raised
        raise EnvError(f"environment {_name(names, i)}, episode {i}, turn {turn}: step raised "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not (isinstance(out, tuple) and len(out) == 3):
        raise EnvError(f"environment {_name(names, i)}, episode {i}, turn {turn}: step returned "
                       f"{type(out).__name__}; expected (observation_messages, reward, done)")
    observations, reward, done = out
    observations = _checked_messages(observations or [], names, i, turn, "step")
    if reward is not None and not (isinstance(reward, (int, float)) and math.isfinite(reward)):
        raise EnvError(f"environment {_name(names, i)}, episode {i}, turn {turn}: reward {reward!r} is not a "
                       "finite number")
    return observations, float(reward or 0.0), bool(done)


def episodes_to_batch(episodes: list[Episode], pad_id: int) -> RolloutBatch:
    """A :class:`RolloutBatch` of episodes: prompts left-padded, the rest right-padded; ``response_mask``
    1 on every real token (attended to), ``model_mask`` 1 on the model's tokens only (trained)."""
    P = max(len(e.prompt_ids) for e in episodes)
    R = max(max(len(e.ids) for e in episodes), 1)
    prompt_ids = torch.tensor([[pad_id] * (P - len(e.prompt_ids)) + e.prompt_ids for e in episodes])
    prompt_mask = torch.tensor([[0] * (P - len(e.prompt_ids)) + [1] * len(e.prompt_ids) for e in episodes])
    ids = torch.tensor([e.ids + [pad_id] * (R - len(e.ids)) for e in episodes])
    real = torch.tensor([[1] * len(e.ids) + [0] * (R - len(e.ids)) for e in episodes])
    model = torch.tensor([e.model_mask + [0] * (R - len(e.ids)) for e in episodes])
    return RolloutBatch(prompt_ids, prompt_mask, ids, real, torch.tensor([e.finished for e in episodes]),
                        model_mask=model)
