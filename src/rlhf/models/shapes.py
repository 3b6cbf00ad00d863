"""Real model shapes with random weights, built from a config: GPU tests and benchmarks need no download.

The shapes are those of the published Qwen2.5 configs (hidden size, layers, heads, key/value
heads, MLP width, vocabulary, tied embeddings, RoPE base); the weights are transformers'
random initialisation, so such a model rarely emits EOS and responses run to their length limit.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, tie_word_embeddings=True),
}


def shaped_config(shape: str, tokenizer=None, vocab_size: int = 151936) -> Qwen2Config:
    """The config of ``shape`` (a key of :data:`SHAPES`), special-token ids from ``tokenizer`` if given.

    The vocabulary stays at Qwen2.5's 151,936 rows even with a smaller tokenizer, so the LM head
    costs what it costs in the real model; ids the tokenizer lacks decode to nothing.
    """
    ids = {}
    if tokenizer is not None:
        ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    return Qwen2Config(vocab_size=vocab_size, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                       **SHAPES[shape], **ids)


def shaped_causal_lm(shape: str, tokenizer=None, device=None, dtype=torch.float32, seed: int = 0):
    """A randomly initialised causal LM of ``shape`` (initialised on ``device``: fast on a GPU)."""
    config = shaped_config(shape, tokenizer)
    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if tokenizer is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
