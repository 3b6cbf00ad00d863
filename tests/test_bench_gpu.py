"""benchmarks/gpu.py at toy sizes on CPU: every section runs and reports (the figures themselves need a GPU)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--tiny", "--skip-trl", "--seqs", "2",
                           "--jobs", "ppo", "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    engines = {x["engine"].split()[0]: x for x in r["decode"]}
    assert set(engines) == {"generate", "loop", "static"}
    assert all(x["tokens_per_s"] > 0 for x in engines.values())
    assert {x["update"] for x in r["mfu"]} == {"SFT", "DPO", "GRPO padded", "GRPO packed"}
    assert all(x["seconds"] > 0 for x in r["mfu"])
    assert r["jobs"]["ppo"]["bound"]["total"] > 0 and r["jobs"]["ppo"]["split"]["time/step"] > 0
    for heading in ("1. Decode", "2. Updates", "4. PPO step"):
        assert heading in proc.stdout
