"""Tier 2: models on tiny in-process architectures (no hub)."""

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf.algos import logprobs_from_logits
from rlhf.models import (
    Critic, ModelLoadError, PolicyWithValueHead, Reference, apply_lora, causal_logits, get_score_stats,
    load_causal_lm, load_sequence_classifier, load_tokenizer, save_pretrained, sequence_scores,
    set_gradient_checkpointing, set_score_stats, tiny_causal_lm,
)

ARCHS = ["llama", "qwen2", "gpt2", "gpt_neox"]


@pytest.mark.parametrize("arch", ARCHS)
def test_value_head_shapes_and_one_forward(arch, tokenizer):
    model = PolicyWithValueHead(tiny_causal_lm(tokenizer, arch, hidden_size=32))
    ids = torch.randint(3, len(tokenizer), (3, 7))
    logits, values = model(ids, torch.ones_like(ids))
    assert logits.shape == (3, 7, len(tokenizer)) and values.shape == (3, 7)
    (values.sum() + logits.mean()).backward()
    assert model.value_head.weight.grad is not None


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_model_reloads_with_plain_transformers(arch, tokenizer, tmp_path):
    model = tiny_causal_lm(tokenizer, arch, hidden_size=32).eval()
    save_pretrained(model, tokenizer, str(tmp_path))
    assert (tmp_path / "model.safetensors").exists()
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(3, len(tokenizer), (2, 5))
    torch.testing.assert_close(model(ids).logits, again(ids).logits)
    rm = load_sequence_classifier(str(tmp_path))
    set_score_stats(rm, 1.5, 2.0)
    save_pretrained(rm, tokenizer, str(tmp_path / "rm"))
    rm2 = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm"))
    assert get_score_stats(rm2) == (1.5, 2.0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reward_read_at_last_real_token_with_left_and_right_padding(arch, tokenizer, tmp_path):
    save_pretrained(tiny_causal_lm(tokenizer, arch, hidden_size=32), tokenizer, str(tmp_path))
    rm = load_sequence_classifier(str(tmp_path)).eval()
    a, b = [5, 6, 7, 8, 9], [10, 11, 2]  # b ends with EOS
    pad = tokenizer.pad_token_id
    alone = torch.cat([sequence_scores(rm, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in (a, b)])
    right = torch.tensor([a, b + [pad, pad]])
    right_mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])
    left = torch.tensor([a, [pad, pad] + b])
    left_mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    torch.testing.assert_close(sequence_scores(rm, right, right_mask), alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sequence_scores(rm, left, left_mask), alone, atol=1e-5, rtol=1e-5)


def test_lora_reference_equals_base_before_training_and_shares_weights(tiny_dir):
    policy = apply_lora(load_causal_lm(tiny_dir), r=4, alpha=8)
    ref = Reference(policy)
    assert ref.shares_base and ref.model is None
    # Make the adapters non-zero so "disabled" matters: B starts at 0, so train it a little.
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    ids = torch.randint(3, 200, (2, 6))
    mask = torch.ones_like(ids)
    base = load_causal_lm(tiny_dir).eval()
    expected = logprobs_from_logits(causal_logits(base, ids, mask)[:, :-1], ids[:, 1:])
    got = logprobs_from_logits(ref(ids, mask)[:, :-1], ids[:, 1:])
    torch.testing.assert_close(got, expected)
    adapted = logprobs_from_logits(causal_logits(policy.eval(), ids, mask)[:, :-1], ids[:, 1:])
    assert (adapted - expected).abs().max() > 1e-3  # the adapters are back on outside the reference


def test_lora_policy_and_reference_identical_before_training(tiny_dir):
    policy = apply_lora(load_causal_lm(tiny_dir), r=4, alpha=8).eval()
    ids = torch.randint(3, 200, (2, 6))
    mask = torch.ones_like(ids)
    torch.testing.assert_close(Reference(policy)(ids, mask), causal_logits(policy, ids, mask))


def test_frozen_copy_reference_does_not_move(tiny_dir):
    policy = load_causal_lm(tiny_dir)
    ref = Reference(policy)
    assert not any(p.requires_grad for p in ref.model.parameters())
    ids = torch.randint(3, 200, (1, 4))
    before = ref(ids, torch.ones_like(ids)).clone()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    torch.testing.assert_close(ref(ids, torch.ones_like(ids)), before)


def test_lora_merge_on_save_loads_with_transformers(tiny_dir, tmp_path):
    policy = apply_lora(load_causal_lm(tiny_dir), r=4, alpha=8)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    save_pretrained(policy, None, str(tmp_path))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(3, 200, (2, 5))
    torch.testing.assert_close(merged(ids).logits, policy.eval()(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lora", [False, True])
def test_save_from_a_gathered_state_dict_equals_saving_the_model(tiny_dir, tmp_path, lora):
    """What a sharded run saves: the model rebuilt on the meta device from its gathered full state dict
    (FSDP's shards cannot be deep-copied, merged or saved as they are) writes the same checkpoint."""
    from safetensors.torch import load_file

    model = load_causal_lm(tiny_dir)
    if lora:
        model = apply_lora(model, r=4, alpha=8)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
    save_pretrained(model, None, str(tmp_path / "direct"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_pretrained(model, None, str(tmp_path / "gathered"), state_dict=state)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("direct", "gathered"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("lora" in n for n, _ in model.named_parameters()) == lora  # the live model keeps its adapters


def test_policy_with_value_head_samples_through_its_root(tiny_dir):
    """Sampling keywords go to the policy alone: under FSDP the root's forward is what gathers the weights."""
    from transformers import DynamicCache

    policy = load_causal_lm(tiny_dir).eval()
    model = PolicyWithValueHead(policy).eval()
    ids = torch.randint(3, 200, (2, 5))
    mask = torch.ones_like(ids)
    out = model(ids, mask, past_key_values=DynamicCache(config=policy.config), use_cache=True, logits_to_keep=1)
    want = policy(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1).logits
    torch.testing.assert_close(out.logits, want)


def test_separate_critic_from_reward_model_and_gradient_checkpointing(tiny_dir):
    critic = Critic(load_sequence_classifier(tiny_dir))
    ids = torch.randint(3, 200, (2, 6))
    values = critic(ids, torch.ones_like(ids))
    assert values.shape == (2, 6)
    policy = load_causal_lm(tiny_dir)
    set_gradient_checkpointing(policy, True)
    assert policy.is_gradient_checkpointing
    policy.train()
    policy(input_ids=ids, labels=ids).loss.backward()
    set_gradient_checkpointing(policy, False)
    assert not policy.is_gradient_checkpointing


def test_missing_model_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model directory"):
        load_causal_lm(str(tmp_path / "nope"))


def test_a_hub_shaped_path_that_is_nowhere_fails_at_once_when_the_hub_cannot_be_reached(monkeypatch):
    """Issue 22, item 10: 'runs/sft-typo' with no runs/ directory here went to the hub: a minute of retries,
    then 'cannot load tokenizer (We couldn't connect to https://huggingface.co ...)'."""
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub cannot be reached, whatever this machine's network
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"^sft-typo/model: no such local directory, and the hub \(huggingface.co\) "
                                             r"cannot be reached"):
        load_tokenizer("sft-typo/model")
    assert time.perf_counter() - start < 30


def test_unwrap_is_accelerates_unwrap_and_imports_no_deepspeed(tokenizer, tmp_path):
    """``unwrap`` returns what accelerate's ``extract_model_from_parallel`` returns (the model itself, a peft
    model, the model inside DataParallel and inside a torch.compile wrapper), without the package lookup
    and the DeepSpeed import that accelerate's function makes on every call (measured: 76 calls and half a
    second of import in one 8-step GRPO run of ``benchmarks/compare.py``)."""
    import subprocess
    import sys

    from accelerate.utils import extract_model_from_parallel

    from rlhf.models import unwrap

    model = tiny_causal_lm(tokenizer, "llama", hidden_size=32)
    for wrapped in (model, apply_lora(tiny_causal_lm(tokenizer, "llama", hidden_size=32), r=4),
                    torch.nn.DataParallel(model), torch.compile(model), torch.compile(torch.nn.DataParallel(model))):
        assert unwrap(wrapped) is extract_model_from_parallel(wrapped)
    assert unwrap(torch.nn.DataParallel(model)) is model
    code = ("import sys; from rlhf.models import tiny_causal_lm, train_tokenizer, unwrap; "
            "m = tiny_causal_lm(train_tokenizer(['a b c'] * 4, vocab_size=40), 'llama', hidden_size=16); "
            "assert unwrap(m) is m; print('deepspeed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_unwrap_asks_accelerate_only_for_a_wrapper_once_deepspeed_is_loaded(tokenizer, monkeypatch):
    """Once ``deepspeed`` is imported (transformers' save_pretrained imports it wherever it is installed),
    a plain model is still returned without accelerate's lookup (2 ms of package metadata a call: 0.18 s
    of an 8-step GRPO job); a DeepSpeed engine goes to accelerate. A stand-in module plays DeepSpeed."""
    import types

    import accelerate.utils

    from rlhf.models import unwrap

    class DeepSpeedEngine(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(DeepSpeedEngine=DeepSpeedEngine))
    asked = []
    monkeypatch.setattr(accelerate.utils, "extract_model_from_parallel", lambda m: asked.append(m) or m.module)
    model = tiny_causal_lm(tokenizer, "llama", hidden_size=32)
    assert unwrap(model) is model and asked == []
    engine = DeepSpeedEngine(model)
    assert unwrap(engine) is model and asked == [engine]
