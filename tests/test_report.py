"""``rlhf report`` and ``samples.jsonl`` (issue 15 item 3): sample writing and resume truncation,
threshold lines from the monitor's rules, escaping (tier 2); then tiny PPO, GRPO and SFT runs through
the command line, their reports, and the demo's monitor section on the PPO run (tier 3)."""

import html
import json
import shutil

import pytest
import torch

from rlhf.cli import main
from rlhf.watch import report
from rlhf.watch.samples import SampleLog

EVIL = "<script>alert('x')</script> & \"quotes\""


# ---- tier 2: pieces ---------------------------------------------------------------------------

def test_samples_written_at_step_1_logged_steps_and_last_then_truncated_on_resume(tmp_path):
    log = SampleLog(str(tmp_path), n_samples=2, log_every=3, total_steps=7, start_step=0, is_main=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    for step in range(1, 8):
        log.write(step, ["p0", "p1", "p2"], ["c0", "c1", "c2"], torch.tensor([0.5, -1.0, 2.0]), mask)
    rows = [json.loads(x) for x in open(tmp_path / "samples.jsonl")]
    assert [r["step"] for r in rows] == [1, 1, 3, 3, 6, 6, 7, 7]  # step 1, every 3rd, the last
    assert rows[1] == {"step": 1, "index": 1, "prompt": "p1", "completion": "c1", "score": -1.0, "length": 3}
    # GRPO: G = 2 completions a prompt, contiguous; the first of each group is written.
    SampleLog(str(tmp_path), 2, 1, 1, 0, True).write(1, ["a", "b"], ["a0", "a1", "b0", "b1"],
                                                    torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.ones(4, 2), group_size=2)
    rows = [json.loads(x) for x in open(tmp_path / "samples.jsonl")]
    assert [(r["completion"], r["score"]) for r in rows] == [("a0", 1.0), ("b0", 3.0)]  # start_step 0 emptied it
    log = SampleLog(str(tmp_path), 2, 1, 3, 1, True)  # resumed from step 1: its lines stay
    for step in (2, 3):
        log.write(step, ["x"], ["y"], torch.tensor([0.0]), torch.ones(1, 1))
    SampleLog(str(tmp_path), 2, 1, 3, 2, True)  # resume from step 2: step 3's line goes
    assert [json.loads(x)["step"] for x in open(tmp_path / "samples.jsonl")] == [1, 1, 2]
    SampleLog(str(tmp_path), 2, 1, 3, 0, is_main=False).write(1, ["x"], ["y"], torch.tensor([0.0]), torch.ones(1, 1))
    assert len(open(tmp_path / "samples.jsonl").readlines()) == 3  # another process writes nothing


def test_threshold_lines_follow_the_monitor_rules():
    config = {"monitor_distinct_drop": 0.3, "monitor_length_growth": 0.5, "monitor_reward_length_corr": 0.7,
              "monitor_kl_fraction": None}
    lines = report.monitor_thresholds(report.Run("d", [], [], config=config))
    assert lines == {"monitor/distinct2_across_vs_start": [-0.3], "monitor/length_vs_start": [0.5],
                     "monitor/reward_length_corr": [-0.7, 0.7]}
    # No config saved (a run still going): the threshold a warning recorded.
    event = {"step": 1, "event": "warning", "signal": "monitor/length_vs_start", "value": 0.0, "threshold": -1.0}
    assert report.monitor_thresholds(report.Run("d", [], [event])) == {"monitor/length_vs_start": [-1.0]}


def test_model_text_is_escaped(tmp_path):
    run = report.Run(str(tmp_path), [{"step": 1, "objective/scores": 0.5}], [], recipe="ppo",
                     samples=[{"step": 1, "index": 0, "prompt": [{"role": "user", "content": EVIL}],
                               "completion": EVIL, "score": 1.0, "length": 4}])
    page = report.render(run)
    assert "<script>" not in page
    assert page.count(html.escape(EVIL)) == 2 and html.escape("user: " + EVIL) in page  # prompt, completion


def test_plots_have_y_axis_ticks():
    """Issue 22, item 12: the y axis showed only the data's two ends, with no tick marks."""
    from rlhf.watch.plots import svg_plot, tick_label, ticks

    assert ticks(0.0, 1.0) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert ticks(14.5, 16.1) == pytest.approx([14.5, 15.0, 15.5, 16.0])
    assert [tick_label(v, 0.05) for v in ticks(0.4, 0.6)] == ["0.40", "0.45", "0.50", "0.55", "0.60"]
    assert [tick_label(v, 2e-8) for v in ticks(0.1, 0.1000001)][:2] == ["0.1", "0.10000002"]  # labels differ
    svg = svg_plot("reward", [1, 2, 3], [0.0, 0.5, 1.0])
    labels = [s.split(">")[1].split("<")[0] for s in svg.split('class="ya"')[1:]]
    assert labels == ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"] and svg.count('class="grid"') == 6


def test_per_reward_function_curves_are_shown_not_folded():
    """Issue 22, item 12: rewards/NAME was folded away under "Every other metric"; now each function's mean and
    std are plotted in their own section (rewards/NAME, the same mean, once)."""
    rows = [{"step": s, "reward": 0.1 * s, "rewards/f/mean": 0.1 * s, "rewards/f/std": 0.2, "rewards/f": 0.1 * s,
             "entropy": 1.0} for s in (1, 2, 3)]
    page = report.render(report.Run("d", rows, [], recipe="grpo"))
    shown = page[page.index("<h2>Reward functions</h2>"):page.index("<details><summary>Every other metric")]
    assert "<title>rewards/f/mean</title>" in shown and "<title>rewards/f/std</title>" in shown
    assert "<title>rewards/f</title>" not in page and "<title>entropy</title>" in page
    old = [{"step": s, "reward": 0.1 * s, "rewards/f": 0.1 * s} for s in (1, 2)]  # a run before the std was logged
    assert "<title>rewards/f</title>" in report.render(report.Run("d", old, [], recipe="ppo")).split("Other metrics")[0]
    dpo = [{"step": 1, "train/loss": 0.7, "rewards/chosen": 0.1}]  # DPO's rewards/* are no reward functions
    assert "Reward functions" not in report.render(report.Run("d", dpo, [], recipe="dpo"))


# ---- tier 3: runs through the command line ------------------------------------------------------

def ppo_args(tiny_dir, prompts, out, *extra):
    return ["ppo", "--model", tiny_dir, "--data", prompts, "--reward-fn", "rule_rewards:vowel_fraction",
            "--output-dir", out, "--max-steps", "3", "--rollout-batch-size", "8", "--mini-batch-size", "8",
            "--batch-size", "8", "--ppo-epochs", "1", "--max-new-tokens", "12", "--lr", "3e-3", "--report-to", "none",
            "--log-every", "2", "--log-samples", "3", *extra]


@pytest.fixture(scope="module")
def ppo_run(tiny_dir, tmp_path_factory):
    """A 3-step PPO run whose prompts need escaping; --monitor-length-growth -1 warns at step 1."""
    d = tmp_path_factory.mktemp("ppo-report")
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about item {i} <b>&</b>."}) + "\n" for i in range(32)))
    out = str(d / "o")
    assert main(ppo_args(tiny_dir, str(prompts), out, "--monitor-length-growth=-1")) == 0
    return out


def read_samples(run_dir):
    return [json.loads(x) for x in open(f"{run_dir}/samples.jsonl")]


def test_ppo_writes_samples_at_step_1_each_logged_step_and_the_last(ppo_run):
    rows = read_samples(ppo_run)
    assert [r["step"] for r in rows] == [1, 1, 1, 2, 2, 2, 3, 3, 3]  # --log-every 2, --log-samples 3
    metrics = {r["step"]: r for r in map(json.loads, open(f"{ppo_run}/metrics.jsonl")) if "event" not in r}
    for r in rows:
        assert r["prompt"].startswith("Tell me about item") and isinstance(r["completion"], str)
        assert 0 <= r["length"] <= 12 and 0.0 <= r["score"] <= 1.0  # vowel fraction
    assert sorted(metrics) == [2, 3]  # every logged step has samples, and step 1 (the SFT model's) too


def test_report_of_a_ppo_run(ppo_run, tmp_path):
    out = tmp_path / "r.html"
    assert main(["report", ppo_run, "--output", str(out)]) == 0
    page = out.read_text()
    for section in ("<h2>The run</h2>", "rlhf ppo", "<h2>Reward, KL and loss</h2>", "<h2>Over-optimisation monitor</h2>",
                    "<h2>Sample responses</h2>", "rule_rewards:vowel_fraction"):
        assert section in page, section
    # One plot per monitor signal, each an inline SVG; no file beside the page.
    first = next(r for r in map(json.loads, open(f"{ppo_run}/metrics.jsonl")) if "event" not in r)
    signals = [k for k in first if k.startswith("monitor/")]
    assert signals and all(f"<title>{s}</title>" in page for s in signals)
    assert "<img" not in page
    # The warning: its row in the table, its threshold line and its step marked on the plot.
    table = page[page.index('<table class="warnings">'):]
    assert "<td>1</td><td>monitor/length_vs_start</td><td>0</td><td>-1</td>" in table
    assert 'class="thr"><title>threshold -1</title>' in page and 'class="warn"' in page
    # Samples: first, middle, last logged steps; prompts escaped.
    assert all(f"<th>step {s}</th>" in page for s in (1, 2, 3))
    first = read_samples(ppo_run)[0]
    assert "&lt;b&gt;&amp;&lt;/b&gt;." in html.escape(first["prompt"]) and html.escape(first["prompt"]) in page
    assert "<b>&</b>" not in page and html.escape(first["completion"]) in page
    # The same run gives the same bytes; --steps chooses the columns.
    assert main(["report", ppo_run, "--output", str(tmp_path / "again.html")]) == 0
    assert (tmp_path / "again.html").read_bytes() == out.read_bytes()
    assert main(["report", ppo_run, "--output", str(out), "--steps", "1,3"]) == 0
    page = out.read_text()
    assert "<th>step 1</th>" in page and "<th>step 3</th>" in page and "<th>step 2</th>" not in page


def test_report_default_output_is_in_the_run_dir(ppo_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(ppo_run, run, ignore=shutil.ignore_patterns("*.safetensors", "checkpoints"))
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").exists() and capsys.readouterr().out.strip() == str(run / "report.html")
    assert not [p for p in run.iterdir() if p.name.startswith(".report-")]  # no temporary left


def test_report_refuses_steps_without_samples_in_one_line(ppo_run, tmp_path, capsys):
    assert main(["report", ppo_run, "--output", str(tmp_path / "r.html"), "--steps", "1,5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--steps 5" in err[0] and "steps with samples: 1, 2, 3" in err[0], err
    assert not (tmp_path / "r.html").exists()


def test_report_refuses_a_directory_without_metrics_in_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == (f"rlhf report: error: {tmp_path}: no metrics.jsonl here; give the "
                                        "--output-dir of an rlhf sft, rm, ppo, dpo or grpo run"), err
    assert not (tmp_path / "report.html").exists()


def test_grpo_writes_the_first_completion_of_each_group(tiny_dir, prompts_file, tmp_path):
    out = str(tmp_path / "g")
    assert main(["grpo", "--model", tiny_dir, "--data", prompts_file, "--reward-fn", "rule_rewards:vowel_fraction",
                 "--output-dir", out, "--max-steps", "2", "--rollout-batch-size", "4", "--num-generations", "4",
                 "--mini-batch-size", "16", "--batch-size", "16", "--max-new-tokens", "8", "--report-to", "none",
                 "--log-samples", "2"]) == 0
    rows = read_samples(out)
    assert [(r["step"], r["index"]) for r in rows] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert rows[0]["prompt"] != rows[1]["prompt"]  # two prompts, not two samples of one
    assert main(["report", out]) == 0
    page = open(f"{out}/report.html").read()
    assert "rlhf grpo" in page and "<title>reward</title>" in page and "<h2>Sample responses</h2>" in page


def test_dpo_writes_samples_and_its_report_shows_them(tiny_dir, tmp_path):
    """Issue 22, item 12: a DPO run wrote no samples, so its report page had none. Now: the policy's greedy
    completions of the first --eval-data prompts at step 0, each --eval-every step and the end."""
    pairs = [{"prompt": f"Paint the box {c}.", "chosen": f" The box is {c}.", "rejected": " No."} for c in
             ("red", "blue", "green", "pink") * 4]
    for name in ("d", "e"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    out = str(tmp_path / "dpo")
    assert main(["dpo", "--model", tiny_dir, "--data", str(tmp_path / "d.jsonl"), "--eval-data",
                 str(tmp_path / "e.jsonl"), "--output-dir", out, "--max-steps", "3", "--eval-every", "2",
                 "--batch-size", "4", "--max-length", "24", "--report-to", "none", "--log-samples", "2"]) == 0
    rows = read_samples(out)
    assert [(r["step"], r["index"]) for r in rows] == [(0, 0), (0, 1), (2, 0), (2, 1), (3, 0), (3, 1)]
    assert rows[0]["prompt"].endswith("Paint the box red.") and "score" not in rows[0]
    assert all(isinstance(r["completion"], str) and 1 <= r["length"] for r in rows)
    assert main(["report", out]) == 0
    page = open(f"{out}/report.html").read()
    assert "<h2>Sample responses</h2>" in page and all(f"<th>step {s}</th>" in page for s in (0, 2, 3))
    assert "greedy completions" in page and "score " not in page.split("<h2>Sample responses</h2>")[1]


def test_report_of_an_sft_run(tiny_dir, tmp_path):
    rows = [{"prompt": f"Paint the box {c}.", "completion": f" The box is now {c}."} for c in ("red", "blue") * 8]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "sft")
    assert main(["sft", "--model", tiny_dir, "--data", str(data), "--output-dir", out, "--max-steps", "3",
                 "--batch-size", "8", "--max-length", "32", "--report-to", "none"]) == 0
    assert main(["report", out]) == 0
    page = open(f"{out}/report.html").read()
    assert "<h1>rlhf sft: " in page and "<h2>Reward, KL and loss</h2>" in page and "<title>train/loss</title>" in page
    assert "README.md (the model card)" in page  # the config it ran with
    assert "Over-optimisation monitor" not in page and "Sample responses" not in page


def test_demo_page_shows_the_ppo_runs_monitor(ppo_run, tmp_path):
    from rlhf.demo.report import monitor_html

    run = tmp_path / "demo" / "ppo"
    shutil.copytree(ppo_run, run, ignore=shutil.ignore_patterns("*.safetensors", "checkpoints"))
    section = monitor_html(str(tmp_path / "demo"), str(run))
    assert "<h2>Over-optimisation monitor</h2>" in section and "monitor/length_vs_start" in section
    assert '<a href="ppo/report.html">' in section and (run / "report.html").exists()


def test_demo_html_embeds_the_monitor_section(ppo_run, tmp_path, monkeypatch):
    from rlhf.demo import report as demo_report

    run = tmp_path / "demo" / "ppo"
    shutil.copytree(ppo_run, run, ignore=shutil.ignore_patterns("*.safetensors", "checkpoints"))
    # The models' parts of the page (matplotlib figures, the explain table) are the fast demo's test.
    monkeypatch.setattr(demo_report, "_plots", lambda out, summary, ppo_dir: [])
    monkeypatch.setattr(demo_report, "_explain_table", lambda *a: "| t |\n|---|\n| x |")
    demo_report.write_html(str(tmp_path / "demo"), {"seconds": 1.0, "answers": {"prompt": "p"}}, "table",
                           ppo_dir=str(run), sft_dir="s", rm_dir="r")
    page = (tmp_path / "demo" / "report.html").read_text()
    assert "<h2>Over-optimisation monitor</h2>" in page and "svg .thr{" in page and 'class="warnings"' in page
