"""Every recipe sharded: FSDP2 and DeepSpeed ZeRO-3 on two CPU processes over gloo (``make test-sharded``).

FSDP2: accelerate's FSDP path, reached on CPU (``rlhf.training.setup.fsdp_on_cpu``), with the config in
``configs/accelerate/fsdp_cpu_2proc.yaml``. ZeRO-3: DeepSpeed's CPU accelerator over gloo
(``rlhf.training.setup.make_accelerator``), with a config whose ``stage3_param_persistence_threshold`` is 0,
so that even the tiny model's parameters are partitioned (at DeepSpeed's default of 1e5 elements they
would all stay whole); the shipped ZeRO-3 configs run once each. SFT, RM and DPO follow the one-process
loss trajectory (the global batch and the data order are the same; 1e-5 relative, as the DDP test asks);
PPO and GRPO run, checkpoint, save a model that loads, and resume. Marked ``sharded``.
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


def launch(config: str | None, args: list[str], launch_args: tuple[str, ...] = (), ok: bool = True) -> str:
    """``rlhf`` on one process (config None) or under ``accelerate launch --config_file`` (a name in
    configs/accelerate, or a path); stdout, or with ``ok=False`` the failed run's stderr."""
    cmd = ([sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(CONFIGS, config),
            *launch_args, "--main_process_port", str(free_port()), "-m", "rlhf.cli", *args] if config else
           [sys.executable, "-m", "rlhf.cli", *args])
    env = {**os.environ, "PYTHONWARNINGS": "ignore::FutureWarning"}  # DeepSpeed's calls of deprecated collectives
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=HERE, env=env)  # rule_rewards
    assert (out.returncode == 0) == ok, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout if ok else out.stderr


ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                               "stage3_gather_16bit_weights_on_model_save": True},
         "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1, "gradient_clipping": 1.0}


@pytest.fixture(scope="session")
def zero3_config(tmp_path_factory) -> str:
    """An accelerate config for ZeRO-3 on 2 processes whose every parameter is partitioned."""
    pytest.importorskip("deepspeed", reason="ZeRO-3 needs the deepspeed extra (make test-sharded installs it)")
    d = tmp_path_factory.mktemp("zero3")
    (d / "ds.json").write_text(json.dumps(ZERO3))
    (d / "accelerate.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_machines: 1\nnum_processes: 2\n"
        f"machine_rank: 0\ndeepspeed_config:\n  deepspeed_config_file: {d / 'ds.json'}\n  zero3_init_flag: true\n")
    return str(d / "accelerate.yaml")


@pytest.fixture(params=["fsdp", "zero3"])
def engine(request) -> tuple[str, str]:
    """(config, the line that says the engine ran) for each sharded engine."""
    if request.param == "fsdp":
        return "fsdp_cpu_2proc.yaml", "accelerate FSDP, processes: 2"
    return request.getfixturevalue("zero3_config"), "accelerate DEEPSPEED, processes: 2"


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


@pytest.mark.parametrize("recipe", ["sft", "rm", "dpo", "dpo --optim adamw_torch_fused"])
def test_sharded_follows_one_process(recipe, engine, tiny_dir, tmp_path):
    """The loss curve, and the saved model: gathered from both processes' shards, loadable, equal to
    the one-process model to float32 rounding. Two micro-batches a step: under ZeRO-3 the engine steps
    once per step, not per micro-batch. The fused AdamW (TRL's optimizer) steps over the engines' shards too."""
    recipe, *extra = recipe.split()
    kind = "sft" if recipe == "sft" else "pairs"
    # 17 held-out examples, 8 a batch: 9 and 8 a process, as many forwards each (or the one with more waits).
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(open(data(tmp_path, kind)).readlines()[:17]))
    common = [recipe, "--model", tiny_dir, "--data", data(tmp_path, kind), "--eval-data", str(held_out),
              "--eval-every", "2", "--max-steps", "4", "--batch-size", "8", "--grad-accum", "2", "--lr", "5e-3",
              "--report-to", "none", "--max-length", "64", "--save-every", "2", *extra]
    launch(None, [*common, "--output-dir", str(tmp_path / "one")])
    out = launch(engine[0], [*common, "--output-dir", str(tmp_path / "two")])
    assert engine[1] in out, out[-2000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, rel=1e-5), (one, two)
    evals = [{k: v for r in metrics(tmp_path / d) for k, v in r.items() if k.startswith("eval/") and r["step"] == 4}
             for d in ("one", "two")]
    assert evals[0] and evals[1] == pytest.approx(evals[0], rel=1e-5, abs=1e-6), evals
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
    "grpo-generate": ["grpo", *RL, "--num-generations", "2", "--rollout-engine", "generate"],  # synced_gpus
    "ppo": ["ppo", *RL],
    "ppo-separate-critic": ["ppo", *RL, "--critic", "separate"],
    "sft-lora": ["sft", "--lora", "--lora-r", "4", "--batch-size", "8", "--lr", "5e-3", "--max-length", "64"],
}


def metrics(d) -> list[dict]:
    rows = [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))]
    return [r for r in rows if "step" in r and "event" not in r]


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_runs_saves_and_resumes_exactly(case, engine, tiny_dir, tmp_path):
    """Three steps with a checkpoint after each; the saved model loads. Then the run is resumed from
    its step-2 checkpoint and must log step 3 exactly as before."""
    import shutil

    from transformers import AutoModelForCausalLM

    args = CASES[case]
    common = [*args[:1], "--model", tiny_dir, "--data", data(tmp_path, "sft" if args[0] == "sft" else "prompts"),
              *args[1:], "--max-steps", "3", "--save-every", "1", "--report-to", "none", "--seed", "3"]
    out = launch(engine[0], [*common, "--output-dir", str(tmp_path / "a")])
    assert engine[1] in out, out[-2000:]
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "a")) is not None  # LoRA merged, gathered whole
    if case == "ppo-separate-critic":
        assert os.path.exists(tmp_path / "a" / "critic" / "model.safetensors")
    if case == "grpo":  # DDP's processes sample what the sharded ones do: every logged number must agree
        launch("cpu_ddp_2proc.yaml", [*common, "--output-dir", str(tmp_path / "ddp")])
        for ddp, sharded in zip(metrics(tmp_path / "ddp"), metrics(tmp_path / "a")):
            for k in ("loss", "grad_norm", "reward", "entropy"):  # grad_norm missed FSDP's root parameters
                assert sharded[k] == pytest.approx(ddp[k], rel=1e-5, abs=1e-7), (sharded["step"], k, ddp[k], sharded[k])
    # Resume: the run directory as it was after step 2.
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-00000002", tmp_path / "step2")
    launch(engine[0], [*common, "--output-dir", str(tmp_path / "b"), "--resume", str(tmp_path / "step2")])
    last = {k: v for k, v in metrics(tmp_path / "a")[-1].items() if not k.startswith(("time/", "speed/")) and not k.endswith("_per_second")}
    again = {k: v for k, v in metrics(tmp_path / "b")[-1].items() if not k.startswith(("time/", "speed/")) and not k.endswith("_per_second")}
    assert again == last, {k: (last.get(k), again.get(k)) for k in last.keys() | again.keys() if last.get(k) != again.get(k)}


@pytest.mark.parametrize("config,launch_args", [
    ("deepspeed_zero3_cpu_2proc.yaml", ()),
    # The multi-node GPU config, as written but for its size, address and bf16.
    ("deepspeed_zero3.yaml", ("--num_machines", "1", "--num_processes", "2", "--machine_rank", "0",
                              "--main_process_ip", "127.0.0.1", "--mixed_precision", "no")),
])
def test_shipped_zero3_configs_run(config, launch_args, tiny_dir, tmp_path):
    """The ZeRO-3 configs in configs/accelerate load and train as written: DPO follows one process."""
    pytest.importorskip("deepspeed", reason="ZeRO-3 needs the deepspeed extra (make test-sharded installs it)")
    common = ["dpo", "--model", tiny_dir, "--data", data(tmp_path, "pairs"), "--max-steps", "2", "--batch-size", "8",
              "--grad-accum", "2", "--lr", "5e-3", "--report-to", "none", "--max-length", "64"]
    launch(None, [*common, "--output-dir", str(tmp_path / "one")])
    out = launch(config, [*common, "--output-dir", str(tmp_path / "two")], launch_args)
    assert "accelerate DEEPSPEED, processes: 2" in out, out[-2000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
