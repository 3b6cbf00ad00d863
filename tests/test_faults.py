"""Faults that used to corrupt a result silently (issue 14): each case asserts the exit status, one
error line naming what and where, and that nothing of a previous run changed."""

import json
import os
import re
import subprocess
import sys

import pytest

from rlhf.data import Encoder, prepare


def rlhf(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], capture_output=True, text=True, cwd=cwd)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def bos_adding_copy(tokenizer, chat_template=True):
    """The session tokenizer, but adding BOS to plain text as Llama's does."""
    from tokenizers import processors

    tok = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer.__class__.from_str(
        tokenizer.backend_tokenizer.to_str()), bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"])
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tok.bos_token_id)])
    tok.chat_template = tokenizer.chat_template if chat_template else None
    assert tok("a").input_ids[0] == tok.bos_token_id
    return tok


# ---- 2. UltraFeedback-binarized rows: a string prompt, conversations in chosen/rejected ----------

ULTRAFEEDBACK = {"prompt": "My order is late again!",
                 "chosen": [{"role": "user", "content": "My order is late again!"},
                            {"role": "assistant", "content": "I am truly sorry."}],
                 "rejected": [{"role": "user", "content": "My order is late again!"},
                              {"role": "assistant", "content": "Your order is delayed."}]}


@pytest.mark.parametrize("row", [
    ULTRAFEEDBACK,
    {k: v for k, v in ULTRAFEEDBACK.items() if k != "prompt"},  # implicit prompt
    {"prompt": "My order is late again!", "chosen": ULTRAFEEDBACK["chosen"][1:],  # assistant turns only
     "rejected": ULTRAFEEDBACK["rejected"][1:]},
])
def test_conversational_chosen_rejected_get_the_chat_template(row, tokenizer, tmp_path):
    ex = prepare(write_jsonl(tmp_path / "p.jsonl", [row]), "preference", Encoder(tokenizer, 64)).examples[0]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    user, asst = tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    assert ex["prompt_ids"] == [bos, user] + ids(tokenizer, "My order is late again!") + [eos, asst]
    assert ex["chosen_ids"] == ids(tokenizer, "I am truly sorry.") + [eos]
    assert ex["rejected_ids"] == ids(tokenizer, "Your order is delayed.") + [eos]


def test_data_check_shows_ultrafeedback_rows_templated(tiny_dir, tmp_path):
    path = write_jsonl(tmp_path / "uf.jsonl", [ULTRAFEEDBACK])
    out = rlhf("data", "check", path, "--kind", "preference", "--model", tiny_dir)
    assert out.returncode == 0, out.stderr
    assert "'<|bos|><|user|>My order is late again!<|end|><|assistant|>I am truly sorry.<|end|>'" in out.stdout


def test_string_prompt_with_conversational_completion_is_a_user_turn(tokenizer, tmp_path):
    row = {"prompt": "My order is late again!", "completion": [{"role": "assistant", "content": "I am truly sorry."}]}
    ex = prepare(write_jsonl(tmp_path / "s.jsonl", [row]), "sft", Encoder(tokenizer, 64)).examples[0]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    user, asst = tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    prompt = [bos, user] + ids(tokenizer, "My order is late again!") + [eos, asst]
    assert ex["input_ids"] == prompt + ids(tokenizer, "I am truly sorry.") + [eos]


def test_preference_conversations_that_differ_before_the_reply_are_refused(tmp_path, tokenizer):
    row = {"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}],
           "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}]}
    from rlhf.data import DataError

    with pytest.raises(DataError, match="p.jsonl:1: chosen: "):
        prepare(write_jsonl(tmp_path / "p.jsonl", [row]), "preference", Encoder(tokenizer, 64))


# ---- 3. messages without a chat template keep the BOS a tokenizer adds ----------------------------

def test_messages_without_chat_template_keep_bos_once(tokenizer):
    tok = bos_adding_copy(tokenizer, chat_template=False)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    enc = Encoder(tok, 64)
    out = enc.encode_sft({"prompt": [{"role": "user", "content": "Hello"}], "completion": "Hi"})
    prompt = [bos] + ids(tok, "User: Hello\n\nAssistant: ")
    assert out["input_ids"] == prompt + ids(tok, "Hi") + [eos]
    # Same as a string prompt of the same text; and a template that writes BOS itself is not doubled.
    assert enc.prompt_ids("User: Hello\n\nAssistant: ") == prompt
    tok.chat_template = "{{ bos_token }}" + "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert Encoder(tok, 64).prompt_ids([{"role": "user", "content": "Hello"}]) == [bos] + ids(tok, "Hello")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # a template without BOS
    assert Encoder(tok, 64).prompt_ids([{"role": "user", "content": "Hello"}]) == ids(tok, "Hello")


# ---- 1. an output directory holds one run --------------------------------------------------------

def snapshot(directory):
    """Every file under ``directory`` and its bytes."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def cli(capsys, *args):
    """``rlhf ARGS`` in this process; returns (exit status, stderr lines)."""
    from rlhf.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err.replace("\r", "\n").splitlines()
    progress_bars = ("Loading weights", "Writing model")
    return rc, [line for line in err if line.strip() and not line.startswith(progress_bars)]


def sft_args(tiny_dir, data, out, *extra):
    return ["sft", "--model", tiny_dir, "--data", data, "--output-dir", out, "--batch-size", 4, "--lr", "1e-2",
            "--max-length", 48, "--report-to", "none", *extra]


def grpo_args(tiny_dir, tmp_path, *extra):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say something about item {i}."} for i in range(8)])
    return ["grpo", "--model", tiny_dir, "--data", data, "--output-dir", tmp_path / "g", "--max-steps", 2,
            "--rollout-batch-size", 2, "--num-generations", 2, "--mini-batch-size", 4, "--batch-size", 4,
            "--max-new-tokens", 4, "--report-to", "none", *extra]


def sft_data(tmp_path, name="d.jsonl"):
    return write_jsonl(tmp_path / name, [{"prompt": f"Paint the box {c}.", "completion": f" The box is {c}."}
                                         for c in ["red", "blue", "green", "pink"] * 4])


def test_second_run_in_a_directory_is_refused_then_replaces_it_only_when_asked(tmp_path, tiny_dir, capsys):
    data, out = sft_data(tmp_path), tmp_path / "out"
    assert cli(capsys, *sft_args(tiny_dir, data, out, "--max-steps", 6, "--save-every", 1))[0] == 0
    run_a = snapshot(out)
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000005", "step-00000006"]

    # Run B, same directory: refused before anything is loaded or written.
    rc, err = cli(capsys, *sft_args(tiny_dir, data, out, "--max-steps", 3))
    assert rc == 1 and err == [f"rlhf sft: error: --output-dir {out} holds another run's results (checkpoints/"
                               "step-00000006, config.json, model.safetensors, metrics.jsonl); pass --resume to "
                               "continue that run or --overwrite-output-dir to replace it"]
    assert snapshot(out) == run_a
    # --resume with another config names the field; past its end names the steps.
    rc, err = cli(capsys, *sft_args(tiny_dir, data, out, "--max-steps", 3, "--resume", "--lr", "2e-2"))
    assert rc == 1 and len(err) == 1 and "saved by another run (--lr 0.01 there, 0.02 now)" in err[0]
    rc, err = cli(capsys, *sft_args(tiny_dir, data, out, "--max-steps", 3, "--resume"))
    assert rc == 1 and err == [f"rlhf sft: error: --resume {out}/checkpoints/step-00000006: its step 6 is past this "
                               "run's 3 steps (raise --max-steps or --epochs)"]
    assert snapshot(out) == run_a
    # --overwrite-output-dir with a run that fails at start-up (a bad record): nothing changed.
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}])
    rc, err = cli(capsys, *sft_args(tiny_dir, bad, out, "--max-steps", 3, "--overwrite-output-dir"))
    assert rc == 1 and "Traceback" not in "\n".join(err)
    assert snapshot(out) == run_a

    # --overwrite-output-dir: run B's own checkpoints, metrics and weights.
    assert cli(capsys, *sft_args(tiny_dir, data, out, "--max-steps", 3, "--save-every", 1, "--seed", 1,
                                 "--overwrite-output-dir"))[0] == 0
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000002", "step-00000003"]
    record = json.loads((out / "checkpoints" / "step-00000003" / "rlhf_run.json").read_text())
    assert record["recipe"] == "sft" and record["seed"] == 1
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    assert steps == [1, 2, 3]
    assert snapshot(out)["model.safetensors"] != run_a["model.safetensors"]
    assert not (out / ".rlhf.lock").exists()


def test_overwrite_removes_what_an_online_run_left(tmp_path, tiny_dir, capsys):
    """Before: samples.jsonl, best/ and report.html of an earlier PPO run survived
    --overwrite-output-dir, and rlhf report showed PPO samples in the new SFT run's page."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("samples.jsonl", "report.html", "metrics.jsonl"):
        (out / name).write_text("{}\n")
    (out / "best").mkdir()
    (out / "best" / "best.json").write_text("{}")
    assert cli(capsys, *sft_args(tiny_dir, sft_data(tmp_path), out, "--max-steps", 1, "--overwrite-output-dir"))[0] == 0
    assert not any((out / n).exists() for n in ("samples.jsonl", "report.html", "best"))


def test_overwrite_leaves_no_chat_template_of_the_old_run(tmp_path, tiny_dir, capsys):
    """Issue 22: a model without a chat template trained over a run whose tokenizer had one kept the old
    chat_template.jinja, and loaded with the wrong template."""
    from rlhf.models import load_tokenizer, save_pretrained
    from transformers import AutoModelForCausalLM

    plain = tmp_path / "plain"
    tok = load_tokenizer(tiny_dir)
    tok.chat_template = None
    save_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tok, str(plain))
    assert not (plain / "chat_template.jinja").exists()
    out = tmp_path / "out"
    assert cli(capsys, *sft_args(tiny_dir, sft_data(tmp_path), out, "--max-steps", 1))[0] == 0
    assert (out / "chat_template.jinja").exists()
    assert cli(capsys, *sft_args(str(plain), sft_data(tmp_path), out, "--max-steps", 1, "--overwrite-output-dir"))[0] == 0
    assert not (out / "chat_template.jinja").exists()
    assert load_tokenizer(str(out)).chat_template is None


def test_two_live_runs_in_one_directory(tmp_path, tiny_dir, capsys):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".rlhf.lock", "w") as held:  # a live run, as another process would hold it
        held.write("4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        rc, err = cli(capsys, *sft_args(tiny_dir, sft_data(tmp_path), out, "--max-steps", 1))
    assert rc == 1 and err == [f"rlhf sft: error: --output-dir {out}: another run is writing there (pid 4242, "
                               f"{out}/.rlhf.lock); wait for it to end or choose another directory"]
    assert os.listdir(out) == [".rlhf.lock"]


def test_resume_without_a_checkpoint_and_rotation_after_an_earlier_resume(tmp_path, tiny_dir, capsys):
    data, out = sft_data(tmp_path), tmp_path / "out"
    rc, err = cli(capsys, *sft_args(tiny_dir, data, out, "--max-steps", 2, "--resume"))
    assert rc == 1 and err == [f"rlhf sft: error: --resume: no checkpoint in {out}/checkpoints to resume (drop "
                               "--resume to start afresh)"]
    assert not out.exists()
    assert cli(capsys, *sft_args(tiny_dir, data, out, "--max-steps", 4, "--save-every", 1, "--save-total-limit", 0))[0] == 0
    # Resumed from step 1: the new step 2 replaces the old, and the old 3 and 4 go, never the new ones.
    ckpt = out / "checkpoints"
    assert cli(capsys, *sft_args(tiny_dir, data, out, "--max-steps", 4, "--save-every", 2, "--save-total-limit", 0,
                                 "--resume", ckpt / "step-00000001"))[0] == 0
    assert sorted(os.listdir(ckpt)) == ["step-00000001", "step-00000002", "step-00000004"]


# ---- 4. a reward model scores where transformers scores it, PAD == EOS included --------------------

def test_reward_model_with_pad_equal_eos_scores_as_transformers(tokenizer, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    from rlhf.data import collate_preference
    from rlhf.models import Critic, load_sequence_classifier, save_pretrained, sequence_scores, tiny_causal_lm
    from rlhf.recipes import reward

    tok = bos_adding_copy(tokenizer)
    tok.pad_token = tok.eos_token  # GPT-2's usual setup: PAD is EOS
    lm = tiny_causal_lm(tok, "gpt2", hidden_size=32, num_layers=2)
    save_pretrained(lm, tok, str(tmp_path / "lm"))
    ours = load_sequence_classifier(str(tmp_path / "lm")).eval()  # a fresh score head, saved with it
    assert ours.config.pad_token_id == tok.eos_token_id
    ours.save_pretrained(str(tmp_path / "rm"))
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm")).eval()

    enc = Encoder(tok, 64)
    ex = enc.encode_preference({"prompt": "My order is late again!", "chosen": " I am truly sorry.",
                                "rejected": " Late."})
    batch = collate_preference([ex], pad_id=tok.pad_token_id)  # right-padded with PAD == EOS
    with torch.no_grad():
        expected = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        chosen, rejected = reward.pair_scores(Critic(ours), batch, tok.pad_token_id)  # training reads here
        scored = sequence_scores(ours, batch["input_ids"], batch["attention_mask"])  # PPO reads here
        # Left padding (PPO's rollouts) reads the same score as the unpadded sequence in transformers.
        row = batch["input_ids"][1:, : batch["attention_mask"][1].sum()]
        left = torch.cat([torch.full((1, 3), tok.pad_token_id), row], dim=1)
        left_score = sequence_scores(ours, left, (torch.arange(left.shape[1]) >= 3).long()[None])
        alone = hf(input_ids=row).logits[:, 0]
    torch.testing.assert_close(torch.stack([chosen, rejected]).flatten(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scored, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left_score, alone, rtol=1e-5, atol=1e-5)


# ---- 5. non-finite rewards, and runs in which every step was skipped --------------------------------

def test_nan_reward_function_is_a_user_error(tmp_path, tiny_dir, capsys, monkeypatch):
    (tmp_path / "nan_rewards_issue14.py").write_text(
        "def half_nan(prompts, completions, **kw):\n"
        "    return [float('nan') if i == 1 else 1.0 for i in range(len(completions))]\n")
    monkeypatch.chdir(tmp_path)
    rc, err = cli(capsys, *grpo_args(tiny_dir, tmp_path, "--reward-fn", "nan_rewards_issue14:half_nan"))
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith("rlhf grpo: error: reward function nan_rewards_issue14:half_nan returned nan for "
                             "completion 2 of the batch (prompt ") and "prompts.jsonl:" in err[0], err[0]
    assert not (tmp_path / "g" / "model.safetensors").exists()


def test_a_run_whose_every_step_was_skipped_fails(tmp_path, tiny_dir, capsys, monkeypatch):
    import torch

    from rlhf.recipes import grpo, sft

    real = sft.sft_loss
    monkeypatch.setattr(sft, "sft_loss", lambda logits, labels, **kw: (real(logits, labels, **kw)[0] * float("nan"),
                                                                      real(logits, labels, **kw)[1]))
    out = tmp_path / "out"
    rc, err = cli(capsys, *sft_args(tiny_dir, sft_data(tmp_path), out, "--max-steps", 3))
    assert rc == 1 and err == ["rlhf sft: error: every one of the 3 steps was skipped (non-finite loss or gradient); "
                               "no model was saved"]
    assert not (out / "model.safetensors").exists()

    real_pg = grpo.policy_loss_terms
    monkeypatch.setattr(grpo, "policy_loss_terms", lambda *a, **kw: (real_pg(*a, **kw)[0] * torch.tensor(float("nan")),
                                                                     real_pg(*a, **kw)[1]))
    rc, err = cli(capsys, *grpo_args(tiny_dir, tmp_path, "--reward-fn", "rule_rewards:vowel_fraction"))
    assert rc == 1 and err == ["rlhf grpo: error: every one of the 2 steps was skipped (non-finite loss or gradient); "
                               "no model was saved"]


def test_reward_values_that_are_not_numbers_name_the_function(tokenizer):
    import torch

    from rlhf.errors import UserError
    from rlhf.recipes.rewards import RewardFn
    from rlhf.recipes.scoring import Scorer
    from rlhf.rollout import RolloutBatch

    batch = RolloutBatch(prompt_ids=torch.ones(2, 2, dtype=torch.long), prompt_mask=torch.ones(2, 2, dtype=torch.long),
                         response_ids=torch.ones(2, 3, dtype=torch.long), response_mask=torch.ones(2, 3, dtype=torch.long),
                         finished=torch.ones(2, dtype=torch.bool))
    where = ["p.jsonl:1", "p.jsonl:2"]
    for returned, message in [(None, "returned NoneType; expected a list of 2 numbers, one per completion"),
                              ([1.0, float("nan")], "returned nan for completion 2 of the batch (prompt p.jsonl:2)"),
                              (["1", 2], "returned '1' for completion 1 of the batch (prompt p.jsonl:1)"),
                              ([1.0, float("inf")], "returned inf for completion 2 of the batch (prompt p.jsonl:2)")]:
        scorer = Scorer(None, [RewardFn("mod:fn", lambda returned=returned, **kw: returned)])
        with pytest.raises(UserError, match=f"^reward function mod:fn {re.escape(message)}"):
            scorer(batch, ["a", "b"], ["x", "y"], {}, where)
    scores, _ = Scorer(None, [RewardFn("mod:fn", lambda **kw: [True, 0])])(batch, ["a", "b"], ["x", "y"], {}, where)
    assert scores.tolist() == [1.0, 0.0]
    # None is TRL's "does not apply" (issue 22): the completion is unscorable, NaN, for GRPO to leave out.
    scores, _ = Scorer(None, [RewardFn("mod:fn", lambda **kw: [1.0, None])])(batch, ["a", "b"], ["x", "y"], {}, where)
    assert scores[0].item() == 1.0 and scores[1].isnan()


# ---- 6. a reward model that is not one ------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["grpo", "ppo"])
def test_reward_model_without_score_head_is_refused(recipe, tmp_path, tiny_dir, capsys):
    args = grpo_args(tiny_dir, tmp_path, "--reward-model", tiny_dir)
    if recipe == "ppo":  # PPO has no --num-generations, and its minibatches divide the rollout batch
        i = args.index("--num-generations")
        args = ["ppo", *args[1:i], "--mini-batch-size", 2, *args[i + 4:]]
    rc, err = cli(capsys, *args)
    assert rc == 1 and err == [f"rlhf {recipe}: error: --reward-model {tiny_dir}: not a reward model: it has no "
                               "trained score head (score.weight missing; its config names LlamaForCausalLM); "
                               "train one with rlhf rm"]
    assert not (tmp_path / "g" / "model.safetensors").exists()


# ---- 7. flags accepted and then ignored ------------------------------------------------------------

@pytest.mark.parametrize("recipe,flags,message", [
    ("sft", ["--report-to", "mlflow"], "--report-to mlflow: mlflow is not installed (pip install mlflow)"),
    ("sft", ["--report-to", "tensorboard,foo"], "--report-to foo: not a tracker accelerate knows; valid: aim, comet_ml, "
                                                "mlflow, tensorboard, wandb, clearml, dvclive, swanlab, trackio, all, none"),
    ("sft", ["--save-every", "-1"], "--save-every must be 0 (no checkpoints) or more, got -1"),
    ("dpo", ["--eval-every", "-2"], "--eval-every must be 0 (only at the end) or more, got -2"),
    ("sft", ["--log-every", "0"], "--log-every must be at least 1"),
    ("sft", ["--lr", "0"], "--lr must be a positive number, got 0.0"),
    ("rm", ["--lr", "nan"], "--lr must be a positive number, got nan"),
    # PPO and GRPO use --eval-data (preference pairs: the monitor's implicit preference accuracy); alone,
    # --eval-every would be ignored.
    ("grpo", ["--eval-every", "5"], "--eval-every: grpo evaluates --eval-data preference pairs; give --eval-data too"),
    ("ppo", ["--eval-every", "5"], "--eval-every: ppo evaluates --eval-data preference pairs; give --eval-data too"),
    ("grpo", ["--log-samples", "-1"], "--log-samples must be 0 (none) or more, got -1"),
    ("ppo", ["--grad-accum", "2"], "--grad-accum: ppo accumulates micro-batches of --batch-size into each "
                                   "--mini-batch-size update; set those instead"),
])
def test_flags_that_would_be_ignored_are_refused(recipe, flags, message, capsys, tiny_dir):
    rc, err = cli(capsys, recipe, "--model", tiny_dir, "--data", "x.jsonl", *flags, "--print-config")
    assert rc == 1 and err == [f"rlhf {recipe}: error: {message}"]



# ==== Tracebacks where one line is due (issue 14, second section) ====================================

def one_error(rc, err, recipe, *parts):
    """Exit 1 and exactly one line, ``rlhf RECIPE: error: ...``, holding each of ``parts``."""
    assert rc == 1 and len(err) == 1, (rc, err)
    assert err[0].startswith(f"rlhf {recipe}: error: "), err
    assert "Traceback" not in err[0]
    for part in parts:
        assert str(part) in err[0], (part, err[0])


def model_copy(tiny_dir, tmp_path, name="m"):
    import shutil

    return shutil.copytree(tiny_dir, tmp_path / name)


def ppo_args(tiny_dir, tmp_path, *extra):
    args = grpo_args(tiny_dir, tmp_path)
    i = args.index("--num-generations")
    return ["ppo", *args[1:i], "--mini-batch-size", 2, *args[i + 4:], *extra]


# ---- a broken model directory ---------------------------------------------------------------

def test_model_directory_without_tokenizer(tmp_path, tiny_dir, capsys):
    model = model_copy(tiny_dir, tmp_path)
    for name in os.listdir(model):
        if name.startswith(("tokenizer", "chat_template", "special_tokens")):
            os.remove(model / name)
    rc, err = cli(capsys, *sft_args(model, sft_data(tmp_path), tmp_path / "out", "--max-steps", 1))
    one_error(rc, err, "sft", f"{model}: no tokenizer in this directory (none of tokenizer.json, ")


def test_truncated_safetensors(tmp_path, tiny_dir, capsys):
    model = model_copy(tiny_dir, tmp_path)
    weights = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    rc, err = cli(capsys, *sft_args(model, sft_data(tmp_path), tmp_path / "out", "--max-steps", 1))
    one_error(rc, err, "sft", f"{model}: cannot load causal LM (a safetensors file is truncated or corrupt: ")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_tokenizer_without_eos(tmp_path, tiny_dir, capsys):
    model = model_copy(tiny_dir, tmp_path)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["eos_token"] = None
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    rc, err = cli(capsys, *sft_args(model, sft_data(tmp_path), tmp_path / "out", "--max-steps", 1))
    one_error(rc, err, "sft", f"{model}: its tokenizer has no EOS token", "eos_token", "tokenizer_config.json")


# ---- sizes of zero, learning rates and intervals that make no sense -----------------------------

@pytest.mark.parametrize("recipe,flags,message", [
    ("grpo", ["--num-generations", "0"], "--num-generations of at least 2"),
    ("grpo", ["--rollout-batch-size", "0"], "--rollout-batch-size must be at least 1"),
    ("grpo", ["--mini-batch-size", "0"], "--mini-batch-size must be at least 1"),
    ("ppo", ["--mini-batch-size", "0"], "--mini-batch-size must be at least 1"),
    ("ppo", ["--rollout-batch-size", "0"], "--rollout-batch-size must be at least 1"),
    ("ppo", ["--ppo-epochs", "0"], "--ppo-epochs must be at least 1"),
    ("ppo", ["--mini-batch-size", "-2"], "--mini-batch-size must be at least 1"),
    ("grpo", ["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ("ppo", ["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ("sft", ["--batch-size", "0"], "--batch-size must be at least 1"),
    ("sft", ["--log-every", "0"], "--log-every must be at least 1"),
    ("sft", ["--lr=-1e-3"], "--lr must be a positive number, got -0.001"),
    ("dpo", ["--lr", "nan"], "--lr must be a positive number, got nan"),
    ("sft", ["--lora", "--lora-r", "0"], "--lora-r must be at least 1"),
])
def test_sizes_that_make_no_sense_are_refused(recipe, flags, message, capsys, tiny_dir):
    rc, err = cli(capsys, recipe, "--model", tiny_dir, "--data", "x.jsonl", *flags, "--print-config")
    assert rc == 1 and err == [f"rlhf {recipe}: error: {message}"] or (
        len(err) == 1 and message in err[0] and err[0].startswith(f"rlhf {recipe}: error: ")), err


def test_unwritable_output_directory_is_found_before_loading(tmp_path, tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr("rlhf.recipes.sft.load_policy", lambda *a, **kw: pytest.fail("loaded the model first"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc, err = cli(capsys, *sft_args(tiny_dir, sft_data(tmp_path), blocker / "out", "--max-steps", 1))
    one_error(rc, err, "sft", f"--output-dir {blocker / 'out'}: cannot write there")


# ---- a reward function that raises -----------------------------------------------------------

def test_reward_function_that_raises_names_function_record_and_exception(tmp_path, tiny_dir, capsys, monkeypatch):
    (tmp_path / "raising_rewards_issue14.py").write_text(
        "def picky(prompts, completions, **kw):\n"
        "    for p in prompts:\n"
        "        if p.endswith('item 3.'):\n"
        "            raise ValueError('no score for item 3\\nsecond line')\n"
        "    return [1.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say something about item {i}."} for i in range(4)])
    args = grpo_args(tiny_dir, tmp_path, "--reward-fn", "raising_rewards_issue14:picky", "--rollout-batch-size", 4)
    args[args.index("--data") + 1] = data
    rc, err = cli(capsys, *args)
    one_error(rc, err, "grpo", "reward function raising_rewards_issue14:picky raised ValueError: no score for item 3 "
              "on completion ", f"(prompt {data}:4)")
    assert "second line" not in err[0]
    assert not (tmp_path / "g" / "model.safetensors").exists()


# ---- disk full ----------------------------------------------------------------------------------

def no_space(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_during_a_checkpoint(tmp_path, tiny_dir, capsys, monkeypatch):
    import accelerate.utils.other

    monkeypatch.setattr(accelerate.utils.other, "safe_save_file", no_space)
    out = tmp_path / "out"
    rc, err = cli(capsys, *sft_args(tiny_dir, sft_data(tmp_path), out, "--max-steps", 2, "--save-every", 1))
    one_error(rc, err, "sft", f"{out}/checkpoints/step-00000001", "No space left on device")
    assert os.listdir(out / "checkpoints") == []  # no half-written .tmp directory left behind
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()


def test_disk_full_during_the_final_save_leaves_no_config_without_weights(tmp_path, tiny_dir, capsys, monkeypatch):
    import transformers.modeling_utils

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", no_space)
    out = tmp_path / "out"
    rc, err = cli(capsys, *sft_args(tiny_dir, sft_data(tmp_path), out, "--max-steps", 2, "--save-every", 2))
    one_error(rc, err, "sft", f"--output-dir {out}: cannot save the final model", "No space left on device",
              f"{out}/checkpoints/step-00000002")
    assert sorted(os.listdir(out)) == ["checkpoints", "metrics.jsonl"]


# ---- positions -----------------------------------------------------------------------------------

def test_max_length_beyond_the_models_positions(tmp_path, tiny_dir, capsys):
    out = tmp_path / "out"
    rc, err = cli(capsys, *sft_args(tiny_dir, sft_data(tmp_path), out, "--max-steps", 1, "--max-length", 600))
    one_error(rc, err, "sft", "--max-length 600", f"--model {tiny_dir}", "512 positions", "max_position_embeddings")
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("recipe", ["grpo", "ppo"])
def test_prompt_plus_new_tokens_beyond_the_models_positions(recipe, tmp_path, tiny_dir, capsys):
    args = (grpo_args if recipe == "grpo" else ppo_args)(tiny_dir, tmp_path, "--reward-fn", "rule_rewards:vowel_fraction",
                                                         "--max-new-tokens", 510)
    rc, err = cli(capsys, *args)
    one_error(rc, err, recipe, "--max-new-tokens 510", "prompts.jsonl:", "512 positions", f"--model {tiny_dir}")


# ---- peft ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["sft", "rm"])
def test_lora_target_modules_that_match_nothing(recipe, tmp_path, tiny_dir, capsys):
    data = sft_data(tmp_path) if recipe == "sft" else write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "Hi.", "chosen": " Hello!", "rejected": " Go."}] * 4)
    args = sft_args(tiny_dir, data, tmp_path / "out", "--max-steps", 1, "--lora", "--lora-target-modules", "foo_proj")
    rc, err = cli(capsys, recipe, *args[1:])
    one_error(rc, err, recipe, "--lora-target-modules foo_proj", "foo_proj")


# ---- rlhf generate ---------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--temperature", "-1"], "--temperature must be 0 (greedy) or more, got -1.0"),
    (["--num-samples", "0"], "--num-samples must be at least 1"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--device", "cuda"], "--device cuda: no CUDA device is available here"),
])
def test_generate_flags(flags, message, tiny_dir, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, err = cli(capsys, "generate", "--model", tiny_dir, "--prompt", "Hello", *flags)
    one_error(rc, err, "generate", message)


# ---- --resume with a corrupt newest checkpoint --------------------------------------------------------

def test_resume_falls_back_from_a_corrupt_checkpoint(tmp_path, tiny_dir, capsys):
    data, out = sft_data(tmp_path), tmp_path / "out"
    assert cli(capsys, *sft_args(tiny_dir, data, out, "--max-steps", 2, "--save-every", 1))[0] == 0
    ckpt = out / "checkpoints"
    newest = ckpt / "step-00000002" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    rc, err = cli(capsys, *sft_args(tiny_dir, data, out, "--max-steps", 3, "--resume"))
    assert rc == 0 and len(err) == 1, err
    assert err[0].startswith(f"warning: --resume: {ckpt}/step-00000002 cannot be loaded ("), err
    assert err[0].endswith(f"); resuming from {ckpt}/step-00000001"), err
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    assert steps == [1, 2, 3]  # step 2 again, from step 1's checkpoint

    for step in os.listdir(ckpt):  # none good: one error
        weights = ckpt / step / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    rc, err = cli(capsys, *sft_args(tiny_dir, data, out, "--max-steps", 4, "--resume"))
    assert rc == 1 and err[-1].startswith(f"rlhf sft: error: --resume: no checkpoint in {ckpt} can be loaded "
                                          f"({ckpt}/step-00000002: "), err
    assert not any("Traceback" in line for line in err)


# ---- a missing local path fails at once ----------------------------------------------------------------

@pytest.mark.parametrize("path", ["runs/sft", "./sft", "../nowhere/sft", "~/no-such-model-issue14", "runs/a/b"])
def test_missing_local_model_path_fails_at_once(path, tmp_path, capsys, monkeypatch):
    import transformers

    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **kw: pytest.fail("asked the hub for a local path"))
    rc, err = cli(capsys, *sft_args(path, "d.jsonl", tmp_path / "out", "--max-steps", 1))
    one_error(rc, err, "sft", f"{path}: no such model directory")


def test_hub_ids_still_go_to_the_hub(tmp_path, monkeypatch):
    from rlhf.models import loading

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loading, "_hub_reachable", lambda: True)  # (unreachable: one line at once, test_models)
    loading._check_local("Qwen/Qwen2.5-0.5B")  # no directory "Qwen" here: a hub id
    loading._check_local("gpt2")


# ---- SIGTERM ---------------------------------------------------------------------------------------------

def test_sigterm_exits_like_ctrl_c(tmp_path, tiny_dir, capsys, monkeypatch):
    import signal

    from rlhf.training import setup

    real = setup.start

    def start_then_terminated(*args, **kwargs):
        out = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(setup, "start", start_then_terminated)
    monkeypatch.setattr("rlhf.recipes.sft.start", start_then_terminated)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    rc, err = cli(capsys, *sft_args(tiny_dir, sft_data(tmp_path), out, "--max-steps", 2))
    assert rc == 143 and err == ["rlhf sft: terminated (SIGTERM)"], (rc, err)
    assert signal.getsignal(signal.SIGTERM) == before
    assert not (out / "model.safetensors").exists() and not (out / ".rlhf.lock").exists()


def test_a_default_max_length_beyond_the_models_positions_is_lowered_one_given_is_refused(tmp_path, tokenizer, capsys):
    """Issue 22, item 11: --max-length's default of 512 was refused on a model of 256 positions though the user
    never set it."""
    from rlhf.models import save_pretrained, tiny_causal_lm

    short = tmp_path / "short"
    save_pretrained(tiny_causal_lm(tokenizer, "gpt2", hidden_size=32, num_layers=1, max_positions=256), tokenizer,
                    str(short))
    args = ["sft", "--model", str(short), "--data", sft_data(tmp_path), "--batch-size", 4, "--report-to", "none",
            "--max-steps", 1]
    rc, err = cli(capsys, *args, "--output-dir", tmp_path / "out")  # --max-length not given: its default, 512
    assert rc == 0, err
    rc, err = cli(capsys, *args, "--output-dir", tmp_path / "o2", "--max-length", 512)
    assert rc == 1 and err == [f"rlhf sft: error: --max-length 512 is beyond the 256 positions of --model {short} "
                               "(max_position_embeddings in its config); lower it to 256 or less"]


def test_after_ctrl_c_without_checkpoints_both_messages_name_overwrite(tmp_path, tiny_dir, capsys):
    """Issue 22, item 8: without --save-every, --resume said there was no checkpoint (drop --resume), and
    without --resume the directory was refused with a suggestion to --resume: the two pointed at each other."""
    out = tmp_path / "out"
    assert cli(capsys, *sft_args(tiny_dir, sft_data(tmp_path), out, "--max-steps", 1))[0] == 0  # results, no checkpoint
    rc, err = cli(capsys, *sft_args(tiny_dir, sft_data(tmp_path), out, "--max-steps", 1))
    assert rc == 1 and "it left no checkpoint to resume (no --save-every), so pass --overwrite-output-dir" in err[0]
    rc, err = cli(capsys, *sft_args(tiny_dir, sft_data(tmp_path), out, "--max-steps", 1, "--resume"))
    assert rc == 1 and "start afresh with --overwrite-output-dir instead" in err[0] and "drop --resume" not in err[0]


def test_message_data_without_a_chat_template_says_so_and_saves_the_template(tmp_path, tiny_dir, capsys):
    """Issue 22, item 7: training used the plain fallback template silently, and the saved model had none."""
    from rlhf.data import PLAIN_CHAT_TEMPLATE
    from rlhf.models import load_tokenizer, save_pretrained
    from transformers import AutoModelForCausalLM

    plain = tmp_path / "plain"
    tok = load_tokenizer(tiny_dir)
    tok.chat_template = None
    save_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tok, str(plain))
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"Hi {i}"},
                                                               {"role": "assistant", "content": "Hello"}]}
                                                 for i in range(8)])
    from rlhf.cli import main

    capsys.readouterr()
    assert main(["sft", "--model", str(plain), "--data", data, "--output-dir", str(tmp_path / "out"), "--max-steps", "1",
                 "--batch-size", "4", "--report-to", "none"]) == 0
    out = capsys.readouterr().out
    assert out.count("the tokenizer has no chat template") == 1
    assert load_tokenizer(str(tmp_path / "out")).chat_template == PLAIN_CHAT_TEMPLATE
