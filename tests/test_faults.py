"""Faults that used to corrupt a result silently (issue 14): each case asserts the exit status, one
error line naming what and where, and that nothing of a previous run changed."""

import json
import os
import subprocess
import sys

import pytest

from rlhf.data import Encoder, prepare


def rlhf(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], capture_output=True, text=True, cwd=cwd)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def bos_adding_copy(tokenizer, chat_template=True):
    """The session tokenizer, but adding BOS to plain text as Llama's does."""
    from tokenizers import processors

    tok = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer.__class__.from_str(
        tokenizer.backend_tokenizer.to_str()), bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"])
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tok.bos_token_id)])
    tok.chat_template = tokenizer.chat_template if chat_template else None
    assert tok("a").input_ids[0] == tok.bos_token_id
    return tok


# ---- 2. UltraFeedback-binarized rows: a string prompt, conversations in chosen/rejected ----------

ULTRAFEEDBACK = {"prompt": "My order is late again!",
                 "chosen": [{"role": "user", "content": "My order is late again!"},
                            {"role": "assistant", "content": "I am truly sorry."}],
                 "rejected": [{"role": "user", "content": "My order is late again!"},
                              {"role": "assistant", "content": "Your order is delayed."}]}


@pytest.mark.parametrize("row", [
    ULTRAFEEDBACK,
    {k: v for k, v in ULTRAFEEDBACK.items() if k != "prompt"},  # implicit prompt
    {"prompt": "My order is late again!", "chosen": ULTRAFEEDBACK["chosen"][1:],  # assistant turns only
     "rejected": ULTRAFEEDBACK["rejected"][1:]},
])
def test_conversational_chosen_rejected_get_the_chat_template(row, tokenizer, tmp_path):
    ex = prepare(write_jsonl(tmp_path / "p.jsonl", [row]), "preference", Encoder(tokenizer, 64)).examples[0]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    user, asst = tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    assert ex["prompt_ids"] == [bos, user] + ids(tokenizer, "My order is late again!") + [eos, asst]
    assert ex["chosen_ids"] == ids(tokenizer, "I am truly sorry.") + [eos]
    assert ex["rejected_ids"] == ids(tokenizer, "Your order is delayed.") + [eos]


def test_data_check_shows_ultrafeedback_rows_templated(tiny_dir, tmp_path):
    path = write_jsonl(tmp_path / "uf.jsonl", [ULTRAFEEDBACK])
    out = rlhf("data", "check", path, "--kind", "preference", "--model", tiny_dir)
    assert out.returncode == 0, out.stderr
    assert "'<|bos|><|user|>My order is late again!<|end|><|assistant|>I am truly sorry.<|end|>'" in out.stdout


def test_preference_conversations_that_differ_before_the_reply_are_refused(tmp_path, tokenizer):
    row = {"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}],
           "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}]}
    from rlhf.data import DataError

    with pytest.raises(DataError, match="p.jsonl:1: chosen: "):
        prepare(write_jsonl(tmp_path / "p.jsonl", [row]), "preference", Encoder(tokenizer, 64))


# ---- 3. messages without a chat template keep the BOS a tokenizer adds ----------------------------

def test_messages_without_chat_template_keep_bos_once(tokenizer):
    tok = bos_adding_copy(tokenizer, chat_template=False)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    enc = Encoder(tok, 64)
    out = enc.encode_sft({"prompt": [{"role": "user", "content": "Hello"}], "completion": "Hi"})
    prompt = [bos] + ids(tok, "User: Hello\n\nAssistant: ")
    assert out["input_ids"] == prompt + ids(tok, "Hi") + [eos]
    # Same as a string prompt of the same text; and a template that writes BOS itself is not doubled.
    assert enc.prompt_ids("User: Hello\n\nAssistant: ") == prompt
    tok.chat_template = "{{ bos_token }}" + "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert Encoder(tok, 64).prompt_ids([{"role": "user", "content": "Hello"}]) == [bos] + ids(tok, "Hello")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # a template without BOS
    assert Encoder(tok, 64).prompt_ids([{"role": "user", "content": "Hello"}]) == ids(tok, "Hello")


# ---- 4. a reward model scores where transformers scores it, PAD == EOS included --------------------

def test_reward_model_with_pad_equal_eos_scores_as_transformers(tokenizer, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    from rlhf.data import collate_preference
    from rlhf.models import Critic, load_sequence_classifier, save_pretrained, sequence_scores, tiny_causal_lm
    from rlhf.recipes import reward

    tok = bos_adding_copy(tokenizer)
    tok.pad_token = tok.eos_token  # GPT-2's usual setup: PAD is EOS
    lm = tiny_causal_lm(tok, "gpt2", hidden_size=32, num_layers=2)
    save_pretrained(lm, tok, str(tmp_path / "lm"))
    ours = load_sequence_classifier(str(tmp_path / "lm")).eval()  # a fresh score head, saved with it
    assert ours.config.pad_token_id == tok.eos_token_id
    ours.save_pretrained(str(tmp_path / "rm"))
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm")).eval()

    enc = Encoder(tok, 64)
    ex = enc.encode_preference({"prompt": "My order is late again!", "chosen": " I am truly sorry.",
                                "rejected": " Late."})
    batch = collate_preference([ex], pad_id=tok.pad_token_id)  # right-padded with PAD == EOS
    with torch.no_grad():
        expected = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        chosen, rejected = reward.pair_scores(Critic(ours), batch, tok.pad_token_id)  # training reads here
        scored = sequence_scores(ours, batch["input_ids"], batch["attention_mask"])  # PPO reads here
        # Left padding (PPO's rollouts) reads the same score as the unpadded sequence in transformers.
        row = batch["input_ids"][1:, : batch["attention_mask"][1].sum()]
        left = torch.cat([torch.full((1, 3), tok.pad_token_id), row], dim=1)
        left_score = sequence_scores(ours, left, (torch.arange(left.shape[1]) >= 3).long()[None])
        alone = hf(input_ids=row).logits[:, 0]
    torch.testing.assert_close(torch.stack([chosen, rejected]).flatten(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scored, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left_score, alone, rtol=1e-5, atol=1e-5)
