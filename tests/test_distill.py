"""On-policy distillation (issue 27): the divergences by hand and against TRL's, and ``rlhf distill`` on
tiny models: it learns, resumes exactly, routes several teachers, mixes in the data's completions and
refuses a teacher with another tokenizer in one line."""

import json
import math

import pytest
import torch

from rlhf.algos import generalized_jsd, teacher_top_k_mass


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_divergences_by_hand():
    s, t = [0.7, 0.2, 0.1], [0.2, 0.5, 0.3]
    sl, tl = torch.log(torch.tensor([s])), torch.log(torch.tensor([t]))
    assert generalized_jsd(sl, tl, beta=1.0).item() == pytest.approx(kl(s, t), abs=1e-6)  # reverse KL
    assert generalized_jsd(sl, tl, beta=0.0).item() == pytest.approx(kl(t, s), abs=1e-6)  # forward KL
    m = [0.5 * a + 0.5 * b for a, b in zip(s, t)]
    assert generalized_jsd(sl, tl, beta=0.5).item() == pytest.approx(0.5 * kl(t, m) + 0.5 * kl(s, m), abs=1e-6)
    m = [0.25 * b + 0.75 * a for a, b in zip(s, t)]  # beta 0.25: M = 0.25 teacher + 0.75 student
    assert generalized_jsd(sl, tl, beta=0.25).item() == pytest.approx(0.25 * kl(t, m) + 0.75 * kl(s, m), abs=1e-6)
    # Temperature 2 divides both logits by 2 first.
    s2, t2 = torch.softmax(sl / 2, -1)[0].tolist(), torch.softmax(tl / 2, -1)[0].tolist()
    assert generalized_jsd(sl, tl, beta=1.0, temperature=2.0).item() == pytest.approx(kl(s2, t2), abs=1e-6)
    # Top-2 of the teacher (tokens 1 and 2) and "the rest" (token 0): the student's 0.7 there still counts.
    s_k, t_k = [0.2, 0.1, 0.7], [0.5, 0.3, 0.2]
    assert generalized_jsd(sl, tl, beta=1.0, top_k=2).item() == pytest.approx(kl(s_k, t_k), abs=1e-5)
    assert generalized_jsd(sl, tl, beta=1.0, top_k=1).item() <= generalized_jsd(sl, tl, beta=1.0).item() + 1e-6
    assert teacher_top_k_mass(tl, 2).item() == pytest.approx(0.8)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_no_gradient_when_the_student_is_the_teacher(beta):
    logits = torch.randn(4, 6, 11, generator=torch.Generator().manual_seed(0))
    student = logits.clone().requires_grad_(True)
    loss = generalized_jsd(student, logits, beta=beta).sum()
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-5) and student.grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_divergence_equals_trls_distillation_loss(beta):
    """TRL 1.13's DistillationTrainer loss (its chunked generalised JSD over hidden states and LM heads)
    against ours on the same heads' logits: loss and the student's gradients."""
    trl = pytest.importorskip("trl.trainer.distillation_trainer")
    g = torch.Generator().manual_seed(1)
    B, T, H, V = 3, 5, 8, 13
    h_s, h_t = torch.randn(B, T, H, generator=g), torch.randn(B, T, H, generator=g)
    w_s, w_t = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    results = []
    for ours in (False, True):
        hs, ws = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
        if ours:
            loss = (generalized_jsd(hs @ ws.T, h_t @ w_t.T, beta, temperature=0.7) * mask).sum() / mask.sum()
        else:
            loss = trl._chunked_divergence_loss(hs, h_t, ws, w_t, mask, beta, 4, temperature=0.7)[0]
        loss.backward()
        results.append((loss.detach(), hs.grad, ws.grad))
    (a, ga, wa), (b, gb, wb) = results
    assert abs(a - b).item() < 1e-6 and (ga - gb).abs().max().item() < 1e-6 and (wa - wb).abs().max().item() < 1e-6


# ---- the recipe ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def counting(tmp_path_factory):
    """A tiny teacher that counts (rlhf sft, 300 steps) and an untrained smaller student, as the demo builds."""
    import rlhf
    from rlhf.demo.distill import counting_rows
    from rlhf.models import save_pretrained, tiny_causal_lm, train_tokenizer

    d = tmp_path_factory.mktemp("counting")
    train, held = counting_rows(0)
    for name, rows in (("sft.jsonl", train), ("eval.jsonl", held[:8])):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_tokenizer([r["prompt"] + r["completion"] for r in train + held], vocab_size=300)
    torch.manual_seed(0)
    save_pretrained(tiny_causal_lm(tok, "llama", hidden_size=64, num_layers=2), tok, str(d / "teacher-init"))
    save_pretrained(tiny_causal_lm(tok, "llama", hidden_size=32, num_layers=1), tok, str(d / "student"))
    rlhf.sft(str(d / "teacher-init"), data=str(d / "sft.jsonl"), output_dir=str(d / "teacher"), max_steps=300,
             batch_size=16, lr=3e-3, report_to="none")
    return d


def distill(d, out, **over):
    import rlhf

    kw = dict(teacher=str(d / "teacher"), data=str(d / "sft.jsonl"), eval_data=str(d / "eval.jsonl"),
              output_dir=str(out), max_steps=60, batch_size=16, lr=3e-3, max_new_tokens=12, report_to="none",
              eval_every=30, seed=0)
    kw.update(over)
    rlhf.distill(str(d / "student"), **kw)
    return [json.loads(x) for x in open(out / "metrics.jsonl") if '"step"' in x]


def test_distill_halves_the_reverse_kl_on_held_out_prompts(counting, tmp_path):
    rows = distill(counting, tmp_path / "s", max_steps=500, eval_every=250)
    evals = [r for r in rows if "eval/reverse_kl" in r]
    # Stated margin (issue 27): the held-out per-token reverse KL to the teacher falls by at least half
    # in 500 steps (measured: 6.1 -> 0.95, 16 s).
    assert evals[-1]["eval/reverse_kl"] < 0.5 * evals[0]["eval/reverse_kl"], evals
    last = rows[-1]
    for key in ("distill/loss", "distill/reverse_kl", "logps/student", "logps/teacher", "entropy",
                "completions/mean_length", "completions/clipped_ratio", "grad_norm"):
        assert key in last, key
    assert last["distill/loss"] == pytest.approx(last["distill/reverse_kl"], rel=1e-5)  # beta 1: the loss is it
    assert (tmp_path / "s" / "samples.jsonl").exists()


def test_killed_distill_run_resumes_to_the_same_weights(counting, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import rlhf.training.logs as logs

    # Sampling, the lmbda coin, the schedule, and an evaluation whose teacher samples must not move the RNG.
    over = dict(max_steps=6, save_every=2, lmbda=0.5, eval_every=2, eval_reward_fn="rlhf.demo.distill:exact_count")
    distill(counting, tmp_path / "full", **over)
    real = logs.RunLogger.log

    def die_at_step_5(self, step, metrics):
        if step == 5:
            raise KeyboardInterrupt
        return real(self, step, metrics)

    monkeypatch.setattr(logs.RunLogger, "log", die_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        distill(counting, tmp_path / "killed", **over)
    monkeypatch.setattr(logs.RunLogger, "log", real)
    distill(counting, tmp_path / "killed", resume="auto", **over)
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_student_forward_for_several_teachers_and_a_padded_teacher_vocabulary(counting):
    """Several teachers: the student ran one forward per teacher (a hang under DDP when processes held rows
    of different teachers). A teacher whose embeddings are padded past the tokenizer (Qwen 0.5B against 7B)
    failed with a size mismatch."""
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.recipes.logprobs import response_divergence

    tok = load_tokenizer(str(counting / "student"))
    student, teacher = load_causal_lm(str(counting / "student")), load_causal_lm(str(counting / "teacher"))
    padded = load_causal_lm(str(counting / "teacher"))
    padded.resize_token_embeddings(len(tok) + 13)
    calls = []
    student.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.tensor([tok("Count from 1 to 3. 1 2 3").input_ids] * 4)
    out = response_divergence(student, [(teacher, torch.tensor([0, 2])), (padded, torch.tensor([1, 3]))], ids,
                              torch.ones_like(ids), 6, vocab=len(tok))
    assert len(calls) == 1 and out["divergence"].shape == (4, ids.shape[1] - 6)
    same = response_divergence(student, [(teacher, torch.arange(4))], ids, torch.ones_like(ids), 6, vocab=len(tok))
    assert torch.allclose(out["divergence"], same["divergence"], atol=1e-5)  # the padded rows change nothing


def test_several_teachers_route_by_column_and_data_completions_mix_in(counting, tmp_path):
    rows = [json.loads(x) for x in open(counting / "sft.jsonl")][:64]
    for i, r in enumerate(rows):
        r["teacher"] = "a" if i % 2 else "b"
    data = tmp_path / "routed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    teacher = f"a={counting / 'teacher'},b={counting / 'teacher-init'}"
    out = distill(counting, tmp_path / "r", teacher=teacher, data=str(data), eval_data=None, max_steps=4, lmbda=0.5)
    assert {r["distill/on_policy"] for r in out if "distill/on_policy" in r} == {0.0, 1.0}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Count from 1 to 2.", "teacher": "c"}) + "\n")
    from rlhf.errors import UserError

    with pytest.raises(UserError, match=r"bad.jsonl:1: teacher 'c' is none of the --teacher names \(a, b\)"):
        distill(counting, tmp_path / "x", teacher=teacher, data=str(bad), eval_data=None)
    prompts_only = tmp_path / "prompts.jsonl"
    prompts_only.write_text(json.dumps({"prompt": "Count from 1 to 2."}) + "\n")
    with pytest.raises(UserError, match="prompts.jsonl:1: --lmbda 0.5 trains 50% of the steps on the data's"):
        distill(counting, tmp_path / "y", data=str(prompts_only), eval_data=None, lmbda=0.5)


def test_a_teacher_with_another_tokenizer_is_one_line(counting, tmp_path, tiny_dir, capsys):
    from rlhf.cli import main

    code = main(["distill", "--model", str(counting / "student"), "--teacher", tiny_dir, "--data",
                 str(counting / "sft.jsonl"), "--output-dir", str(tmp_path / "o"), "--report-to", "none"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 1 and len(err) == 1 and "its tokenizer differs from the student's at token id" in err[0], err
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_the_distillation_demo_runs_and_prints_its_table(tmp_path, capsys):
    from rlhf.cli import main

    assert main(["demo-distill", "--output-dir", str(tmp_path), "--teacher-steps", "20", "--distill-steps", "10"]) == 0
    out = capsys.readouterr().out
    assert "reverse KL to the teacher / token" in out and "teacher exact match" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["reverse_kl"]) == 2 and (tmp_path / "student" / "model.safetensors").exists()
