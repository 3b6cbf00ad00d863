"""Every recipe sharded: FSDP2 on two CPU processes over gloo (``make test-sharded``).

accelerate's FSDP path, reached on CPU (``rlhf.training.setup.fsdp_on_cpu``), with the config in
``configs/accelerate/fsdp_cpu_2proc.yaml``. SFT, RM and DPO follow the one-process loss trajectory
(the global batch and the data order are the same; 1e-5 relative, as the DDP test asks); PPO and GRPO
run, checkpoint, save a model that loads, and resume. Marked ``sharded``.
"""

import json
import os
import random
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from test_distributed import free_port, losses

pytestmark = pytest.mark.sharded
HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(os.path.dirname(HERE), "configs", "accelerate")
TIMEOUT = 300  # seconds a launch may take; a hung collective fails the test with the processes' output


def launch(config: str | None, args: list[str]) -> str:
    """``rlhf`` on one process (config None) or under ``accelerate launch --config_file``."""
    cmd = ([sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(CONFIGS, config),
            "--main_process_port", str(free_port()), "-m", "rlhf.cli", *args] if config else
           [sys.executable, "-m", "rlhf.cli", *args])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=HERE)  # rule_rewards importable
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def data(tmp_path, kind: str) -> str:
    rng = random.Random(0)
    if kind == "sft":
        rows = [{"prompt": f"Question {i}?", "completion": " answer" * rng.randint(1, 8)} for i in range(64)]
    elif kind == "pairs":
        rows = [{"prompt": f"Help {i}.", "chosen": " Sure, here it is" * rng.randint(1, 3), "rejected": " No."}
                for i in range(64)]
    else:
        rows = [{"prompt": f"Tell me about item {i}" + " please" * (i % 4) + "."} for i in range(32)]
    path = tmp_path / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def weights(d) -> dict:
    return load_file(os.path.join(d, "model.safetensors"))


@pytest.mark.parametrize("recipe", ["sft", "rm", "dpo"])
def test_fsdp2_follows_one_process(recipe, tiny_dir, tmp_path):
    """The loss curve, and the saved model: gathered from both processes' shards, loadable, equal to
    the one-process model to float32 rounding."""
    common = [recipe, "--model", tiny_dir, "--data", data(tmp_path, "sft" if recipe == "sft" else "pairs"),
              "--max-steps", "4", "--batch-size", "8", "--grad-accum", "2", "--lr", "5e-3", "--report-to", "none",
              "--max-length", "64", "--save-every", "2"]
    launch(None, [*common, "--output-dir", str(tmp_path / "one")])
    out = launch("fsdp_cpu_2proc.yaml", [*common, "--output-dir", str(tmp_path / "two")])
    assert "accelerate FSDP, processes: 2" in out, out[-2000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, rel=1e-5), (one, two)
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    for k in w1:
        assert (w1[k] - w2[k]).abs().max() <= 1e-4 * max(1.0, float(w1[k].abs().max())), k
    assert os.path.isdir(tmp_path / "two" / "checkpoints" / "step-00000004")


RL = ["--reward-fn", "rule_rewards:vowel_fraction", "--max-new-tokens", "6", "--rollout-batch-size", "8",
      "--mini-batch-size", "8", "--batch-size", "4", "--lr", "1e-3"]
CASES = {  # name: the command's arguments after --model and --data
    "grpo": ["grpo", *RL, "--num-generations", "2"],
    "grpo-lora": ["grpo", *RL, "--num-generations", "2", "--lora", "--lora-r", "4"],
    "ppo": ["ppo", *RL],
    "ppo-separate-critic": ["ppo", *RL, "--critic", "separate"],
    "sft-lora": ["sft", "--lora", "--lora-r", "4", "--batch-size", "8", "--lr", "5e-3", "--max-length", "64"],
}


def metrics(d) -> list[dict]:
    rows = [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))]
    return [r for r in rows if "step" in r and "event" not in r]


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_runs_saves_and_resumes_exactly(case, tiny_dir, tmp_path):
    """Three steps with a checkpoint after each; the saved model loads. Then the run is resumed from
    its step-2 checkpoint and must log step 3 exactly as before."""
    import shutil

    from transformers import AutoModelForCausalLM

    args = CASES[case]
    common = [*args[:1], "--model", tiny_dir, "--data", data(tmp_path, "sft" if args[0] == "sft" else "prompts"),
              *args[1:], "--max-steps", "3", "--save-every", "1", "--report-to", "none", "--seed", "3"]
    out = launch("fsdp_cpu_2proc.yaml", [*common, "--output-dir", str(tmp_path / "a")])
    assert "accelerate FSDP, processes: 2" in out, out[-2000:]
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "a")) is not None  # LoRA merged, gathered whole
    if case == "ppo-separate-critic":
        assert os.path.exists(tmp_path / "a" / "critic" / "model.safetensors")
    # Resume: the run directory as it was after step 2.
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-00000002", tmp_path / "step2")
    launch("fsdp_cpu_2proc.yaml", [*common, "--output-dir", str(tmp_path / "b"), "--resume", str(tmp_path / "step2")])
    last = {k: v for k, v in metrics(tmp_path / "a")[-1].items() if not k.startswith(("time/", "speed/")) and not k.endswith("_per_second")}
    again = {k: v for k, v in metrics(tmp_path / "b")[-1].items() if not k.startswith(("time/", "speed/")) and not k.endswith("_per_second")}
    assert again == last, {k: (last.get(k), again.get(k)) for k in last.keys() | again.keys() if last.get(k) != again.get(k)}
