"""Tier 2: data formats, exact token ids at the prompt/response boundary, and bad records."""

import json

import pytest

from rlhf.data import (
    PLAIN_CHAT_TEMPLATE, DataError, Encoder, collate_preference, collate_prompts, collate_sft, prepare,
    read_records, split_hh_transcripts,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def test_string_prompt_completion_exact_ids(tokenizer):
    enc = Encoder(tokenizer, max_length=64)
    out = enc.encode_sft({"prompt": "My order is late", "completion": " Sorry!"})
    # Our tokenizer adds no BOS to plain text; the reply gets exactly one EOS.
    p, r = ids(tokenizer, "My order is late"), ids(tokenizer, " Sorry!")
    assert out["input_ids"] == p + r + [tokenizer.eos_token_id]
    assert out["labels"] == [-100] * len(p) + r + [tokenizer.eos_token_id]


def test_chat_template_prompt_has_one_bos_and_reply_one_eos(tokenizer):
    enc = Encoder(tokenizer, max_length=64)
    msgs = [{"role": "user", "content": "Hello"}]
    out = enc.encode_sft({"prompt": msgs, "completion": "Hi<|end|>"})  # EOS already there: not doubled
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    user, asst = tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    expected_prompt = [bos, user] + ids(tokenizer, "Hello") + [eos, asst]
    assert out["input_ids"] == expected_prompt + ids(tokenizer, "Hi") + [eos]
    assert out["input_ids"].count(bos) == 1 and out["input_ids"].count(eos) == 2  # end of user turn + reply
    assert out["labels"][: len(expected_prompt)] == [-100] * len(expected_prompt)


def test_bos_added_once_for_tokenizers_that_add_it(tokenizer):
    from tokenizers import processors

    tok = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer.__class__.from_str(
        tokenizer.backend_tokenizer.to_str()), bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>")
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", bos)])
    assert tok("a").input_ids[0] == bos
    out = Encoder(tok, 64).encode_sft({"prompt": "Hello", "completion": "Hi"})
    assert out["input_ids"][0] == bos and out["input_ids"].count(bos) == 1
    # No chat template: the documented plain template renders messages.
    assert Encoder(tok, 64).render_prompt([{"role": "user", "content": "Hello"}]) == "User: Hello\n\nAssistant: "
    assert tok.chat_template is None and "Assistant: " in PLAIN_CHAT_TEMPLATE


def test_truncation_prompt_left_response_right_and_counted(tokenizer, tmp_path):
    enc = Encoder(tokenizer, max_length=12, max_prompt_length=5)
    long_prompt = "one two three four five six seven eight"
    out = enc.encode_sft({"prompt": long_prompt, "completion": "alpha beta gamma delta epsilon zeta eta theta"})
    assert out["prompt_truncated"] and out["response_truncated"]
    assert out["input_ids"][:5] == ids(tokenizer, long_prompt)[-5:]  # the end of the prompt is kept
    assert len(out["input_ids"]) == 12
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": long_prompt, "completion": "ok"}, {"prompt": "a", "completion": "b"}])
    prepared = prepare(path, "sft", enc)
    assert prepared.n_prompt_truncated == 1 and len(prepared) == 2


@pytest.mark.parametrize("row", [
    {"prompt": "Hi", "completion": "Hello"},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    {"text": "Hello world"},
    {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]},
])
def test_sft_formats(row, tokenizer, tmp_path):
    prepared = prepare(write_jsonl(tmp_path / "d.jsonl", [row]), "sft", Encoder(tokenizer, 64))
    ex = prepared.examples[0]
    assert ex["input_ids"][-1] == tokenizer.eos_token_id
    assert any(label != -100 for label in ex["labels"])


@pytest.mark.parametrize("row", [
    {"prompt": "Hi", "chosen": "Hello there", "rejected": "Go away"},
    {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello there"}],
     "rejected": [{"role": "assistant", "content": "Go away"}]},
    {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}],
     "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away"}]},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello there", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away"},
])
def test_preference_formats(row, tokenizer, tmp_path):
    ex = prepare(write_jsonl(tmp_path / "d.jsonl", [row]), "preference", Encoder(tokenizer, 64)).examples[0]
    assert ex["chosen_ids"][-1] == ex["rejected_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex["chosen_ids"][:-1]).strip() == "Hello there"
    assert tokenizer.decode(ex["rejected_ids"][:-1]).strip() == "Go away"


def test_hh_split_at_last_assistant_turn_of_common_prefix():
    c = "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: yes"
    r = "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: no"
    assert split_hh_transcripts(c, r) == ("\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant:", " yes", " no")


def test_prompt_only_keeps_extra_columns(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "answer": "4"},
                                              {"messages": [{"role": "user", "content": "Hi"}]}])
    prepared = prepare(path, "prompt", Encoder(tokenizer, 64))
    assert prepared.examples[0]["answer"] == "4" and prepared.examples[1]["prompt_ids"][-1] == \
        tokenizer.convert_tokens_to_ids("<|assistant|>")


def test_every_bad_record_case_is_reported_with_location_and_field(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join([
        b'{"prompt": "ok", "chosen": "a", "rejected": "b"}\n',
        b'{"prompt": "ok", "chosen": "a", \n',                      # 2 invalid JSON
        b'{"prompt": "ok", "rejected": "b"}\n',                       # 3 missing field
        b'{"prompt": "", "chosen": "a", "rejected": "b"}\n',          # 4 empty field
        b'{"prompt": 3, "chosen": "a", "rejected": "b"}\n',           # 5 wrong type
        b'{"prompt": "ok", "chosen": "same", "rejected": "same"}\n',  # 6 identical
        b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n',   # 7 not UTF-8
        b'{"prompt": "' + b"word " * 80 + b'", "chosen": "a", "rejected": "b"}\n',  # 8 prompt too long
    ]))
    with pytest.raises(DataError) as info:
        prepare(str(path), "preference", Encoder(tokenizer, max_length=32))
    lines = str(info.value).splitlines()
    p = str(path)
    assert lines[0].startswith(f"{p}:2: invalid JSON")
    assert lines[1] == f"{p}:3: chosen: missing field"
    assert lines[2] == f"{p}:4: prompt: empty"
    assert lines[3] == f"{p}:5: prompt: expected a string or a list of messages, got int"
    assert lines[4] == f"{p}:6: rejected: identical to chosen"
    assert lines[5].startswith(f"{p}:7: not valid UTF-8 (byte 0xe9")
    assert lines[6].startswith(f"{p}:8: prompt: ") and "no room for a response" in lines[6]
    assert lines[7] == f"7 bad record(s) in {p}; fix them or pass --on-bad-record skip"
    prepared = prepare(str(path), "preference", Encoder(tokenizer, max_length=32), on_bad_record="skip")
    assert len(prepared) == 1 and prepared.n_skipped == 7 and prepared.n_records == 8


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty file"):
        read_records(str(tmp_path / "empty.jsonl"))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty file"):
        read_records(str(tmp_path / "blank.jsonl"))
    with pytest.raises(DataError, match="no such file"):
        read_records(str(tmp_path / "nope.jsonl"))


def test_json_csv_parquet_and_datasets_dir_readers(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("prompt,completion\na,b\nc,d\n")
    import datasets

    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for name, where in (("d.json", "d.json[1]"), ("d.csv", "d.csv:3"), ("d.parquet", "d.parquet[1]"), ("saved", "saved[1]")):
        records, errors = read_records(str(tmp_path / name))
        assert [r.data for r in records] == rows and not errors
        assert records[1].where.endswith(where)


def test_collators(tokenizer):
    pad = tokenizer.pad_token_id
    sft = collate_sft([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad)
    assert sft["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert sft["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    pref = collate_preference([{"prompt_ids": [5], "chosen_ids": [6, 2], "rejected_ids": [7]}], pad)
    assert pref["input_ids"].tolist() == [[5, 6, 2], [5, 7, pad]]
    assert pref["response_mask"].tolist() == [[0, 1, 1], [0, 1, 0]]
    prompts = collate_prompts([{"prompt_ids": [5, 6]}, {"prompt_ids": [7]}], pad)
    assert prompts["input_ids"].tolist() == [[5, 6], [pad, 7]]
    assert prompts["attention_mask"].tolist() == [[1, 1], [0, 1]]
