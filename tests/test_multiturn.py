"""Multi-turn SFT (every assistant turn trained, TRL's assistant_only_loss) and reward functions
receiving completions in the prompt's form (issue #14, "What a TRL user expects")."""

import copy
import json
import re

import pytest
import torch

from rlhf.data import DataError, Encoder, collate_packed, collate_sft, prepare

CONVERSATION = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "My order is late"},
    {"role": "assistant", "content": "I am so sorry"},
    {"role": "user", "content": "Can I get a refund?"},
    {"role": "assistant", "content": "Thank you"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def with_template(tokenizer, template):
    """A copy of the session's tokenizer with another chat template."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def hand_encoded(tok):
    """The conversation under the tiny template, built by hand: (input_ids, labels)."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    system, user, asst = tok.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>"])
    reply1, reply2 = ids(tok, "I am so sorry") + [eos], ids(tok, "Thank you") + [eos]
    pieces = [([bos, system] + ids(tok, "Be kind.") + [eos, user] + ids(tok, "My order is late") + [eos, asst], False),
              (reply1, True), ([user] + ids(tok, "Can I get a refund?") + [eos, asst], False), (reply2, True)]
    input_ids = [t for p, _ in pieces for t in p]
    labels = [t if trained else -100 for p, trained in pieces for t in p]
    return input_ids, labels


def test_three_turn_conversation_trains_exactly_the_two_replies(tokenizer, tmp_path):
    ex = prepare(write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}]), "sft", Encoder(tokenizer, 128)).examples[0]
    input_ids, labels = hand_encoded(tokenizer)
    assert ex["input_ids"] == input_ids
    assert ex["labels"] == labels
    trained = [t for t in ex["labels"] if t != -100]
    assert tokenizer.decode(trained) == "I am so sorry<|end|>Thank you<|end|>"
    assert ex["prompt_len"] == labels.index(next(t for t in labels if t != -100))  # tokens before the first reply


# A Qwen-like template with TRL's {% generation %} marks: "\n" after each turn's end is scaffolding.
GENERATION_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|end|>{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.parametrize("marked", [True, False])
def test_mask_equals_transformers_assistant_tokens_mask(tokenizer, marked):
    """Derived by rendering prefixes (template without marks) or read from the marks, the mask
    is transformers' return_assistant_tokens_mask on the marked template."""
    expected = tokenizer.apply_chat_template(CONVERSATION, chat_template=GENERATION_TEMPLATE, tokenize=True,
                                             return_dict=True, return_assistant_tokens_mask=True)
    template = GENERATION_TEMPLATE if marked else re.sub(r"{% (end)?generation %}", "", GENERATION_TEMPLATE)
    tok = with_template(tokenizer, template)
    out = Encoder(tok, 256).encode_sft({"messages": CONVERSATION})
    n = len(out["input_ids"])
    assert tokenizer.decode(expected["input_ids"][n:]) == "\n"  # after the last turn: trains nothing, dropped
    assert out["input_ids"] == list(expected["input_ids"])[:n]
    assert [int(t != -100) for t in out["labels"]] == list(expected["assistant_masks"])[:n]
    assert sum(expected["assistant_masks"]) == len(ids(tok, "I am so sorry")) + len(ids(tok, "Thank you")) + 2


def test_without_chat_template_each_reply_ends_with_eos(tokenizer):
    from tokenizers import Tokenizer

    tok = tokenizer.__class__(tokenizer_object=Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()),
                              bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>")
    assert tok.chat_template is None
    out = Encoder(tok, 256).encode_sft({"messages": CONVERSATION[1:]})
    eos = tok.eos_token_id
    # Each piece tokenised on its own, as the generation prompt and the reply are at generation.
    first, second = "User: My order is late\n\nAssistant: ", "\n\nUser: Can I get a refund?\n\nAssistant: "
    reply1, reply2 = ids(tok, "I am so sorry") + [eos], ids(tok, "Thank you") + [eos]
    assert out["input_ids"] == ids(tok, first) + reply1 + ids(tok, second) + reply2
    assert out["labels"] == [-100] * len(ids(tok, first)) + reply1 + [-100] * len(ids(tok, second)) + reply2
    # One turn is encoded as the prompt/completion record of it is.
    one = Encoder(tok, 256).encode_sft({"messages": CONVERSATION[1:3]})
    single = Encoder(tok, 256).encode_sft({"prompt": CONVERSATION[1:2], "completion": "I am so sorry"})
    assert one["input_ids"] == single["input_ids"] and one["labels"] == single["labels"]


def test_template_that_is_not_prefix_stable_is_one_line_naming_the_record(tokenizer, tmp_path):
    bad = with_template(tokenizer, tokenizer.chat_template.replace("<|assistant|>{% endif %}",
                                                                   "<|assistant|>think{% endif %}"))
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Hi", "completion": "Hello"}, {"messages": CONVERSATION}])
    with pytest.raises(DataError) as info:
        prepare(path, "sft", Encoder(bad, 128))
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"{path}:2: messages: the chat template is not prefix-stable"), first


def test_truncation_and_packing_keep_the_labels_aligned(tokenizer):
    input_ids, labels = hand_encoded(tokenizer)
    first = next(i for i, t in enumerate(labels) if t != -100)
    cut = Encoder(tokenizer, max_length=first + 6).encode_sft({"messages": CONVERSATION})
    assert cut["input_ids"] == input_ids[: first + 6] and cut["labels"] == labels[: first + 6]
    assert cut["response_truncated"] and not cut["prompt_truncated"]
    left = Encoder(tokenizer, max_length=256, max_prompt_length=4).encode_sft({"messages": CONVERSATION})
    assert left["input_ids"] == input_ids[first - 4 :] and left["labels"] == labels[first - 4 :]
    assert left["prompt_truncated"] and left["prompt_len"] == 4
    with pytest.raises(Exception, match="no room for a response"):
        Encoder(tokenizer, max_length=first).encode_sft({"messages": CONVERSATION})
    single = Encoder(tokenizer, 64).encode_sft({"prompt": "Hi", "completion": "Hello"})
    packed = collate_packed([single, left], tokenizer.pad_token_id)
    n = len(single["input_ids"])
    assert packed["labels"][0].tolist() == [-100] + single["labels"][1:] + [-100] + left["labels"][1:]
    padded = collate_sft([single, left], tokenizer.pad_token_id)
    assert int((padded["labels"] != -100).sum()) == int((packed["labels"] != -100).sum()) + (single["labels"][0] != -100)
    assert packed["position_ids"][0, n].item() == 0


def test_data_check_counts_trained_tokens(tiny_dir, tokenizer, tmp_path):
    from rlhf.data.check import check_file

    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    ok, report = check_file(path, "sft", tokenizer, max_length=128)
    _, labels = hand_encoded(tokenizer)
    n_trained = sum(t != -100 for t in labels)
    assert ok and f"trained tokens:  p50 {n_trained} " in report, report
    assert f"trained tokens in all: {n_trained} of {len(labels)}" in report, report


def _cli(capsys, *args):
    from rlhf.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def test_sft_cli_loss_covers_every_assistant_turn(tiny_dir, tokenizer, tmp_path, capsys):
    """The logged first-step loss is the mean NLL over both replies' tokens, not the last one's."""
    from rlhf.models import load_causal_lm

    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    rc, err = _cli(capsys, "sft", "--model", tiny_dir, "--data", path, "--output-dir", tmp_path / "o", "--max-steps", 1,
                   "--batch-size", 1, "--lr", "1e-9", "--max-length", 128, "--report-to", "none")
    assert rc == 0, err
    logged = json.loads((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()[0])["train/loss"]
    input_ids, labels = hand_encoded(tokenizer)
    with torch.no_grad():
        logits = load_causal_lm(tiny_dir).eval()(torch.tensor([input_ids])).logits[0, :-1]  # (L-1, V)
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(labels[1:]), reduction="none", ignore_index=-100)
    trained = torch.tensor(labels[1:]) != -100
    both = float(nll[trained].mean())
    last_start = len(labels) - len(ids(tokenizer, "Thank you")) - 1  # the last reply's first label index
    last_only = float(nll[last_start - 1 :].mean())
    print(f"first-step SFT loss: logged {logged:.4f}, both replies {both:.4f}, last reply only {last_only:.4f}")
    assert abs(logged - both) < 1e-4 and abs(both - last_only) > 1e-3


FORM_CHECKING_REWARD = '''
def form(prompts, completions, **columns):
    """Asserts TRL's forms: a message list for a conversational prompt, a string for a string one."""
    for p, c in zip(prompts, completions):
        if isinstance(p, list):
            assert isinstance(c, list) and len(c) == 1 and c[0]["role"] == "assistant", c
            assert isinstance(c[0]["content"], str)
        else:
            assert isinstance(c, str), c
    return [float(len(c[0]["content"] if isinstance(c, list) else c)) for c in completions]
'''


def test_grpo_reward_functions_get_completions_in_the_prompts_form(tiny_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "form_rewards_issue14.py").write_text(FORM_CHECKING_REWARD)
    monkeypatch.chdir(tmp_path)
    rows = [{"messages": [{"role": "user", "content": f"Tell me about item {i}."}]} if i % 2 else
            {"prompt": f"Say something about item {i}."} for i in range(8)]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    rc, err = _cli(capsys, "grpo", "--model", tiny_dir, "--data", data, "--output-dir", tmp_path / "g", "--max-steps", 2,
                   "--rollout-batch-size", 4, "--num-generations", 2, "--mini-batch-size", 8, "--batch-size", 8,
                   "--max-new-tokens", 4, "--report-to", "none", "--reward-fn", "form_rewards_issue14:form")
    assert rc == 0, err
    assert "rewards/form_rewards_issue14:form" in (tmp_path / "g" / "metrics.jsonl").read_text()
