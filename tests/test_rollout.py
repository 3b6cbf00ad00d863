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
