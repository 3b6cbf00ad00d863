"""benchmarks/compare.py (``make bench``) at toy size, two repeats: every job runs and reports.

A guard or an API change that breaks the benchmark fails here, not in someone's ``make bench``.
The run without TRL is in ``make test``; the one with TRL's jobs too is slow-marked (about 3
minutes) and needs the ``bench`` extra.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = ["--steps", "2", "--batch-size", "4", "--generations", "2", "--max-new-tokens", "6", "--hidden", "32",
       "--layers", "1", "--mem-hidden", "32", "--mem-layers", "1", "--repeat", "2", "--vocab", "1024",
       "--vocab-batch", "4", "--vocab-new-tokens", "6"]


def run_compare(tmp_path, *extra):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compare.py"), *TOY, *extra,
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_compare_runs_at_toy_size_with_two_repeats(tmp_path):
    r, stdout = run_compare(tmp_path, "--skip-trl")
    for job in ("dpo_ours", "grpo_ours", "grpo4_ours"):  # every repeat ran, each in a directory of its own
        assert len(r["raw"][job]["all_seconds"]) == 2 and r["raw"][job]["seconds"] > 0
    assert r["ppo_step_over_bound"] > 0 and r["ppo_lora_peak_over_sft"] > 0
    for algo in ("sft", "dpo", "grpo"):
        assert r["raw"][f"vocab_{algo}_ours"]["peak_rss_mb"] > 0
    assert "Peak RSS MB at vocabulary 1024" in stdout


@pytest.mark.slow
def test_compare_with_trl_at_toy_size(tmp_path):
    pytest.importorskip("trl")
    r, _ = run_compare(tmp_path)
    for key in ("dpo_speedup_vs_trl", "grpo_speedup_vs_trl", "grpo_4_minibatches_speedup_vs_trl",
                "dpo_peak_vs_trl_1k", "grpo_peak_vs_trl_1k", "sft_peak_vs_trl_1k"):
        assert r[key] > 0, key
