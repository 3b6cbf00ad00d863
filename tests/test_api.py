"""The Python API (rlhf.sft ... rlhf.grpo): objects in, a Result out, one exception for a bad input,
and the README's "From Python" blocks run as they are."""

import inspect
import json
import os
import pathlib
import re

import pytest
import torch

import rlhf

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
FAST = dict(report_to="none", max_new_tokens=6, rollout_batch_size=4, num_generations=2, mini_batch_size=8)


def prompts(n=16):
    return [{"prompt": f"Tell me about item {i}", "item": i} for i in range(n)]


def test_grpo_with_a_python_reward_function_on_a_list_of_dicts(tiny_dir, tokenizer, tmp_path):
    from rlhf.models import load_causal_lm

    model = load_causal_lm(tiny_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def brevity(prompts, completions, item, **columns):
        calls.append((list(prompts), list(completions), list(item), sorted(columns)))
        return [-float(len(c)) for c in completions]

    rows = []
    result = rlhf.grpo(model, tokenizer=tokenizer, data=prompts(), reward_fns=[brevity], output_dir=str(tmp_path / "g"),
                       max_steps=2, learning_rate=1e-2, callbacks=[lambda step, m: rows.append((step, dict(m)))], **FAST)
    # The function got TRL's arguments, the extra column included, for every completion.
    assert len(calls) == 2 and len(calls[0][1]) == 8 and calls[0][2][0] in range(16)
    assert calls[0][0][0].startswith("Tell me about item ") and isinstance(calls[0][1][0], str)
    # Named by __name__; the callbacks saw every logged row.
    assert "rewards/brevity" in result.metrics and [s for s, _ in rows] == [1, 2]
    assert rows[-1][1]["rewards/brevity"] == result.metrics["rewards/brevity"]
    # The model handed in was trained in place, and it is what was saved.
    assert result.model is model and result.model_path == str(tmp_path / "g")
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    saved = load_causal_lm(result.model_path)
    ids = torch.tensor([tokenizer("Tell me about item 3").input_ids])
    with torch.no_grad():
        assert torch.allclose(saved(ids).logits, model.eval()(ids).logits, atol=1e-5)
    # The run's config names the in-memory objects by their handles, in the model card.
    card = (tmp_path / "g" / "README.md").read_text()
    assert "model: <model LlamaForCausalLM from " in card and "data: '<data: 16 records " in card


def test_sft_takes_trl_names_and_a_dataset_and_callbacks_stop_it(tiny_dir, tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": f"Question {i}?", "completion": " An answer."} for i in range(16)])
    result = rlhf.sft(tiny_dir, data=ds, output_dir=str(tmp_path / "s"), max_steps=5, per_device_train_batch_size=4,
                      learning_rate=3e-3, lr_scheduler_type="constant", report_to="none",
                      callbacks=[lambda step, metrics: step == 2])
    steps = [json.loads(x)["step"] for x in open(tmp_path / "s" / "metrics.jsonl") if "train/loss" in x]
    assert steps == [1, 2]  # stopped after the callback's step, and saved as at a normal end
    assert result.metrics["train/lr"] == pytest.approx(3e-3)
    assert os.path.exists(tmp_path / "s" / "config.json") and result.warnings == []
    with pytest.raises(rlhf.UserError, match=r"^data=: a DatasetDict holds splits train; give one, data=ds\['train'\]$"):
        rlhf.sft(tiny_dir, data=datasets.DatasetDict({"train": ds}), output_dir=str(tmp_path / "s2"))


def boom(prompts, completions, **columns):
    raise ValueError("no reward today\nsecond line")


@pytest.mark.parametrize("case, message", [
    ("bad record", r"^data\[2\]: prompt: empty \(the one bad record; fix it or pass --on-bad-record skip\)$"),
    ("raising reward function", r"^reward function boom raised ValueError: no reward today on completion 1 of the "
                                r"batch \(prompt data\[\d+\]\)$"),
    ("unknown keyword", r"^rlhf.grpo\(\): unknown keyword 'lerning_rate'; did you mean lr\?$"),
    ("callback", r"^callback bad_callback raised KeyError: 'nope' at step 1$"),
])
def test_a_bad_input_is_one_exception_with_one_line_and_no_model(case, message, tiny_dir, tmp_path):
    rows = prompts(8)
    kwargs = dict(data=rows, reward_fns=[lambda prompts, completions, **c: [0.0] * len(completions)])
    if case == "bad record":
        rows[2]["prompt"] = ""
    elif case == "raising reward function":
        kwargs["reward_fns"] = [boom]
    elif case == "unknown keyword":
        kwargs["lerning_rate"] = 1e-3
    else:
        def bad_callback(step, metrics):
            return {}["nope"]

        kwargs["callbacks"] = [bad_callback]
    out = tmp_path / "out"
    with pytest.raises(rlhf.UserError) as e:
        rlhf.grpo(tiny_dir, output_dir=str(out), max_steps=2, **{**FAST, **kwargs})
    assert re.match(message, str(e.value)), str(e.value)
    assert "\n" not in str(e.value)
    assert not (out / "config.json").exists() and not list(out.glob("**/*.safetensors"))


def test_help_lists_every_option_and_the_signature_has_them():
    from rlhf.recipes import grpo

    doc, params = rlhf.grpo.__doc__, inspect.signature(rlhf.grpo).parameters
    for f in __import__("dataclasses").fields(grpo.Config):
        assert f.name in params, f.name
        if f.name not in ("model", "data", "eval_data", "reward_model", "ref_model", "env"):  # objects: documented above
            assert f"\n    {f.name} (default " in doc, f.name
    assert "reward_fns" in params and "callbacks" in params and "reward_fns" not in inspect.signature(rlhf.sft).parameters


def test_reward_model_from_a_loaded_model_then_ppo_against_it_in_memory(tiny_dir, tokenizer, tmp_path):
    from rlhf.models import load_causal_lm

    pairs = [{"prompt": f"Help {i}.", "chosen": " I am sorry, I will check it now.", "rejected": " No."}
             for i in range(16)]
    rm = rlhf.rm(load_causal_lm(tiny_dir), tokenizer=tokenizer, data=pairs, output_dir=str(tmp_path / "rm"),
                 max_steps=2, report_to="none")
    assert type(rm.model).__name__ == "LlamaForSequenceClassification" and rm.model_path == str(tmp_path / "rm")
    before = {k: v.clone() for k, v in rm.model.state_dict().items()}
    ppo = rlhf.ppo(tiny_dir, reward_model=rm.model, data=prompts(8), output_dir=str(tmp_path / "ppo"), max_steps=1,
                   report_to="none", max_new_tokens=6, rollout_batch_size=4, mini_batch_size=4)
    assert "objective/rm_score" in ppo.metrics and ppo.model is not None
    assert all(torch.equal(before[k], v) for k, v in rm.model.state_dict().items())  # scored with a copy


def readme_python_blocks() -> list[str]:
    text = README.read_text()
    section = text[text.index("## From Python\n"):]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_python_blocks_run(tiny_dir, tmp_path, monkeypatch, capsys):
    blocks = readme_python_blocks()
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        code = block.replace('"Qwen/Qwen2.5-0.5B-Instruct"', repr(tiny_dir))
        code = re.sub(r"max_steps=\d+", "max_steps=2", code)
        code = code.replace("output_dir=", "report_to='none', output_dir=")
        exec(compile(code, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "data[0]: prompt: empty (the one bad record; fix it or pass --on-bad-record skip)" in out
    for d in ("py-sft", "py-rm", "py-ppo", "py-dpo", "py-grpo"):
        assert (tmp_path / "runs" / d / "config.json").exists(), d
    assert not (tmp_path / "runs" / "py-bad" / "config.json").exists()


def test_dpo_with_a_reference_of_its_own(tiny_dir, tokenizer, tmp_path):
    """TRL's ref_model: by default the reference is the policy's copy, so the first DPO loss is log 2; the
    same weights as a path give log 2 too, and other weights (a loaded model) another loss."""
    from rlhf.models import tiny_causal_lm

    other = tiny_causal_lm(tokenizer, "llama", hidden_size=32, num_layers=2)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1 * torch.randn_like(p))
    pairs = [{"prompt": f"Help {i}.", "chosen": " I am sorry, I will check.", "rejected": " No."} for i in range(8)]
    kw = dict(data=pairs, max_steps=1, batch_size=8, report_to="none")
    base = rlhf.dpo(tiny_dir, output_dir=str(tmp_path / "a"), **kw).metrics["train/loss"]
    same = rlhf.dpo(tiny_dir, ref_model=tiny_dir, output_dir=str(tmp_path / "b"), **kw).metrics["train/loss"]
    moved = rlhf.dpo(tiny_dir, ref_model=other, output_dir=str(tmp_path / "c"), **kw).metrics["train/loss"]
    assert base == pytest.approx(0.693147, abs=1e-5) and same == pytest.approx(base, abs=1e-6)
    assert abs(moved - base) > 1e-3
    # The policy object itself as its reference: the reference is its copy, and the policy still trains.
    from rlhf.models import load_causal_lm

    policy = load_causal_lm(tiny_dir)
    result = rlhf.dpo(policy, tokenizer=tokenizer, ref_model=policy, output_dir=str(tmp_path / "d"), lr=1e-2, **kw)
    assert result.metrics["train/loss"] == pytest.approx(base, abs=1e-5)
    assert all(p.requires_grad for p in policy.parameters())
    assert result.metrics["train/grad_norm"] > 0


def test_trl_trainer_names_and_the_mistakes_a_trl_user_makes(tiny_dir, tokenizer, tmp_path):
    from rlhf.models import load_causal_lm, load_sequence_classifier, tiny_causal_lm, train_tokenizer
    from rlhf.recipes import sft
    from rlhf.training.options import from_keywords

    # GRPOTrainer's names: reward_funcs, train_dataset, processing_class; two lambdas keep a metric each.
    seen = []
    result = rlhf.grpo(load_causal_lm(tiny_dir), processing_class=tokenizer, train_dataset=prompts(8),
                       reward_funcs=[lambda prompts, completions, **c: [1.0] * len(completions),
                                     lambda prompts, completions, **c: [2.0] * len(completions)],
                       callbacks=lambda step, metrics: seen.append(step), output_dir=str(tmp_path / "g"),
                       max_steps=1, **FAST)
    assert result.metrics["rewards/<lambda>"] == 1.0 and result.metrics["rewards/<lambda>#2"] == 2.0 and seen == [1]
    assert from_keywords(sft.Config, {"model": "m", "data": "d", "resume": True}, "sft").resume == "auto"

    def refused(match, **kwargs):
        kwargs = {"data": prompts(8), "output_dir": str(tmp_path / "bad"), "max_steps": 1, **FAST, **kwargs}
        kwargs.setdefault("reward_fns", [lambda prompts, completions, **c: [0.0] * len(completions)])
        with pytest.raises(rlhf.UserError, match=match) as e:
            rlhf.grpo(kwargs.pop("model", tiny_dir), **kwargs)
        assert "\n" not in str(e.value) and not (tmp_path / "bad" / "config.json").exists()

    refused(r"^rlhf.grpo\(\): unknown keyword 'reward_fnss'; did you mean reward_fns\?$", reward_fnss=[len])
    refused(r"^callbacks\[0\]: expected a callable fn\(step, metrics\), got int$", callbacks=[5])
    refused(r"^reward_fns\[0\]: weight 'high' is not a number$", reward_fns=[(len, "high")])
    refused(r"^rlhf.grpo\(\): model_name_or_path= takes a plain value \(a path, a name, a number\), not a "
            r"LlamaForCausalLM; objects go in model=, ", model=None, model_name_or_path=load_causal_lm(tiny_dir))
    refused(r"^rlhf.grpo\(\): a model given as an object needs its tokenizer too \(tokenizer=...\)$",
            model=load_causal_lm(tiny_dir), reward_model=load_sequence_classifier(tiny_dir))
    small = load_sequence_classifier(tiny_dir)
    small.resize_token_embeddings(100)
    refused(r"^reward_model=: its 100 token embeddings are fewer than the policy tokenizer's \d+ tokens; give "
            r"reward_model=\(model, its_tokenizer\)$", reward_model=small)
    other_tokenizer = train_tokenizer(["completely different words here"] * 50, vocab_size=120)
    refused(r"^--ref-model <ref_model LlamaForCausalLM from .*>: its tokenizer differs from the policy's",
            ref_model=(tiny_causal_lm(other_tokenizer, "llama", hidden_size=32, num_layers=2), other_tokenizer),
            beta=0.04)
    refused(r"^--ref-model changes nothing with --beta 0 \(TRL's default\): there is no KL to a reference; set",
            ref_model=tiny_dir)


def test_an_ensemble_result_is_the_ensemble(tiny_dir, tmp_path):
    pairs = [{"prompt": f"Help {i}.", "chosen": " I am sorry, I will check.", "rejected": " No."} for i in range(8)]
    result = rlhf.rm(tiny_dir, data=pairs, ensemble=2, output_dir=str(tmp_path / "e"), max_steps=1, report_to="none")
    assert result.model_path == str(tmp_path / "e") and result.model is None
    assert [type(m).__name__ for m in result.load_model()] == ["LlamaForSequenceClassification"] * 2
