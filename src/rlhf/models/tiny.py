"""Tiny models and a tokenizer trained on our own text: tests and the demo need no hub.

A byte-level BPE tokenizer (GPT-2's scheme) is trained with ``tokenizers``; it has a BOS,
an end-of-turn EOS, a distinct PAD and a chat template. Small configs exist for the
architectures of :data:`ARCHITECTURES` (the test zoo, ``tests/test_zoo.py``).
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|end|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# Each turn is <|role|>content<|end|>; the generation prompt opens an assistant turn, so a
# reply ends with EOS = <|end|>, the token generation stops at.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (any text can still be encoded)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS, padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "gptj", "opt",
                 "qwen3_moe", "mixtral")


def tiny_config(
    arch: str,
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 512,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    sliding_window: int | None = None,
    **extra,
) -> PretrainedConfig:
    """A small config of ``arch`` (one of :data:`ARCHITECTURES`), built with transformers' own
    config class. ``sliding_window`` sets the window of Mistral, Mixtral, Qwen3-MoE (all layers)
    and Gemma 2/3 (their sliding layers; Gemma 3's second layer is full). ``extra`` goes to the
    config as is (``attn_implementation``, ``initializer_range``, ...)."""
    import transformers

    ids = dict(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **extra)
    kv = max(1, num_heads // 2)
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads, max_position_embeddings=max_positions)
    if arch in ("llama", "qwen2", "qwen3", "phi3"):
        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": transformers.Qwen3Config,
               "phi3": transformers.Phi3Config}[arch]
        head = {"head_dim": hidden_size // num_heads} if arch == "qwen3" else {}
        return cls(**common, num_key_value_heads=kv, tie_word_embeddings=arch != "phi3", **head, **ids)
    if arch == "mistral":
        return transformers.MistralConfig(**common, num_key_value_heads=kv, sliding_window=sliding_window,
                                          head_dim=hidden_size // num_heads, **ids)
    if arch in ("gemma2", "gemma3"):
        cls = transformers.Gemma2Config if arch == "gemma2" else transformers.Gemma3TextConfig
        types = [("sliding_attention" if i % 2 == 0 else "full_attention") for i in range(num_layers)]
        return cls(**common, num_key_value_heads=kv, head_dim=hidden_size // num_heads,
                   sliding_window=sliding_window or 4096, layer_types=types, **ids)
    if arch in ("qwen3_moe", "mixtral"):
        moe = (dict(moe_intermediate_size=hidden_size, num_experts=4, num_experts_per_tok=2, head_dim=hidden_size // num_heads,
                    use_sliding_window=sliding_window is not None, decoder_sparse_step=1)
               if arch == "qwen3_moe" else dict(num_local_experts=4, num_experts_per_tok=2, head_dim=hidden_size // num_heads))
        cls = transformers.Qwen3MoeConfig if arch == "qwen3_moe" else transformers.MixtralConfig
        return cls(**common, num_key_value_heads=kv, sliding_window=sliding_window, **moe, **ids)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
                          n_positions=max_positions, **ids)
    if arch == "gpt_neox":
        return GPTNeoXConfig(**common, **ids)
    if arch == "gptj":
        return transformers.GPTJConfig(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
                                       n_positions=max_positions, rotary_dim=hidden_size // num_heads // 2, **ids)
    if arch == "opt":
        return transformers.OPTConfig(vocab_size=vocab_size, hidden_size=hidden_size, ffn_dim=4 * hidden_size,
                                      num_hidden_layers=num_layers, num_attention_heads=num_heads,
                                      max_position_embeddings=max_positions, word_embed_proj_dim=hidden_size, **ids)
    raise ValueError(f"unknown tiny architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}")


def tiny_causal_lm(tokenizer: PreTrainedTokenizerFast, arch: str = "llama", seed: int = 0, **kwargs):
    """A freshly initialised small causal LM whose special-token ids match ``tokenizer``."""
    import torch

    config = tiny_config(arch, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
