"""`rlhf generate` and `rlhf chat` (driven through a pseudo-terminal) on a saved tiny model."""

import json
import os
import pty
import select
import subprocess
import sys
import time

from transformers import AutoTokenizer


def test_generate_prompt_and_prompts_file(tiny_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "rlhf.cli", "generate", "--model", tiny_dir, "--prompt", "Hello",
                          "--prompt", "Hi there", "--max-new-tokens", "5", "--num-samples", "2", "--seed", "1"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(">>> ") == 2 and ">>> Hello" in out.stdout
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "Hello"}) + "\n" + json.dumps({"messages": [{"role": "user", "content": "Yo"}]}) + "\n")
    out2 = subprocess.run([sys.executable, "-m", "rlhf.cli", "generate", "--model", tiny_dir, "--prompts", str(f),
                           "--max-new-tokens", "4", "--temperature", "0"], capture_output=True, text=True)
    assert out2.returncode == 0, out2.stderr
    assert ">>> Hello" in out2.stdout and ">>> Yo" in out2.stdout


def test_generate_works_on_a_model_without_chat_template(tiny_dir, tmp_path):
    from rlhf.models import load_causal_lm

    plain = tmp_path / "plain"
    load_causal_lm(tiny_dir).save_pretrained(plain)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = None
    tok.save_pretrained(plain)
    out = subprocess.run([sys.executable, "-m", "rlhf.cli", "generate", "--model", str(plain), "--prompt", "Hello",
                          "--max-new-tokens", "3"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _read_until(fd, marker: bytes, timeout: float = 60.0) -> bytes:
    buf, end = b"", time.time() + timeout
    while marker not in buf and time.time() < end:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                buf += os.read(fd, 4096)
            except OSError:
                break
    return buf


def test_chat_through_a_pseudo_terminal_keeps_history(tiny_dir):
    pid, fd = pty.fork()
    if pid == 0:  # child: the chat on the pty's terminal
        os.execv(sys.executable, [sys.executable, "-m", "rlhf.cli", "chat", "--model", tiny_dir, "--max-new-tokens", "4",
                                  "--seed", "0"])
    try:
        assert b"you> " in _read_until(fd, b"you> ")
        os.write(fd, b"Hello there\n")
        first = _read_until(fd, b"you> ")
        assert b"bot> " in first
        os.write(fd, b"/reset\n")
        assert b"(history cleared)" in _read_until(fd, b"you> ")
        os.write(fd, b"/exit\n")
        _read_until(fd, b"\n", timeout=10)
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_chat_history_follows_the_template(tiny_dir, monkeypatch):
    import io
    from types import SimpleNamespace

    from rlhf.recipes import inference

    seen = []
    real = inference.Generator.complete

    def spy(self, prompts):
        seen.append(prompts[0])
        return real(self, prompts)

    monkeypatch.setattr(inference.Generator, "complete", spy)
    args = SimpleNamespace(model=tiny_dir, temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=3, seed=0, raw=False,
                           device="cpu", trust_remote_code=False)
    out = io.StringIO()
    inference.chat(args, stdin=io.StringIO("first\nsecond\n"), stdout=out)
    assert [m["role"] for m in seen[1]] == ["user", "assistant", "user"]
    assert seen[1][0]["content"] == "first" and seen[1][2]["content"] == "second"
