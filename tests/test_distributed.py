"""Two processes (accelerate launch, DDP over gloo on CPU) follow the one-process loss trajectory.

Same global batch, same data order: data sharding, loss aggregation over the global token
(or pair) count, gradient sync and checkpointing must all be right for the curves to agree.
Slow (spawns accelerate launch): run with `make test-slow`.
"""

import json
import os
import random
import re
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "accelerate",
                      "cpu_ddp_2proc.yaml")


def free_port() -> int:
    """A port nobody listens on, so back-to-back launches never race for torchrun's default 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, args: list[str]) -> None:
    # accelerate's torchrun launcher starts the processes; without a GPU rlhf asks accelerate
    # for cpu=True, which makes it DDP over gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIG, "--num_processes", str(n),
           "--main_process_port", str(free_port()), "-m", "rlhf.cli", *args] if n > 1 else \
        [sys.executable, "-m", "rlhf.cli", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"processes: {n}" in out.stdout, out.stdout[-2000:]


def losses(path):
    return [json.loads(x)["train/loss"] for x in open(os.path.join(path, "metrics.jsonl")) if "train/loss" in x]


@pytest.mark.parametrize("recipe", ["sft", "dpo"])
def test_two_processes_follow_one_process_trajectory(recipe, tiny_dir, tmp_path):
    rng = random.Random(0)
    if recipe == "sft":
        # Uneven lengths, so a per-process token mean would differ from the global one.
        rows = [{"prompt": f"Question {i}?", "completion": " answer" * rng.randint(1, 8)} for i in range(64)]
    else:
        rows = [{"prompt": f"Help {i}.", "chosen": " Sure, here it is" * rng.randint(1, 3), "rejected": " No."}
                for i in range(64)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--model", tiny_dir, "--data", str(data), "--max-steps", "6", "--batch-size", "8", "--grad-accum", "2",
              "--lr", "5e-3", "--report-to", "none", "--save-every", "3", "--max-length", "64"]
    launch(1, [recipe, *common, "--output-dir", str(tmp_path / "one")])
    launch(2, [recipe, *common, "--output-dir", str(tmp_path / "two")])
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    # Stated tolerance: relative 1e-5 per step (float32 all-reduce order differs from a local sum;
    # measured here: at most 2e-7).
    assert two == pytest.approx(one, rel=1e-5), (one, two)
    assert os.path.isdir(tmp_path / "two" / "checkpoints" / "step-00000006")


def test_greedy_ppo_on_two_processes_follows_one_process(tiny_dir, tmp_path):
    """Greedy sampling makes the rollouts independent of the split, so PPO's curves must agree
    too: sharded rollouts, advantages whitened over the global batch, losses over global tokens.
    Measured: policy loss within 4e-4 relative (1e-7 absolute), value loss within 1e-6; with
    advantages whitened per process instead, the first policy loss is 4% off and this fails."""
    rows = [{"prompt": f"Tell me about item {i}" + " please" * (i % 4) + "."} for i in range(32)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["ppo", "--model", tiny_dir, "--data", str(data), "--max-steps", "3", "--batch-size", "4",
              "--rollout-batch-size", "8", "--mini-batch-size", "8", "--ppo-epochs", "2", "--temperature", "0",
              "--max-new-tokens", "6", "--reward-fn", "rule_rewards:total_length", "--lr", "1e-3",
              "--report-to", "none"]
    cwd = os.getcwd()
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__))))  # rule_rewards is importable from here
    try:
        launch(1, [*common, "--output-dir", str(tmp_path / "one")])
        launch(2, [*common, "--output-dir", str(tmp_path / "two")])
    finally:
        os.chdir(cwd)

    def curves(d):
        rows = [json.loads(x) for x in open(tmp_path / d / "metrics.jsonl") if "loss/policy" in x]
        return [[r[k] for k in ("loss/policy", "val/loss", "objective/scores", "objective/kl")] for r in rows]

    one, two = curves("one"), curves("two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=1e-3, abs=1e-5), (one, two)


@pytest.mark.parametrize("recipe", ["rm", "ppo", "grpo"])
def test_rm_ppo_grpo_run_on_two_processes(recipe, tiny_dir, tmp_path):
    if recipe == "rm":
        rows = [{"prompt": f"Help {i}.", "chosen": " Sure, here it is.", "rejected": " No."} for i in range(32)]
        extra = []
    else:
        rows = [{"prompt": f"Tell me about item {i}."} for i in range(32)]
        extra = ["--reward-fn", "rule_rewards:vowel_fraction", "--max-new-tokens", "8", "--rollout-batch-size", "8",
                 "--mini-batch-size", "8"] + (["--num-generations", "2"] if recipe == "grpo" else [])
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [recipe, "--model", tiny_dir, "--data", str(data), "--max-steps", "2", "--batch-size", "4", "--report-to",
            "none", "--output-dir", str(tmp_path / "out"), "--save-every", "2", *extra]
    cwd = os.getcwd()
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__))))  # rule_rewards is importable from here
    try:
        launch(2, args)
    finally:
        os.chdir(cwd)
    assert os.path.exists(tmp_path / "out" / "model.safetensors")
    assert os.path.isdir(tmp_path / "out" / "checkpoints" / "step-00000002")


API_SCRIPT = """
import json, os, random, sys

import rlhf

rng = random.Random(0)
rows = [{"prompt": f"Question {i}?", "completion": " answer" * rng.randint(1, 8)} for i in range(64)]
per_device = int(sys.argv[3])
stop_on_rank_1 = lambda step, metrics: os.environ.get("RANK") == "1" and step == 2  # noqa: E731
result = rlhf.sft(sys.argv[1], data=rows, output_dir=sys.argv[2], max_steps=4, per_device_train_batch_size=per_device,
                  learning_rate=5e-3, report_to="none", max_length=64, callbacks=[stop_on_rank_1])
print("RESULT", json.dumps({"rank": int(os.environ.get("RANK", 0)), "loss": result.metrics["train/loss"],
                            "path": result.model_path}))
"""


def test_a_python_script_under_accelerate_launch_keeps_the_cli_semantics(tiny_dir, tmp_path):
    """The same script with per_device_train_batch_size 4 on two processes and 8 on one: the global batch
    is 8 either way, so the losses agree; every process gets the result, and only the main one writes.
    A callback that asks to stop on process 1 alone stops both (at step 2), rather than leaving one waiting."""
    script = tmp_path / "train.py"
    script.write_text(API_SCRIPT)
    runs = {}
    for n, per_device in ((1, 8), (2, 4)):
        out = tmp_path / f"p{n}"
        cmd = ([sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIG, "--num_processes", "2",
                "--main_process_port", str(free_port())] if n == 2 else [sys.executable])
        done = subprocess.run([*cmd, str(script), tiny_dir, str(out), str(per_device)], capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        # The processes share stdout, so their lines may interleave ("RESULTRESULT {...}\n {...}"): read the objects.
        results = [json.loads(m) for m in re.findall(r'\{"rank": [^{}]*\}', done.stdout)]
        assert sorted(r["rank"] for r in results) == list(range(n)), done.stdout[-2000:]
        assert done.stdout.count(f"saved model to {out}") == 1
        assert {r["path"] for r in results} == {str(out)} and (out / "config.json").exists()
        rows = {r["step"]: r["train/loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "train/loss" in r}
        assert list(rows) == ([1, 2, 3, 4] if n == 1 else [1, 2])  # no RANK 1 in one process: no stop
        assert {r["loss"] for r in results} == {rows[max(rows)]}  # every process: the main one's metrics
        runs[n] = rows[2]
    assert runs[2] == pytest.approx(runs[1], rel=1e-5)


def test_grpo_metrics_on_two_processes_are_the_whole_batchs(tiny_dir, tmp_path):
    """Issue 22: reward, reward_std and completions/* were process 0's alone (every reward a multiple of 1/16
    for 32 completions). A reward fixed by the prompt makes the step's values known on any process count.
    Item 5: each reward function's mean and std are the whole batch's, one returning None on some prompts too
    (the mean of the processes' means was not, and a process where it never applied logged no key)."""
    rows = [{"prompt": f"Tell me about item {i}."} for i in range(32)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["grpo", "--model", tiny_dir, "--data", str(data), "--max-steps", "2", "--batch-size", "4",
              "--report-to", "none", "--reward-fn", "rule_rewards:item_number,rule_rewards:item_number_of_threes",
              "--max-new-tokens", "4",
              "--rollout-batch-size", "8", "--mini-batch-size", "8", "--num-generations", "2"]
    cwd = os.getcwd()
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__))))
    try:
        launch(1, [*common, "--output-dir", str(tmp_path / "one")])
        launch(2, [*common, "--output-dir", str(tmp_path / "two")])
    finally:
        os.chdir(cwd)

    def logged(d):
        return [json.loads(x) for x in open(tmp_path / d / "metrics.jsonl") if '"reward"' in x]

    one, two = logged("one"), logged("two")
    for a, b in zip(one, two):
        for key in ("reward", "reward_std", "frac_reward_zero_std", "rewards/rule_rewards:item_number",
                    # item 5: each function's mean and std over the whole batch, its Nones left out
                    *(f"rewards/rule_rewards:{f}/{s}" for f in ("item_number", "item_number_of_threes")
                      for s in ("mean", "std"))):
            assert b[key] == pytest.approx(a[key], abs=1e-6), (key, a[key], b[key])


def test_reward_ensemble_on_two_processes_follows_one_process(tiny_dir, tmp_path):
    """`rlhf rm --ensemble 2` under 2 processes trains each member on both (one process would train it
    alone, and the two collide on the directory lock): each member's losses are one process's."""
    rows = [{"prompt": f"Help {i}.", "chosen": " Sure, here it is" * (1 + i % 3), "rejected": " No."} for i in range(32)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["rm", "--model", tiny_dir, "--data", str(data), "--max-steps", "2", "--batch-size", "8", "--lr", "5e-3",
              "--report-to", "none", "--max-length", "64", "--ensemble", "2"]
    launch(1, [*common, "--output-dir", str(tmp_path / "one")])
    launch(2, [*common, "--output-dir", str(tmp_path / "two")])
    for member in ("member-0", "member-1"):
        one, two = losses(tmp_path / "one" / member), losses(tmp_path / "two" / member)
        assert len(one) == 2 and two == pytest.approx(one, rel=1e-5), (member, one, two)
    assert os.path.exists(tmp_path / "two" / "ensemble.json")


def test_a_hung_process_ends_the_run_in_one_line_after_the_ddp_timeout(tiny_dir, tmp_path):
    """One process stalls (its reward function sleeps ten minutes): the other's next collective gives up after
    --ddp-timeout 5 s, and the run ends in one line naming it (without the timeout, subprocess.run's 120 s
    would run out first)."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Tell me about item {i}."}) + "\n" for i in range(8)))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIG, "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "rlhf.cli", "grpo", "--model", tiny_dir, "--data", str(data),
           "--reward-fn", "rule_rewards:stalls_on_rank_1", "--num-generations", "2", "--rollout-batch-size", "4",
           "--mini-batch-size", "8", "--batch-size", "8", "--max-new-tokens", "4", "--max-steps", "1",
           "--report-to", "none", "--ddp-timeout", "5", "--output-dir", str(tmp_path / "out")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=os.path.dirname(__file__))
    assert out.returncode != 0
    lines = [x for x in out.stderr.splitlines() if x.startswith("rlhf grpo: error:")]
    assert lines == ["rlhf grpo: error: a collective across processes waited --ddp-timeout 5 s and timed out: another "
                     "process stopped, hung, or ran other steps"], out.stderr[-3000:]
    assert not os.path.exists(tmp_path / "out" / "config.json")
