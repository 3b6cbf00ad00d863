"""The `rlhf data check` command: a summary on a clean file, errors and exit 1 otherwise."""

import json
import subprocess
import sys


def rlhf(*args):
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], capture_output=True, text=True)


def test_data_check_clean_file(tiny_dir, tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Question {i}?", "completion": f"Answer {i}."}) for i in range(20)))
    out = rlhf("data", "check", str(path), "--kind", "sft", "--model", tiny_dir, "--max-length", "64")
    assert out.returncode == 0, out.stderr
    assert "records: 20  valid: 20  bad: 0" in out.stdout
    assert "prompt tokens:   p50" in out.stdout and "example (" in out.stdout


def test_data_check_shows_the_trained_tokens(tiny_dir, tmp_path):
    """Issue 22, item 12: rlhf data check --show-labels prints which tokens the loss trains."""
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi there"},
                                             {"role": "assistant", "content": "Hello friend"}]}) + "\n")
    out = rlhf("data", "check", str(path), "--kind", "sft", "--model", tiny_dir, "--show-labels")
    assert out.returncode == 0, out.stderr
    shown = out.stdout.split("trained tokens in [[ ]]:\n", 1)[1]
    assert shown.strip() == "'<|bos|><|user|>Hi there<|end|><|assistant|>[[Hello friend<|end|>]]'"


def test_data_check_bad_file_lists_errors_without_traceback(tmp_path):
    path = tmp_path / "pref.jsonl"
    path.write_text('{"prompt": "a", "chosen": "x", "rejected": "x"}\n{"prompt": "a"\n')
    out = rlhf("data", "check", str(path), "--kind", "preference")
    assert out.returncode == 1
    assert f"error: {path}:1: rejected: identical to chosen" in out.stdout
    assert f"error: {path}:2: invalid JSON" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


def test_data_check_missing_file_is_one_line(tmp_path):
    out = rlhf("data", "check", str(tmp_path / "nope.jsonl"), "--kind", "sft")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == f"rlhf data: error: {tmp_path / 'nope.jsonl'}: no such file"


def test_recipe_cli_print_config_and_help(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model: m\nlr: 0.5\n")
    out = rlhf("sft", "--config", str(y), "--lr", "0.25", "--resume", "--print-config")
    assert out.returncode == 0, out.stderr
    assert "lr: 0.25" in out.stdout and "model: m" in out.stdout and "resume: auto" in out.stdout
    help_text = rlhf("sft", "--help").stdout
    assert "Micro-batches accumulated into one optimizer step." in help_text  # field docstring = --help
    bad = rlhf("sft", "--model", str(tmp_path / "missing"), "--data", "x.jsonl")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "no such model directory" in bad.stderr


def test_help_and_parsing_of_every_recipe_import_no_torch():
    """Issue 22, item 9: rlhf grpo --help took about 5 s (4.5 s of CPU), as the parser imported the recipe and
    with it torch; now each Config is in rlhf.recipes.configs, which imports no torch. Each command runs in a
    fresh interpreter: its help, an unknown flag, the Python API's help() and signature."""
    commands = ["sft", "rm", "ppo", "dpo", "grpo", "distill", "report", "demo", "demo-calculator", "demo-distill"]
    code = ("import contextlib, io, sys, inspect\nfrom rlhf.cli import main\ncommand = sys.argv[1]\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):\n"
            "    assert main([command, '--help']) == 0 and '--' in out.getvalue()\n"
            "    assert main([command, '--no-such-flag']) == 2\n"
            "    if command in ('sft', 'rm', 'ppo', 'dpo', 'grpo', 'distill'):\n"
            "        import rlhf\n"
            "        assert 'Options' in getattr(rlhf, command).__doc__ and inspect.signature(getattr(rlhf, command))\n"
            "print(sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))\n")
    for command in commands:
        out = subprocess.run([sys.executable, "-c", code, command], capture_output=True, text=True)
        assert (out.returncode, out.stderr, out.stdout.strip()) == (0, "", "[]"), command
