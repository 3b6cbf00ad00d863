"""The sampling loop behind HFRollout against transformers' generate, token for token."""

import pytest
import torch

from rlhf.models import load_causal_lm
from rlhf.rollout import HFRollout, SamplingParams

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [15]]  # different lengths: left padding


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_new_tokens=8),
    SamplingParams(temperature=1.0, max_new_tokens=8),
    SamplingParams(temperature=1.0, max_new_tokens=8, num_samples=3),  # prefill shared by the 3 samples
    SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=8, num_samples=2),
], ids=["greedy", "sampled", "G=3", "warped"])
def test_decode_loop_samples_what_generate_samples(tiny_dir, tokenizer, params):
    model = load_causal_lm(tiny_dir)
    ours = HFRollout(model, tokenizer.pad_token_id, tokenizer.eos_token_id)
    theirs = HFRollout(model, tokenizer.pad_token_id, tokenizer.eos_token_id, use_generate=True)
    torch.manual_seed(3)
    a = ours.generate(PROMPTS, params)
    torch.manual_seed(3)
    b = theirs.generate(PROMPTS, params)
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "finished"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.response_ids.shape == (len(PROMPTS) * params.num_samples, 8)


def test_decode_loop_stops_once_every_row_has_ended(tiny_dir, tokenizer):
    """Make the greedy continuation's 3rd token the EOS: rows end there, the batch stops early."""
    model = load_causal_lm(tiny_dir)
    first = HFRollout(model, tokenizer.pad_token_id, tokenizer.eos_token_id).generate(
        [[5, 6, 7]], SamplingParams(temperature=0, max_new_tokens=8))
    eos = int(first.response_ids[0, 2])
    ours = HFRollout(model, tokenizer.pad_token_id, eos).generate([[5, 6, 7]], SamplingParams(temperature=0, max_new_tokens=8))
    theirs = HFRollout(model, tokenizer.pad_token_id, eos, use_generate=True).generate(
        [[5, 6, 7]], SamplingParams(temperature=0, max_new_tokens=8))
    stop = first.response_ids[0].tolist().index(eos)  # the first EOS (an earlier token may equal it)
    assert ours.response_ids.shape == (1, stop + 1) and bool(ours.finished[0])
    assert torch.equal(ours.response_ids, theirs.response_ids) and torch.equal(ours.response_mask, theirs.response_mask)


@pytest.mark.parametrize("defaults", [
    {"repetition_penalty": 1.05, "top_k": 50},  # what Qwen2.5-Instruct ships, and transformers' old top_k default
    {"no_repeat_ngram_size": 1, "min_new_tokens": 6, "bad_words_ids": [[20], [21]], "suppress_tokens": [22, 23],
     "temperature": 0.7, "top_p": 0.8},
], ids=["repetition_penalty", "many"])
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_new_tokens=12),
    SamplingParams(temperature=1.0, max_new_tokens=12, num_samples=3),
], ids=["greedy", "sampled"])
def test_generate_ignores_the_models_own_generation_config(tiny_dir, tokenizer, defaults, params):
    """use_generate=True samples the policy (with our sampling params only), not the model's
    shipped generation defaults: token for token what our decode loop samples."""
    model = load_causal_lm(tiny_dir)
    with torch.no_grad():  # logits 30 times larger, as a trained model's: a 1.05 penalty then changes tokens
        model.model.norm.weight.mul_(30.0)
    for key, value in defaults.items():
        setattr(model.generation_config, key, value)
    saved = model.generation_config.to_dict()
    ours = HFRollout(model, tokenizer.pad_token_id, tokenizer.eos_token_id)
    theirs = HFRollout(model, tokenizer.pad_token_id, tokenizer.eos_token_id, use_generate=True)
    torch.manual_seed(3)
    a = ours.generate(PROMPTS * 3, params)
    torch.manual_seed(3)
    b = theirs.generate(PROMPTS * 3, params)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    assert model.generation_config.to_dict() == saved  # the model's own config is left as it was


@pytest.mark.parametrize("rope", [None, {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}],
                         ids=["default", "dynamic"])
def test_sampling_leaves_a_model_that_trains(tokenizer, rope):
    """Sampling runs under inference_mode; what comes out, and any buffer the forward rewrote while
    sampling (dynamic RoPE recomputes ``inv_freq`` past the trained length), must still serve the
    update: a training forward and backward that uses the samples, then an optimizer step."""
    from rlhf.models import tiny_causal_lm

    kwargs = {"max_positions": 8, "rope_parameters": rope} if rope else {}
    model = tiny_causal_lm(tokenizer, "llama", hidden_size=32, **kwargs)
    batch = HFRollout(model, tokenizer.pad_token_id, tokenizer.eos_token_id).generate(
        [[5, 6, 7, 8, 9, 10]], SamplingParams(temperature=1.0, max_new_tokens=12, num_samples=2))
    assert not any(t.is_inference() for t in (batch.prompt_ids, batch.response_ids, batch.response_mask))
    assert not any(b.is_inference() for b in model.buffers())
    ids = torch.cat([batch.prompt_ids, batch.response_ids], 1)
    logits = model(input_ids=ids).logits[:, :-1]
    loss = -logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).mean()
    loss.backward()
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
