"""What a TRL user expects (issue 14): TRL's flag and YAML names, trackers through accelerate,
one progress line a step off a terminal, a metrics file that cannot be written, byte-order marks."""

import json

import pytest
import yaml


def cli(capsys, *args):
    """``rlhf ARGS`` in this process; returns (exit status, stdout lines, stderr lines)."""
    from rlhf.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    progress_bars = ("Loading weights", "Writing model")
    err = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not line.startswith(progress_bars)]
    return rc, out.splitlines(), err


def printed_config(capsys, *args) -> dict:
    rc, out, err = cli(capsys, *args, "--print-config")
    assert rc == 0, err
    return yaml.safe_load("\n".join(out))


# ---- 1. TRL's names, as flags and as YAML keys ------------------------------------------------

TRL_FLAGS = [
    ("sft", ["--model_name_or_path", "m", "--dataset_name", "d.jsonl", "--learning_rate", "3e-4",
             "--gradient_accumulation_steps", "4", "--num_train_epochs", "3", "--use_peft", "--lora_r", "8",
             "--lora_alpha", "16", "--max_length", "64", "--max_prompt_length", "32", "--logging_steps", "5",
             "--save_steps", "10", "--save_total_limit", "1", "--eval_steps", "20", "--lr_scheduler_type", "cosine",
             "--warmup_ratio", "0.1", "--weight_decay", "0.01", "--max_grad_norm", "0.5", "--seed", "3",
             "--report_to", "none", "--gradient_checkpointing", "--bf16", "false", "--output_dir", "o",
             "--resume_from_checkpoint", "--per_device_train_batch_size", "2", "--max_seq_length", "48",
             "--optim", "adamw_torch_fused"],
     {"model": "m", "data": "d.jsonl", "lr": 3e-4, "grad_accum": 4, "epochs": 3, "lora": True, "lora_r": 8,
      "lora_alpha": 16, "max_length": 48, "max_prompt_length": 32, "log_every": 5, "save_every": 10,
      "save_total_limit": 1, "eval_every": 20, "lr_scheduler": "cosine", "warmup_ratio": 0.1, "weight_decay": 0.01,
      "max_grad_norm": 0.5, "seed": 3, "report_to": "none", "gradient_checkpointing": True, "bf16": False,
      "output_dir": "o", "resume": "auto", "batch_size": 2, "optim": "adamw_torch_fused"}),
    ("grpo", ["--model", "m", "--data", "p.jsonl", "--max_completion_length", "7", "--num_generations", "2",
              "--beta", "0.1", "--epsilon", "0.3", "--epsilon_high", "0.4", "--num_iterations", "2",
              "--max_new_tokens", "9"],  # ours with underscores, given last, wins
     {"max_new_tokens": 9, "num_generations": 2, "beta": 0.1, "clip_eps": 0.3, "clip_eps_high": 0.4,
      "ppo_epochs": 2}),
    ("ppo", ["--model", "m", "--data", "p.jsonl", "--reward_model_path", "rm", "--response_length", "7",
             "--cliprange", "0.1", "--cliprange_value", "0.3", "--num_ppo_epochs", "2", "--kl_coef", "0.2",
             "--resume_from_checkpoint", "ck"],
     {"reward_model": "rm", "max_new_tokens": 7, "clip_eps": 0.1, "clip_eps_value": 0.3, "ppo_epochs": 2,
      "kl_coef": 0.2, "resume": "ck"}),
    ("dpo", ["--model", "m", "--data", "d.jsonl", "--beta", "0.2", "--loss_type", "robust",
             "--precompute_ref_log_probs", "False", "--label_smoothing", "0.1"],
     {"beta": 0.2, "loss_type": "robust", "precompute_ref": False, "label_smoothing": 0.1}),
    ("rm", ["--model", "m", "--data", "d.jsonl", "--per_device_train_batch_size", "4", "--use_peft", "true"],
     {"batch_size": 4, "lora": True}),
]


@pytest.mark.parametrize("flags,expected", [
    (["--resume_from_checkpoint", "true"], {"resume": "auto"}),  # before: resume 'true', a missing directory
    (["--resume_from_checkpoint", "false"], {"resume": None}),
    (["--resume_from_checkpoint"], {"resume": "auto"}),
    (["--num_train_epochs", "3.0"], {"epochs": 3}),  # TRL's field is a float
])
def test_trl_values_in_our_terms(flags, expected, capsys):
    cfg = printed_config(capsys, "sft", "--model", "m", "--data", "d.jsonl", *flags)
    assert {k: cfg[k] for k in expected} == expected


@pytest.mark.parametrize("recipe,flags,expected", TRL_FLAGS, ids=[r for r, _, _ in TRL_FLAGS])
def test_trl_flag_names_set_our_fields(recipe, flags, expected, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = printed_config(capsys, recipe, *flags)
    assert {k: cfg[k] for k in expected} == expected


@pytest.mark.parametrize("recipe,flags,expected", TRL_FLAGS, ids=[r for r, _, _ in TRL_FLAGS])
def test_trl_names_as_yaml_keys(recipe, flags, expected, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    keys, i = {}, 0
    while i < len(flags):  # the same settings as a YAML mapping (a bare bool flag is true)
        name = flags[i][2:]
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            keys[name], i = flags[i + 1], i + 2
        else:
            keys[name], i = True, i + 1  # resume_from_checkpoint: true is the latest checkpoint
    import importlib

    from rlhf.cli import RECIPES
    from rlhf.training.options import spellings

    known = spellings(importlib.import_module(RECIPES[recipe][0]).Config)
    last = {known[k]: k for k in keys}  # a flag given twice: the last counts; in YAML one key a field
    path = tmp_path / "trl.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in keys.items() if last[known[k]] == k}))
    cfg = printed_config(capsys, recipe, "--config", path)
    assert {k: cfg[k] for k in expected} == expected


def test_per_device_batch_size_is_multiplied_by_the_processes(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")  # as accelerate launch / torchrun set it
    assert printed_config(capsys, "sft", "--model", "m", "--per_device_train_batch_size", "2")["batch_size"] == 8
    rc, _, err = cli(capsys, "sft", "--model", "m", "--per_device_train_batch_size", "2", "--batch-size", "8",
                     "--print-config")
    assert rc == 1 and err == ["rlhf sft: error: --per_device_train_batch_size and --batch-size both given; "
                               "use --batch-size"]


def test_trl_negative_bools_and_yaml_keys_that_collide(capsys, tmp_path):
    cfg = printed_config(capsys, "sft", "--model", "m", "--no_bf16", "--no_use_peft", "--no_gradient_checkpointing")
    assert (cfg["bf16"], cfg["lora"], cfg["gradient_checkpointing"]) == (False, False, False)
    path = tmp_path / "c.yaml"
    path.write_text("model: m\nbatch_size: 3\nper_device_train_batch_size: 2\n")
    rc, _, err = cli(capsys, "sft", "--config", path, "--print-config")
    assert rc == 1 and err == [f"rlhf sft: error: {path}: 'per_device_train_batch_size' sets 'batch_size', which "
                               "another key set already"]


def test_a_hub_dataset_name_reads_the_hub(capsys, tmp_path):
    assert printed_config(capsys, "sft", "--model", "m", "--dataset_name", "trl-lib/Capybara")["data"] == \
        "hf:trl-lib/Capybara"
    local = tmp_path / "d.jsonl"
    local.write_text("{}\n")
    assert printed_config(capsys, "sft", "--model", "m", "--dataset_name", local)["data"] == str(local)


@pytest.mark.parametrize("recipe,flags,message", [
    ("sft", ["--learnig-rate", "1e-3"], "unknown flag --learnig-rate; did you mean --lr?"),
    ("sft", ["--learnig_rate=1e-3"], "unknown flag --learnig_rate; did you mean --lr?"),
    ("sft", ["--max-new-tokens", "5"], "unknown flag --max-new-tokens"),
    ("grpo", ["--num_generation", "2"], "unknown flag --num_generation; did you mean --num-generations?"),
    # no prefix matching: a shortened flag is a typo, not silently another flag
    ("sft", ["--max-step", "3"], "unknown flag --max-step; did you mean --max-steps?"),
    ("sft", ["--lr-sched", "cosine"], "unknown flag --lr-sched; did you mean --lr-scheduler?"),
    ("sft", ["--push_to_hub"], "--push_to_hub (TRL/transformers) is not supported by rlhf sft: upload the final "
                               "model yourself (it is an HF-format directory)"),
    ("sft", ["--warmup_steps", "10"], "--warmup_steps (TRL/transformers) is not supported by rlhf sft: "
                                      "use --warmup-ratio"),
    ("dpo", ["--max_completion_length", "64"], "--max_completion_length (TRL's name for --max-new-tokens) has "
                                               "no meaning in rlhf dpo"),
    ("sft", ["--bf16", "maybe"], "unexpected argument 'maybe'"),
])
def test_unknown_flags_are_one_line_naming_ours(recipe, flags, message, capsys):
    rc, out, err = cli(capsys, recipe, "--model", "m", *flags, "--print-config")
    assert (rc, err, out) == (2, [f"rlhf {recipe}: error: {message}"], [])


def test_unknown_yaml_keys_name_ours(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\nlearnig_rate: 0.1\n")
    rc, _, err = cli(capsys, "sft", "--config", path, "--print-config")
    assert rc == 1 and err == [f"rlhf sft: error: {path}: unknown field 'learnig_rate'; did you mean lr?"]
    path.write_text("model: m\npush_to_hub: true\n")
    rc, _, err = cli(capsys, "sft", "--config", path, "--print-config")
    assert rc == 1 and len(err) == 1 and "'push_to_hub' (TRL/transformers) is not supported by rlhf sft" in err[0]


def test_help_hides_the_aliases_and_says_where_they_are(capsys):
    rc, out, _ = cli(capsys, "sft", "--help")
    text = "\n".join(out)
    assert rc == 0 and "--learning_rate" in text and "README" in text  # the epilog line
    assert "--learning_rate LEARNING_RATE" not in text and "--max_length" not in text


# ---- shared by the runs below ---------------------------------------------------------------------

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sft_data(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Paint the box {c}.", "completion": f" The box is {c}."}
                                              for c in ["red", "blue", "green", "pink"] * 4])


def sft_args(tiny_dir, data, out, *extra):
    return ["sft", "--model", tiny_dir, "--data", data, "--output-dir", out, "--batch-size", 4, "--lr", "1e-2",
            "--max-length", 48, "--report-to", "none", *extra]


# ---- 2. --report-to through accelerate's trackers -------------------------------------------------

@pytest.mark.parametrize("report_to,message", [
    ("foo", "--report-to foo: not a tracker accelerate knows; valid: aim, comet_ml, mlflow, tensorboard, wandb, "
            "clearml, dvclive, swanlab, trackio, all, none"),
    ("tensorboard,foo", "--report-to foo: not a tracker accelerate knows; valid: "),
])
def test_report_to_names_accelerate_does_not_know_are_refused(report_to, message, capsys):
    rc, _, err = cli(capsys, "sft", "--model", "m", "--report-to", report_to, "--print-config")
    assert rc == 1 and len(err) == 1 and err[0].startswith(f"rlhf sft: error: {message}"), err


@pytest.mark.parametrize("tracker,package", [("mlflow", "mlflow"), ("comet_ml", "comet-ml"), ("aim", "aim"),
                                             ("dvclive", "dvclive"), ("trackio", "trackio")])
def test_a_known_tracker_whose_package_is_missing_is_refused_before_loading(tracker, package, capsys):
    from accelerate.tracking import get_available_trackers

    if tracker in {str(t) for t in get_available_trackers()}:
        pytest.skip(f"{package} is installed here")
    rc, _, err = cli(capsys, "sft", "--model", "m", "--report-to", tracker, "--print-config")  # no model loaded
    assert rc == 1 and err == [f"rlhf sft: error: --report-to {tracker}: {tracker} is not installed "
                               f"(pip install {package})"]


def test_installed_trackers_and_all_are_accepted(capsys):
    for report_to in ("tensorboard", "all", "none", "tensorboard,none"):
        assert printed_config(capsys, "sft", "--model", "m", "--report-to", report_to)["report_to"] == report_to


def test_tracker_config_is_flat_and_tensorboard_takes_it(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from rlhf.recipes import grpo
    from rlhf.training.logs import flat_config

    cfg = grpo.Config(model="m", data="p.jsonl", reward_fn="a:b")
    flat = flat_config(cfg)
    assert flat["eval_data"] == "none" and flat["lr"] == 1e-6 and flat["share_prompt"] is True
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())
    with SummaryWriter(str(tmp_path)) as w:  # raises on a None, a list or a dict
        w.add_hparams(flat, metric_dict={})

    import dataclasses

    @dataclasses.dataclass  # what a config with a list or a mapping would become
    class C:
        a: list = dataclasses.field(default_factory=lambda: ["q_proj", "v_proj"])
        b: dict = dataclasses.field(default_factory=lambda: {"x": 1, "y": None})

    assert flat_config(C()) == {"a": "q_proj,v_proj", "b.x": 1, "b.y": "none"}


def test_tensorboard_through_accelerate_writes_into_output_dir(tmp_path, tiny_dir, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    args = sft_args(tiny_dir, sft_data(tmp_path), out, "--max-steps", 3, "--save-every", 2)
    args[args.index("--report-to") + 1] = "tensorboard"
    rc, _, err = cli(capsys, *args)
    assert rc == 0, err
    run_dir = out / "tensorboard" / "rlhf"
    assert list(run_dir.glob("*/hparams.yml")), "accelerate's tracker stores the config"
    hparams = yaml.safe_load(next(run_dir.glob("*/hparams.yml")).read_text())
    assert hparams["lr"] == 1e-2 and hparams["eval_data"] == "none"
    events = EventAccumulator(str(run_dir)).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    # Resumed: the same directory, the steps after the checkpoint once more.
    rc, _, err = cli(capsys, *[a if a != 3 else 4 for a in args], "--resume")
    assert rc == 0, err
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    assert steps == [1, 2, 3, 4]
    assert {e.step for e in EventAccumulator(str(run_dir)).Reload().Scalars("train/loss")} == {1, 2, 3, 4}


# ---- 3. one line a logging step off a terminal; where the model went ------------------------------

STEP_LINE = r"step {}/{}  loss \S+  lr \S+  \d+\.\d s"


def test_progress_is_one_line_a_logging_step_when_stderr_is_no_terminal(tmp_path, tiny_dir, capsys):
    import re

    out = tmp_path / "out"
    rc, lines, err = cli(capsys, *sft_args(tiny_dir, sft_data(tmp_path), out, "--max-steps", 4, "--log-every", 2))
    assert rc == 0, err
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 2 and all(re.fullmatch(STEP_LINE.format(s, 4), line) for s, line in zip((2, 4), steps)), lines
    assert lines[-1] == f"saved model to {out}"
    assert not any("it/s" in line for line in err)  # no tqdm bar either


def test_progress_keeps_the_bar_on_a_terminal(tmp_path, tiny_dir, capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    rc, lines, err = cli(capsys, *sft_args(tiny_dir, sft_data(tmp_path), tmp_path / "out", "--max-steps", 2))
    assert rc == 0, err
    assert not [line for line in lines if line.startswith("step ")]
    assert any("2/2" in line for line in err), err


def test_progress_line():
    from rlhf.training.logs import progress_line

    assert progress_line(3, 10, {"loss": 1.23449}, 1e-5, 12.34) == "step 3/10  loss 1.234  lr 1e-05  12.3 s"
    assert progress_line(1, 2, {"reward": 0.5, "kl": 0.01}, None, 0.04) == "step 1/2  reward 0.5  kl 0.01  0.0 s"


def pairs_data(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Is the box {c}?", "chosen": " Yes, it is.",
                                                  "rejected": " No."} for c in ["red", "blue", "green", "pink"] * 2])


def prompts_data(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say something about item {i}."} for i in range(8)])


@pytest.mark.parametrize("recipe", ["rm", "dpo", "grpo", "ppo"])
def test_every_recipe_ends_naming_where_the_model_went(recipe, tmp_path, tiny_dir, capsys):
    out = tmp_path / recipe
    common = ["--model", tiny_dir, "--output-dir", out, "--max-steps", 1, "--batch-size", 4, "--report-to", "none",
              "--max-length", 48]
    online = ["--data", prompts_data(tmp_path), "--reward-fn", "rule_rewards:vowel_fraction", "--rollout-batch-size",
              2, "--mini-batch-size", 2, "--max-new-tokens", 4]
    extra = {"rm": ["--data", pairs_data(tmp_path)], "dpo": ["--data", pairs_data(tmp_path)],
             "grpo": [*online, "--num-generations", 2], "ppo": online}[recipe]
    rc, lines, err = cli(capsys, recipe, *common, *extra)
    assert rc == 0, err
    assert f"saved model to {out}" in lines and (out / "config.json").exists()
    assert any(line.startswith("step 1/1  ") for line in lines), lines


# ---- 4. metrics.jsonl cannot be written -----------------------------------------------------------

def test_disk_full_while_appending_metrics(tmp_path, tiny_dir, capsys, monkeypatch):
    import builtins
    import errno
    import os

    from rlhf.training import logs

    def full_disk_open(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(logs, "open", full_disk_open, raising=False)  # the logger's writes only
    out = tmp_path / "out"
    rc, _, err = cli(capsys, *sft_args(tiny_dir, sft_data(tmp_path), out, "--max-steps", 2))
    assert rc == 1 and err == [f"rlhf sft: error: {out}/metrics.jsonl: cannot append metrics (No space left on "
                               "device); the run stopped and no final model was written"]
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()


# ---- 5. UTF-8 with a byte-order mark ----------------------------------------------------------------

BOM = "\ufeff".encode()


@pytest.mark.parametrize("name,text", [
    ("d.jsonl", '{"prompt": "Hi", "completion": " there"}\n{"prompt": "Yo", "completion": " man"}\n'),
    ("d.json", '[{"prompt": "Hi", "completion": " there"}, {"prompt": "Yo", "completion": " man"}]'),
    ("d.csv", "prompt,completion\nHi, there\nYo, man\n"),
])
def test_data_files_with_a_byte_order_mark_are_read(name, text, tmp_path):
    from rlhf.data.readers import read_records

    path = tmp_path / name
    path.write_bytes(BOM + text.encode())
    records, errors = read_records(str(path))
    assert errors == [] and [r.data["prompt"] for r in records] == ["Hi", "Yo"]
    assert [r.data["completion"].strip() for r in records] == ["there", "man"]


def test_yaml_config_with_a_byte_order_mark_is_read(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_bytes(BOM + b"model: m\nlr: 0.25\n")
    assert printed_config(capsys, "sft", "--config", path)["lr"] == 0.25


def test_a_trl_grpo_yaml_ports_or_lists_what_it_cannot_honour_in_one_line(capsys, tmp_path):
    """Issue 22, item 3: 17 of 38 keys of an open-r1 GRPO YAML were refused, one per run."""
    path = tmp_path / "grpo.yaml"
    path.write_text(
        "model_name_or_path: m\ndataset_name: p.jsonl\nlearning_rate: 1.0e-6\nbf16: false\nfp16: false\n"
        "use_vllm: false\npush_to_hub: false\ndo_eval: false\nsave_strategy: 'no'\nmodel_revision: main\n"
        "torch_dtype: auto\nlog_completions: true\nreport_to: [tensorboard]\nloss_type: dr_grpo\n"
        "scale_rewards: false\nreward_funcs: [rule_rewards.vowel_fraction, rule_rewards.has_answer]\n"
        "reward_weights: [1.0, 0.5]\nnum_generations: 4\nmax_completion_length: 16\nbeta: 0.0\n")
    rc, out, err = cli(capsys, "grpo", "--config", path, "--print-config")
    assert rc == 0, err
    cfg = yaml.safe_load("\n".join(out))
    assert cfg["reward_fn"] == "rule_rewards:vowel_fraction:1.0,rule_rewards:has_answer:0.5"
    assert (cfg["loss_type"], cfg["scale_rewards"], cfg["report_to"], cfg["max_new_tokens"]) == ("dr_grpo", "none",
                                                                                                 "tensorboard", 16)
    assert len(err) == 1 and "ignored: fp16=False, use_vllm=False, push_to_hub=False" in err[0]
    path.write_text("model: m\nuse_vllm: true\ntop_entropy_quantile: 0.2\nwarmup_steps: 10\n")
    rc, _, err = cli(capsys, "grpo", "--config", path, "--print-config")
    assert rc == 1 and len(err) == 1 and "3 keys cannot be honoured: 'use_vllm' (TRL/transformers) is not" in err[0]
    assert "'top_entropy_quantile'" in err[0] and "use --warmup-ratio" in err[0]


def test_trl_grpo_keys_we_lack_say_why_and_their_defaults_are_kept(capsys, tmp_path):
    """Issue 22, item 3: TRL's GRPOConfig keys we lack (top_entropy_quantile, entropy_coef, ...) were refused as
    "unknown field", without why, even at TRL's values that ask for nothing."""
    path = tmp_path / "grpo.yaml"
    path.write_text("model: m\ntop_entropy_quantile: 0.2\nentropy_coef: 0.01\noff_policy_mask_threshold: 0.5\n"
                    "multi_objective_aggregation: normalize_then_sum\nuse_vllm: true\nvllm_mode: server\n"
                    "num_generaions: 4\n")
    rc, _, err = cli(capsys, "grpo", "--config", path, "--print-config")
    assert rc == 1 and len(err) == 1 and "7 keys cannot be honoured: " in err[0]
    for key, why in [("top_entropy_quantile", "not implemented: the loss on the highest-entropy tokens only"),
                     ("entropy_coef", "not implemented: no entropy bonus"),
                     ("off_policy_mask_threshold", "not implemented: DeepSeek-V3.2's masking"),
                     ("multi_objective_aggregation", "not implemented: normalize_then_sum (GDPO)"),
                     ("use_vllm", "vLLM is not used here: --rollout-engine"), ("vllm_mode", "vLLM is not used here")]:
        assert f"'{key}' (TRL/transformers) is not supported by rlhf grpo: {why}" in err[0], key
    assert "unknown field 'num_generaions'; did you mean num_generations?" in err[0]  # a typo stays a typo
    # The same keys at values that ask for nothing here: kept, and named once.
    path.write_text("model: m\nreward_funcs: rule_rewards.has_answer\ntop_entropy_quantile: 1.0\nentropy_coef: 0.0\n"
                    "off_policy_mask_threshold: null\nmulti_objective_aggregation: sum_then_normalize\n"
                    "use_vllm: false\nvllm_mode: server\nvllm_gpu_memory_utilization: 0.7\ndisable_dropout: true\n"
                    "per_device_eval_batch_size: 16\nadam_epsilon: 1e-8\nhub_token: secret\n")
    rc, _, err = cli(capsys, "grpo", "--config", path, "--print-config")
    assert rc == 0 and len(err) == 1 and "ignored: top_entropy_quantile=1.0, entropy_coef=0.0," in err[0], err
    assert "vllm_gpu_memory_utilization=0.7, disable_dropout=True" in err[0] and "secret" not in err[0]
    rc, _, err = cli(capsys, "sft", "--config", path, "--print-config")  # sft keeps the model's dropout
    assert rc == 1 and "'disable_dropout' (TRL/transformers) is not supported by rlhf sft: dropout is off in" in err[0]
    # As a flag and a Python keyword too.
    rc, _, err = cli(capsys, "grpo", "--model", "m", "--entropy_coef", "0.01")
    assert rc == 2 and err == ["rlhf grpo: error: --entropy_coef (TRL/transformers) is not supported by rlhf grpo: "
                               "not implemented: no entropy bonus in the GRPO loss (entropy is logged)"]


def test_every_trl_grpo_config_key_is_ours_or_says_why():
    """Every field of TRL's GRPOConfig (its TrainingArguments included) sets one of ours or is refused with why;
    at TRL's default it asks for nothing we lack, but for these three."""
    import dataclasses

    trl = pytest.importorskip("trl")
    from rlhf.recipes.configs.grpo import Config
    from rlhf.training.options import spellings
    from rlhf.training.trl_names import TRL_UNSUPPORTED, asks_nothing

    known, lacking, refused_defaults = spellings(Config), [], set()
    for f in dataclasses.fields(trl.GRPOConfig):
        if f.name in known or f.name == "reward_weights":  # reward_weights: one weight per reward_funcs entry
            continue
        if not TRL_UNSUPPORTED.get(f.name):
            lacking.append(f.name)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if not asks_nothing(f.name, default, {}, "grpo"):
            refused_defaults.add(f.name)
    assert lacking == []
    # dropout is off here; no MoE loss is added; the trackers' project is rlhf (ddp_timeout is ours, --ddp-timeout)
    assert refused_defaults == {"disable_dropout", "router_aux_loss_coef", "project"}
    assert not [k for k, why in TRL_UNSUPPORTED.items() if ";" in why]  # one message lists them, split by ";"


def test_reward_functions_under_trls_contract(tiny_dir, tmp_path):
    """Issue 22, item 4: None ("does not apply") was a fatal error, and a function taking completion_ids failed."""
    import math

    import torch

    import rlhf
    from rlhf.algos import group_advantages

    # By hand: group (1, None) has one scorable completion: both advantages 0; group (3, 5) is +-1/(sqrt 2 + eps).
    adv = group_advantages(torch.tensor([1.0, math.nan, 3.0, 5.0]), 2, eps=1e-4)
    assert adv.tolist() == pytest.approx([0.0, 0.0, -1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4)], abs=1e-6)
    seen = []

    def only_even(prompts, completions, completion_ids, **columns):
        seen.append([len(ids) for ids in completion_ids])
        return [None if i % 2 else 1.0 for i in range(len(completions))]

    def never(prompts, completions, **columns):
        return [None] * len(completions)

    result = rlhf.grpo(tiny_dir, data=[{"prompt": f"Say {i}."} for i in range(8)], reward_funcs=[only_even, never],
                       output_dir=str(tmp_path / "g"), max_steps=1, rollout_batch_size=4, num_generations=2,
                       mini_batch_size=8, batch_size=8, max_new_tokens=4, report_to="none")
    assert seen and all(0 < n <= 4 for n in seen[0])  # the sampled ids reached the function
    assert result.metrics["reward"] == 1.0 and "rewards/never" not in result.metrics
    with pytest.raises(rlhf.UserError, match="PPO needs a score for every response"):
        rlhf.ppo(tiny_dir, data=[{"prompt": f"Say {i}."} for i in range(8)], reward_funcs=[never],
                 output_dir=str(tmp_path / "p"), max_steps=1, rollout_batch_size=4, mini_batch_size=4, batch_size=4,
                 max_new_tokens=4, report_to="none")


def test_grpo_logs_each_reward_functions_mean_and_std_as_trl(tiny_dir, tmp_path):
    """Issue 22, item 5: GRPO logged each reward function's mean only (rewards/NAME); TRL logs rewards/NAME/mean
    and rewards/NAME/std over the whole batch, its Nones left out (nanmean, nanstd with Bessel's correction)."""
    import statistics

    import rlhf

    returned = []

    def odd_lengths(prompts, completions, **columns):
        values = [None if len(c) % 3 == 0 else float(len(c) % 5) for c in completions]
        returned.append(values)
        return values

    result = rlhf.grpo(tiny_dir, data=[{"prompt": f"Say {i}."} for i in range(8)], reward_funcs=[odd_lengths],
                       output_dir=str(tmp_path / "g"), max_steps=1, rollout_batch_size=4, num_generations=4,
                       mini_batch_size=16, batch_size=8, max_new_tokens=12, report_to="none", seed=3)
    applied = [v for v in returned[-1] if v is not None]
    assert len(returned) == 1 and 2 <= len(applied) < 16  # some Nones, and a std to take
    m = result.metrics
    assert m["rewards/odd_lengths/mean"] == pytest.approx(statistics.mean(applied), abs=1e-6)
    assert m["rewards/odd_lengths/std"] == pytest.approx(statistics.stdev(applied), abs=1e-6)
    assert m["rewards/odd_lengths"] == m["rewards/odd_lengths/mean"]  # the name logged before stays


def test_grpo_reads_trls_per_device_batch_as_trl_does(capsys, monkeypatch):
    """Issue 22, item 3: per_device_train_batch_size 16 in GRPO silently gave 8 prompts and 32 completions a step;
    in TRL it is 16 completions a process per micro-step (4 prompts at G 4), gradient accumulation included."""
    cfg = printed_config(capsys, "grpo", "--model", "m", "--reward-fn", "x:y", "--per_device_train_batch_size", "16",
                         "--num_generations", "4")
    assert (cfg["batch_size"], cfg["mini_batch_size"], cfg["rollout_batch_size"]) == (16, 16, 4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = printed_config(capsys, "grpo", "--model", "m", "--reward-fn", "x:y", "--per_device_train_batch_size", "8",
                         "--gradient_accumulation_steps", "2", "--num_generations", "4")
    assert (cfg["batch_size"], cfg["mini_batch_size"], cfg["rollout_batch_size"], cfg["grad_accum"]) == (16, 32, 8, 1)
    # Our own sizes, when given, are kept.
    cfg = printed_config(capsys, "grpo", "--model", "m", "--reward-fn", "x:y", "--per_device_train_batch_size", "8",
                         "--rollout-batch-size", "2", "--num_generations", "4")
    assert cfg["rollout_batch_size"] == 2
    import rlhf.training.options as options

    from rlhf.recipes import grpo

    kw = options.from_keywords(grpo.Config, {"model": "m", "reward_fn": "x:y", "per_device_train_batch_size": 8,
                                             "num_generations": 2}, "grpo")
    assert (kw.batch_size, kw.mini_batch_size, kw.rollout_batch_size) == (16, 16, 8)


def test_optim_is_adamw_either_way_and_other_optimizers_are_refused(tmp_path, tiny_dir, capsys):
    """--optim (TRL's optim): torch's AdamW one tensor at a time (ours by default) or fused (transformers' and
    TRL's default), in every optimizer a recipe makes, PPO's critic included; TRL's other optimizers are one
    line naming the flag."""
    import torch

    import rlhf
    from rlhf.recipes.configs.sft import Config
    from rlhf.training.setup import make_optimizer

    weights = [torch.nn.Parameter(torch.ones(3))]
    assert not make_optimizer(Config(model="m"), weights, 4)[0].defaults["fused"]
    assert make_optimizer(Config(model="m", optim="adamw_torch_fused"), weights, 4)[0].defaults["fused"]
    rc, _, err = cli(capsys, "sft", "--model", tiny_dir, "--data", "d.jsonl", "--optim", "sgd")
    assert rc == 2 and len(err) == 1 and "--optim" in err[0] and "adamw_torch_fused" in err[0], err
    made = []
    original = torch.optim.AdamW.__init__

    def record(self, params, *args, **kwargs):
        made.append(kwargs.get("fused"))
        original(self, params, *args, **kwargs)

    import unittest.mock

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {w}"}) + "\n" for w in ("a", "b", "c", "d")))
    with unittest.mock.patch.object(torch.optim.AdamW, "__init__", record):
        rlhf.ppo(model=tiny_dir, data=str(prompts), output_dir=str(tmp_path / "ppo"), critic="separate",
                 critic_model=tiny_dir, reward_fn="rule_rewards:vowel_fraction", max_steps=1, rollout_batch_size=2,
                 mini_batch_size=2, batch_size=2, max_new_tokens=4, optim="adamw_torch_fused", report_to="none")
    assert made == [True, True]  # the policy's and the critic's
