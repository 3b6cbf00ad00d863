"""Multi-turn environments and tool calls (issue 26): token-in, token-out episodes, the loss mask on the
model's tokens only, tool-call parsing, append-only templates, bad environment output in one line, and
GRPO on episodes."""

import json

import pytest
import torch

from rlhf.errors import UserError
from rlhf.rollout import RolloutBatch, SamplingParams
from rlhf.rollout.env import (EnvError, ToolEnv, check_append_only, episodes_to_batch, parse_assistant, run_episodes,
                              tool_schemas)

from rlhf.demo.calculator import TOOL_TEMPLATE  # Qwen's tool-calling style over the tiny tokenizer's tokens


def add(a: int, b: int) -> int:
    """Add two numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


class Scripted:
    """A Rollout that replies with the given texts, turn after turn (each ends with EOS)."""

    def __init__(self, tokenizer, replies: list[str], finished: bool = True):
        self.tok, self.replies, self.finished, self.seen = tokenizer, list(replies), finished, []

    def generate(self, prompts, params):
        self.seen.append([list(p) for p in prompts])
        text = self.replies.pop(0)
        ids = self.tok(text, add_special_tokens=False).input_ids + ([self.tok.eos_token_id] if self.finished else [])
        finished = self.finished and len(ids) <= params.max_new_tokens
        ids = ids[: params.max_new_tokens]  # as a sampler: at most max_new_tokens
        n = len(prompts)
        return RolloutBatch(torch.ones(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.long),
                            torch.tensor([ids] * n), torch.ones(n, len(ids), dtype=torch.long),
                            torch.tensor([finished] * n))


CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'


class CallThenAnswer(Scripted):
    """The recipes' sampler, scripted: a call to add(2, 3), then the answer "5"."""

    def generate(self, prompts, params):
        self.replies = [CALL, "5"][len(prompts[0]) > 40:]  # the second turn's context is the longer one
        return super().generate(prompts, params)

    def load_weights(self, named):
        pass


def expected_mask(tok) -> list[float]:
    """1 on the call and the answer (each with its EOS), 0 on the observation between them."""
    call = len(tok(CALL, add_special_tokens=False).input_ids) + 1
    observation = len(tok("<|user|><tool_response>5</tool_response><|end|><|assistant|>", add_special_tokens=False).input_ids)
    return [1.0] * call + [0.0] * observation + [1.0] * (len(tok("5", add_special_tokens=False).input_ids) + 1)


@pytest.fixture
def tool_tokenizer(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TOOL_TEMPLATE
    return tok


def test_parse_hermes_tool_calls_and_malformed_ones(tool_tokenizer):
    m = parse_assistant(tool_tokenizer, 'Let me add. <tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>')
    assert m["content"] == "Let me add." and m["tool_calls"][0]["function"] == {"name": "add", "arguments": {"a": 2, "b": 3}}
    bad = parse_assistant(tool_tokenizer, "<tool_call>{add 2 3}</tool_call>")
    assert "error" in bad["tool_calls"][0]
    assert parse_assistant(tool_tokenizer, "5") == {"role": "assistant", "content": "5"}
    assert tool_schemas([add])[0]["function"]["parameters"]["properties"]["a"]["type"] == "integer"


def test_episode_tokens_are_the_sampled_ones_plus_the_templates_observations(tool_tokenizer):
    tok = tool_tokenizer
    call = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    rollout = Scripted(tok, [call, "The sum is 5"])
    env = ToolEnv([add])
    episodes = run_episodes(rollout, tok, TOOL_TEMPLATE, [env], [{"prompt": "What is 2+3?"}],
                            SamplingParams(max_new_tokens=200), max_turns=4, max_length=512, tools=env.schemas)
    e = episodes[0]
    eos = tok.eos_token_id
    first = tok(call, add_special_tokens=False).input_ids + [eos]
    second = tok("The sum is 5", add_special_tokens=False).input_ids + [eos]
    observation = tok("<|user|><tool_response>5</tool_response><|end|><|assistant|>", add_special_tokens=False).input_ids
    assert e.ids == first + observation + second  # the sampled tokens as sampled, the observation as rendered
    assert e.model_mask == [1] * len(first) + [0] * len(observation) + [1] * len(second)
    assert e.turns == 2 and e.tool_calls == 1 and e.finished
    # The second turn saw exactly the prompt, its first reply and the observation: token-in.
    assert rollout.seen[1][0] == e.prompt_ids + first + observation
    # The whole conversation rendered by the template is the same tokens.
    whole = tok(tok.apply_chat_template(e.messages, chat_template=TOOL_TEMPLATE, tools=env.schemas, tokenize=False),
                add_special_tokens=False).input_ids
    assert e.prompt_ids + e.ids == whole
    batch = episodes_to_batch(episodes, tok.pad_token_id)
    assert batch.loss_mask.tolist()[0] == e.model_mask and batch.response_mask.sum().item() == len(e.ids)


def test_a_template_that_is_not_append_only_is_refused(tool_tokenizer):
    rewriting = TOOL_TEMPLATE.replace("{% for m in messages %}", "{% for m in messages[-3:] %}")
    with pytest.raises(UserError, match="the chat template is not append-only"):
        check_append_only(tool_tokenizer, rewriting, None)
    check_append_only(tool_tokenizer, TOOL_TEMPLATE, tool_schemas([add]))


def raises(x: str) -> str:
    """Fail.

    Args:
        x: Anything.
    """
    raise RuntimeError("the tool broke")


class NaNReward:
    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, message):
        return [], float("nan"), True


@pytest.mark.parametrize("env, reply, message", [
    (ToolEnv([raises]), '<tool_call>{"name": "raises", "arguments": {"x": "1"}}</tool_call>',
     "environment env, episode 0, turn 1: step raised RuntimeError: the tool broke"),
    (NaNReward(), "hi", "environment env, episode 0, turn 1: reward nan is not a finite number"),
])
def test_bad_environment_output_is_one_line(env, reply, message, tool_tokenizer):
    with pytest.raises(EnvError, match=message):
        run_episodes(Scripted(tool_tokenizer, [reply]), tool_tokenizer, TOOL_TEMPLATE, [env], [{"prompt": "Go"}],
                     SamplingParams(max_new_tokens=200), max_turns=2, max_length=512)


def test_a_malformed_call_is_an_observation_and_the_budget_ends_the_episode(tool_tokenizer):
    env = ToolEnv([add])
    episodes = run_episodes(Scripted(tool_tokenizer, ["<tool_call>{oops}</tool_call>", "5"]), tool_tokenizer,
                            TOOL_TEMPLATE, [env], [{"prompt": "2+3?"}], SamplingParams(max_new_tokens=200), max_turns=4,
                            max_length=512, tools=env.schemas)
    assert "error: the tool call is not valid JSON" in episodes[0].messages[2]["content"]
    short = run_episodes(Scripted(tool_tokenizer, ['<tool_call>{"name": "add", "arguments": {"a": 1, "b": 1}}</tool_call>']),
                         tool_tokenizer, TOOL_TEMPLATE, [ToolEnv([add])], [{"prompt": "2+3?"}],
                         SamplingParams(max_new_tokens=200), max_turns=4, max_length=90, tools=env.schemas)
    # The next turn would not fit: the episode ends after one turn; its last reply ended with EOS (TRL's
    # "not truncated"), so it counts as finished.
    assert short[0].done and short[0].finished and short[0].turns == 1 and short[0].model_mask[-1] == 1


def test_each_episode_keeps_its_own_token_budget(tool_tokenizer):
    """Before: one budget, the tightest of all active episodes, cut every episode's reply."""
    long = {"prompt": "What is " + "2+3 " * 20 + "?"}
    opening = tool_tokenizer(tool_tokenizer.apply_chat_template(
        [{"role": "user", "content": long["prompt"]}], chat_template=TOOL_TEMPLATE, add_generation_prompt=True,
        tokenize=False), add_special_tokens=False).input_ids
    rollout = Scripted(tool_tokenizer, ["The sum is 5"])
    episodes = run_episodes(rollout, tool_tokenizer, TOOL_TEMPLATE, [ToolEnv([add]), ToolEnv([add])],
                            [{"prompt": "2+3?"}, long], SamplingParams(max_new_tokens=200), max_turns=2,
                            max_length=len(opening) + 3, tools=None)  # room for 3 tokens after the long prompt
    reply = len(tool_tokenizer("The sum is 5", add_special_tokens=False).input_ids) + 1
    assert reply > 3 and sum(episodes[0].model_mask) == reply and episodes[0].finished
    assert sum(episodes[1].model_mask) == 3 and not episodes[1].finished


def calculator_env():
    return ToolEnv([add])


def test_grpo_trains_on_episodes_with_the_loss_on_model_tokens(tiny_dir, tool_tokenizer, tmp_path, monkeypatch):
    """GRPO on episodes whose replies are scripted (a call, then an answer): the policy loss's mask is 1 on
    the model's tokens and 0 on the observation between them; the environment's metrics are logged."""
    import sys

    from rlhf.models import load_causal_lm, save_pretrained
    from rlhf.recipes import grpo

    model_dir = tmp_path / "tool-model"
    save_pretrained(load_causal_lm(tiny_dir), tool_tokenizer, str(model_dir))
    seen = []
    real = grpo.policy_loss_terms

    def spy(loss_type, logprobs, old, advantages, mask, **kw):
        seen.append(mask.clone())
        return real(loss_type, logprobs, old, advantages, mask, **kw)

    monkeypatch.setattr(grpo, "policy_loss_terms", spy)
    monkeypatch.setattr(grpo, "build_rollout", lambda cfg, model, tok, acc: CallThenAnswer(tool_tokenizer, []))
    monkeypatch.setitem(sys.modules, "test_env_factories", sys.modules[__name__])
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} plus 3?"}) + "\n" for i in range(8)))
    grpo.run(grpo.Config(model=str(model_dir), data=str(data), env="test_env_factories:calculator_env",
                         reward_fn="rule_rewards:vowel_fraction", output_dir=str(tmp_path / "g"), max_steps=1,
                         rollout_batch_size=4, num_generations=2, mini_batch_size=8, batch_size=8, max_new_tokens=200,
                         max_length=512, max_turns=3, report_to="none", lr=1e-3))
    rows = [json.loads(x) for x in open(tmp_path / "g" / "metrics.jsonl") if '"reward"' in x]
    assert rows[-1]["env/tool_calls"] == 1.0 and rows[-1]["env/turns"] == 2.0 and rows[-1]["env/used_tool_result"] == 1.0
    assert seen and all(row.tolist() == expected_mask(tool_tokenizer) for m in seen for row in m)


def test_the_python_api_takes_an_environment_factory(tiny_dir, tmp_path):
    import rlhf

    made = []

    def factory():
        made.append(1)
        return ToolEnv([add])

    result = rlhf.grpo(tiny_dir, data=[{"prompt": f"What is {i} plus 1?"} for i in range(8)],
                       environment_factory=factory, reward_funcs=[lambda prompts, completions, **c: [1.0] * len(prompts)],
                       output_dir=str(tmp_path / "g"), max_steps=1, rollout_batch_size=4, num_generations=2,
                       mini_batch_size=8, batch_size=8, max_new_tokens=4, max_turns=2, report_to="none")
    assert "env/turns" in result.metrics and len(made) == 1 + 4 * 2  # the start-up probe, then one per episode
    with pytest.raises(UserError, match=r"env= takes a factory"):
        rlhf.grpo(tiny_dir, data=[{"prompt": "x"}] * 8, env=5, output_dir=str(tmp_path / "h"))


def test_sft_conversations_keep_tool_calls_and_tool_results(tool_tokenizer, tmp_path):
    """Before: every key but role and content was dropped, and an assistant turn whose content is empty
    because it only calls a tool was a bad record."""
    from rlhf.data import Encoder, prepare

    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    row = {"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                        {"role": "tool", "name": "add", "content": "5"}, {"role": "assistant", "content": "5"}]}
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps(row) + "\n")
    prepared = prepare(str(path), "sft", Encoder(tool_tokenizer, 256))
    ex = prepared.examples[0]
    trained = tool_tokenizer.decode([t for t in ex["labels"] if t != -100])
    assert '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>' in trained
    assert "<tool_response>" not in trained  # the tool's result is context, not a label


def test_killed_episode_run_resumes_to_the_same_weights(tiny_dir, tmp_path, monkeypatch):
    import sys

    from safetensors.torch import load_file

    import rlhf.training.logs as logs
    from rlhf.recipes import grpo

    monkeypatch.setitem(sys.modules, "test_env_factories", sys.modules[__name__])
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} plus 3?"}) + "\n" for i in range(16)))

    def config(out, **over):
        return grpo.Config(model=tiny_dir, data=str(data), env="test_env_factories:calculator_env",
                           reward_fn="rule_rewards:vowel_fraction", output_dir=str(out), max_steps=4, save_every=2,
                           rollout_batch_size=4, num_generations=2, mini_batch_size=8, batch_size=8, max_new_tokens=6,
                           max_turns=2, report_to="none", lr=1e-3, **over)

    grpo.run(config(tmp_path / "full"))
    real = logs.RunLogger.log

    def die_at_step_3(self, step, metrics):
        if step == 3:
            raise KeyboardInterrupt
        return real(self, step, metrics)

    monkeypatch.setattr(logs.RunLogger, "log", die_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        grpo.run(config(tmp_path / "killed"))
    monkeypatch.setattr(logs.RunLogger, "log", real)
    grpo.run(config(tmp_path / "killed", resume="auto"))
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("full", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_calculator_demo_runs_and_prints_its_table(tmp_path, capsys):
    from rlhf.cli import main

    assert main(["demo-calculator", "--output-dir", str(tmp_path), "--sft-steps", "30", "--grpo-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "env/tool_call_fraction" in out and "reward" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) >= {"reward", "env/tool_call_fraction", "env/used_tool_result"}


def test_ppo_trains_on_episodes_with_gae_over_the_model_tokens(tiny_dir, tool_tokenizer, tmp_path, monkeypatch):
    """PPO with --env: one episode per prompt; the loss and value masks are the model's tokens."""
    import sys

    from rlhf.models import load_causal_lm, save_pretrained
    from rlhf.recipes import ppo

    model_dir = tmp_path / "tool-model"
    save_pretrained(load_causal_lm(tiny_dir), tool_tokenizer, str(model_dir))
    masks = []
    real = ppo.ppo_policy_loss

    def spy(logprobs, old, advantages, mask, **kw):
        masks.append(mask.clone())
        return real(logprobs, old, advantages, mask, **kw)

    monkeypatch.setattr(ppo, "ppo_policy_loss", spy)
    monkeypatch.setattr(ppo, "build_rollout", lambda cfg, model, tok, acc: CallThenAnswer(tool_tokenizer, []))
    monkeypatch.setitem(sys.modules, "test_env_factories", sys.modules[__name__])
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} plus 3?"}) + "\n" for i in range(8)))
    ppo.run(ppo.Config(model=str(model_dir), data=str(data), env="test_env_factories:calculator_env",
                       reward_fn="rule_rewards:vowel_fraction", output_dir=str(tmp_path / "p"), max_steps=1,
                       rollout_batch_size=4, mini_batch_size=4, batch_size=4, max_new_tokens=200, max_length=512,
                       max_turns=3, report_to="none"))
    expected = expected_mask(tool_tokenizer)
    assert masks and all(row.tolist()[: len(expected)] == expected for m in masks for row in m)
