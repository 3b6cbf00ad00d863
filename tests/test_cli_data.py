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
