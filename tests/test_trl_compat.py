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
             "--resume_from_checkpoint", "--per_device_train_batch_size", "2", "--max_seq_length", "48"],
     {"model": "m", "data": "d.jsonl", "lr": 3e-4, "grad_accum": 4, "epochs": 3, "lora": True, "lora_r": 8,
      "lora_alpha": 16, "max_length": 48, "max_prompt_length": 32, "log_every": 5, "save_every": 10,
      "save_total_limit": 1, "eval_every": 20, "lr_scheduler": "cosine", "warmup_ratio": 0.1, "weight_decay": 0.01,
      "max_grad_norm": 0.5, "seed": 3, "report_to": "none", "gradient_checkpointing": True, "bf16": False,
      "output_dir": "o", "resume": "auto", "batch_size": 2}),
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
    ("dpo", ["--model", "m", "--data", "d.jsonl", "--beta", "0.2", "--loss_type", "ipo",
             "--precompute_ref_log_probs", "False", "--label_smoothing", "0.1"],
     {"beta": 0.2, "loss_type": "ipo", "precompute_ref": False, "label_smoothing": 0.1}),
    ("rm", ["--model", "m", "--data", "d.jsonl", "--per_device_train_batch_size", "4", "--use_peft", "true"],
     {"batch_size": 4, "lora": True}),
]


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
            keys[name], i = ("auto" if name == "resume_from_checkpoint" else True), i + 1
    path = tmp_path / "trl.yaml"
    path.write_text(yaml.safe_dump(keys))
    cfg = printed_config(capsys, recipe, "--config", path)
    assert {k: cfg[k] for k in expected} == expected


def test_per_device_batch_size_is_multiplied_by_the_processes(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")  # as accelerate launch / torchrun set it
    assert printed_config(capsys, "sft", "--model", "m", "--per_device_train_batch_size", "2")["batch_size"] == 8
    rc, _, err = cli(capsys, "sft", "--model", "m", "--per_device_train_batch_size", "2", "--batch-size", "8",
                     "--print-config")
    assert rc == 1 and err == ["rlhf sft: error: --per_device_train_batch_size and --batch-size both given; "
                               "use --batch-size"]


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
    ("sft", ["--push_to_hub"], "--push_to_hub (TRL/transformers) is not supported by rlhf sft; upload the final "
                               "model yourself (it is an HF-format directory)"),
    ("sft", ["--warmup_steps", "10"], "--warmup_steps (TRL/transformers) is not supported by rlhf sft; "
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
