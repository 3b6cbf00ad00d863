"""Shared fixtures: a tokenizer trained on our own text and tiny models. No hub access."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    "My order is late again! This is unacceptable.",
    "I am so sorry about the delay. I will check your order right now and update you within 24 hours.",
    "Your order is delayed.",
    "The headphones arrived broken. Can I get a refund?",
    "Thank you for your patience, a replacement is on its way.",
    "Hello, how can I help you today?",
] * 20


@pytest.fixture
def prompts_file(tmp_path):
    """64 prompts for the online recipes. Their lengths vary ("item 7" vs "item 42 of the box"),
    so batches are left-padded. Test files with other prompts define their own."""
    import json

    rows = [{"prompt": f"Tell me about item {i}" + (" of the box." if i % 3 else ".")} for i in range(64)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="session")
def tokenizer():
    from rlhf.models import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """A saved tiny Llama policy + tokenizer directory."""
    from rlhf.models import save_pretrained, tiny_causal_lm

    d = str(tmp_path_factory.mktemp("tiny-llama"))
    save_pretrained(tiny_causal_lm(tokenizer, "llama", hidden_size=32, num_layers=2), tokenizer, d)
    return d


def pytest_terminal_summary(terminalreporter):
    """The GPU suite's measurements (peak memory per recipe, bf16 invariants), after its results."""
    import sys

    gpu = sys.modules.get("test_gpu")
    if gpu is not None and gpu.REPORT:
        terminalreporter.write_sep("-", f"GPU report ({gpu.SHAPE})")
        for line in gpu.REPORT:
            terminalreporter.write_line(line)
