"""rlhf side by side with TRL, in one run, on one tiny offline setup.

    make bench                      # or: .venv/bin/python benchmarks/compare.py --json bench.json

Same model and tokenizer (built here, no download), same SupportBot data, same batch size,
lengths, generations and steps. Each job runs in its own subprocess so its peak RSS is its own;
its clock starts once the libraries are imported (the same set for both, DeepSpeed too where it
is installed). Prints pairs/s (DPO) and completions/s (GRPO), each the median of ``--repeat`` (5)
interleaved runs,
with our/TRL ratios; for
PPO (TRL no longer ships it) the split of our step time against a lower bound timed in the
same run (the generate call and the forward/backward passes alone); and the peak memory of
PPO with LoRA (actor, reference and critic on one base) over that of SFT on the same model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# TRL's optimizer: transformers' TrainingArguments default (optim="adamw_torch_fused"); ours, where our job
# stands beside TRL's, is set to the same (our default is adamw_torch, one tensor at a time).
AS_TRL = {"optim": "adamw_torch_fused"}


def fresh(a, name: str) -> str:
    """A new, empty output directory for one run of one job: repeats never reuse a run's directory."""
    return tempfile.mkdtemp(prefix=name + "-", dir=a.root)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- setup: tokenizer, model, data ---------------------------------------------------------

def setup(root: str, hidden: int, layers: int, n_rows: int) -> dict:
    """Model, tokenizer and the *same* ``n_rows`` records of each kind for both libraries."""
    from rlhf.demo.world import build_datasets, corpus
    from rlhf.models import save_pretrained, tiny_causal_lm, train_tokenizer

    data = build_datasets(0, n_sft=512, n_pairs=512, n_rl=256, n_eval=16)
    tok = train_tokenizer(corpus(data), vocab_size=512)
    model_dir = os.path.join(root, f"model-{hidden}x{layers}")
    save_pretrained(tiny_causal_lm(tok, "llama", hidden_size=hidden, num_layers=layers), tok, model_dir)
    paths = {"model": model_dir}
    for name in ("sft", "pairs", "rl"):
        paths[name] = os.path.join(root, f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in data[name][:n_rows])
    return paths


def setup_vocab(root: str, small: dict, vocab: int) -> dict:
    """A Qwen2.5-0.5B-shaped model cut to 2 layers (hidden 896, 14 heads, 2 KV heads, MLP 4864, tied
    embeddings) at a real vocabulary, random weights, nothing downloaded; the small setup's
    tokenizer (ids it lacks decode to nothing) and data. At this size the logits dominate."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlhf.models import load_tokenizer, save_pretrained

    tok = load_tokenizer(small["model"])
    config = Qwen2Config(vocab_size=vocab, hidden_size=896, intermediate_size=4864, num_hidden_layers=2,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model_dir = os.path.join(root, f"model-qwen2-2x896-v{vocab}")
    save_pretrained(Qwen2ForCausalLM(config), tok, model_dir)
    return {**small, "model": model_dir}


def vowel_fraction(prompts, completions, **kw):
    """The same rule reward for both libraries (TRL passes conversational completions as messages)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch in "aeiou" for ch in t) / max(len(t), 1) for t in texts]


# ---- jobs (each in its own process) ----------------------------------------------------------

def pair_tokens(p) -> int:
    """Tokens of every pair (prompt rendered with the chat template, both replies): the DPO workload."""
    from rlhf.data import Encoder, prepare
    from rlhf.models import load_tokenizer

    ex = prepare(p["pairs"], "preference", Encoder(load_tokenizer(p["model"]), 128)).examples
    return sum(len(e["prompt_ids"]) * 2 + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in ex)


def job_dpo_ours(a, p):
    from rlhf.recipes import dpo

    t = time.perf_counter()
    dpo.run(dpo.Config(**AS_TRL, model=p["model"], data=p["pairs"], output_dir=fresh(a, "dpo-ours"), max_steps=a.steps,
                       batch_size=a.batch_size, lr=1e-4, max_length=a.max_length, report_to="none", save_total_limit=0,
                       log_samples=0))  # as TRL's DPOTrainer (generate_during_eval=False); ours: 4 prompts twice
    return {"seconds": time.perf_counter() - t, "items": a.steps * a.batch_size, "tokens": pair_tokens(p),
            "peak_rss_mb": rss_mb()}


def job_dpo_trl(a, p):
    import datasets
    from trl import DPOConfig, DPOTrainer

    # TRL's conversational format wants the replies as assistant messages too.
    rows = [{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]}
            for r in (json.loads(x) for x in open(p["pairs"]))]
    t = time.perf_counter()
    args = DPOConfig(output_dir=fresh(a, "dpo-trl"), per_device_train_batch_size=a.batch_size, max_steps=a.steps,
                     learning_rate=1e-4, max_length=a.max_length, beta=0.1, report_to=[], save_strategy="no",
                     logging_steps=a.steps, use_cpu=True, precompute_ref_log_probs=True, dataloader_num_workers=0)
    trainer = DPOTrainer(model=p["model"], args=args, train_dataset=datasets.Dataset.from_list(rows))
    trainer.train()
    trainer.save_model()
    return {"seconds": time.perf_counter() - t, "items": a.steps * a.batch_size, "tokens": pair_tokens(p),
            "peak_rss_mb": rss_mb()}


def job_grpo_ours(a, p):
    from rlhf.recipes import grpo

    sys.modules.setdefault("bench_rewards", sys.modules[__name__])
    t = time.perf_counter()
    out = fresh(a, "grpo-ours")
    grpo.run(grpo.Config(**AS_TRL, model=p["model"], data=p["rl"], output_dir=out, max_steps=a.steps,
                         rollout_batch_size=a.batch_size // a.generations, num_generations=a.generations,
                         mini_batch_size=a.batch_size, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens,
                         reward_fn="bench_rewards:vowel_fraction", lr=1e-4, beta=0.04, use_bias_correction_kl=True,
                         report_to="none", log_every=1))  # TRL 1.13 defaults: loss dapo, bias-corrected KL
    seconds = time.perf_counter() - t
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if '"reward"' in x]
    tokens = sum(r["completions/mean_length"] * a.batch_size for r in rows)
    return {"seconds": seconds, "items": a.steps * a.batch_size, "tokens": tokens, "peak_rss_mb": rss_mb()}


def job_grpo_trl(a, p):
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    rows = [{"prompt": json.loads(x)["prompt"]} for x in open(p["rl"])]
    t = time.perf_counter()
    args = GRPOConfig(output_dir=fresh(a, "grpo-trl"), per_device_train_batch_size=a.batch_size,
                      num_generations=a.generations, max_completion_length=a.max_new_tokens, max_steps=a.steps,
                      learning_rate=1e-4, beta=0.04, report_to=[], save_strategy="no", logging_steps=1,
                      use_cpu=True, temperature=1.0, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=p["model"], reward_funcs=vowel_fraction, args=args,
                          train_dataset=datasets.Dataset.from_list(rows))
    trainer.train()
    trainer.save_model()
    seconds = time.perf_counter() - t
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    tokens = sum(h["completions/mean_length"] * a.batch_size for h in logs)
    return {"seconds": seconds, "items": a.steps * a.batch_size, "tokens": tokens, "peak_rss_mb": rss_mb()}


def job_grpo4_ours(a, p):
    """GRPO with 4 optimizer steps per rollout: a rollout of 4 x batch completions, minibatches of batch."""
    from rlhf.recipes import grpo

    sys.modules.setdefault("bench_rewards", sys.modules[__name__])
    t = time.perf_counter()
    grpo.run(grpo.Config(**AS_TRL, model=p["model"], data=p["rl"], output_dir=fresh(a, "grpo4-ours"), max_steps=a.steps,
                         rollout_batch_size=4 * a.batch_size // a.generations, num_generations=a.generations,
                         mini_batch_size=a.batch_size, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens,
                         reward_fn="bench_rewards:vowel_fraction", lr=1e-4, beta=0.04, clip_eps_high=0.28,
                         use_bias_correction_kl=True, report_to="none", log_every=1))
    return {"seconds": time.perf_counter() - t, "items": 4 * a.steps * a.batch_size, "tokens": 0, "peak_rss_mb": rss_mb()}


def job_grpo4_trl(a, p):
    """TRL's GRPO with steps_per_generation=4: the same rollouts and optimizer steps as job_grpo4_ours."""
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    rows = [{"prompt": json.loads(x)["prompt"]} for x in open(p["rl"])]
    t = time.perf_counter()
    args = GRPOConfig(output_dir=fresh(a, "grpo4-trl"), per_device_train_batch_size=a.batch_size,
                      steps_per_generation=4, num_generations=a.generations, max_completion_length=a.max_new_tokens,
                      max_steps=4 * a.steps, learning_rate=1e-4, beta=0.04, epsilon_high=0.28, report_to=[],
                      save_strategy="no", logging_steps=1, use_cpu=True, temperature=1.0, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=p["model"], reward_funcs=vowel_fraction, args=args,
                          train_dataset=datasets.Dataset.from_list(rows))
    trainer.train()
    trainer.save_model()
    return {"seconds": time.perf_counter() - t, "items": 4 * a.steps * a.batch_size, "tokens": 0, "peak_rss_mb": rss_mb()}


def job_sft_trl(a, p):
    import datasets
    from trl import SFTConfig, SFTTrainer

    rows = [{"prompt": r["prompt"], "completion": [{"role": "assistant", "content": r["completion"]}]}
            for r in (json.loads(x) for x in open(p["sft"]))]
    t = time.perf_counter()
    args = SFTConfig(output_dir=fresh(a, "sft-trl"), per_device_train_batch_size=a.batch_size, max_steps=a.steps,
                     learning_rate=1e-4, max_length=a.max_length, report_to=[], save_strategy="no",
                     logging_steps=a.steps, use_cpu=True, dataloader_num_workers=0)
    trainer = SFTTrainer(model=p["model"], args=args, train_dataset=datasets.Dataset.from_list(rows))
    trainer.train()
    trainer.save_model()
    return {"seconds": time.perf_counter() - t, "peak_rss_mb": rss_mb()}


def job_sft_ours(a, p):
    from rlhf.recipes import sft

    t = time.perf_counter()
    sft.run(sft.Config(**AS_TRL, model=p["model"], data=p["sft"], output_dir=fresh(a, "sft-ours"), max_steps=a.steps,
                       batch_size=a.batch_size, lr=1e-4, max_length=a.max_length, report_to="none",
                       save_total_limit=0))
    return {"seconds": time.perf_counter() - t, "peak_rss_mb": rss_mb()}


def job_ppo_breakdown(a, p):
    """Our PPO step split, and a lower bound timed alone on the same shapes in the same process."""
    import torch

    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.recipes import ppo
    from rlhf.rollout import HFRollout, SamplingParams

    sys.modules.setdefault("bench_rewards", sys.modules[__name__])
    out = fresh(a, "ppo-ours")
    ppo.run(ppo.Config(model=p["model"], data=p["rl"], output_dir=out, max_steps=a.steps, rollout_batch_size=a.batch_size,
                       mini_batch_size=a.batch_size, batch_size=a.batch_size, ppo_epochs=1, max_new_tokens=a.max_new_tokens,
                       reward_fn="bench_rewards:vowel_fraction", lr=1e-5, report_to="none"))
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if "time/step" in x][1:]  # skip warm-up
    split = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k.startswith("time/")}
    # Lower bound: one generate call, and the forward + backward of the update, nothing else.
    tok, model = load_tokenizer(p["model"]), load_causal_lm(p["model"])
    prompts = [tok.apply_chat_template(json.loads(x)["prompt"], add_generation_prompt=True, tokenize=True)
               for x in list(open(p["rl"]))[: a.batch_size]]
    prompts = [x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x for x in prompts]
    ro = HFRollout(model, tok.pad_token_id, tok.eos_token_id)
    t0 = time.perf_counter()
    batch = ro.generate(prompts, SamplingParams(max_new_tokens=a.max_new_tokens))
    t_gen = time.perf_counter() - t0
    ids, mask = batch.input_ids, batch.attention_mask
    model.train()
    t0 = time.perf_counter()
    model(input_ids=ids, attention_mask=mask).logits.float().mean().backward()
    t_fb = time.perf_counter() - t0
    with torch.no_grad():
        t0 = time.perf_counter()
        model(input_ids=ids, attention_mask=mask)
        t_f = time.perf_counter() - t0
    bound = t_gen + t_fb + 2 * t_f  # generate + update fwd/bwd + the two scoring forwards (policy/value, reference)
    return {"split": split, "bound": {"generate": t_gen, "forward_backward": t_fb, "forward": t_f, "total": bound}}


def job_sft_mem(a, p):
    from rlhf.recipes import sft

    base = rss_mb()
    sft.run(sft.Config(model=p["model"], data=p["sft"], output_dir=fresh(a, "sft-mem"), max_steps=3,
                       batch_size=a.batch_size, max_length=a.max_length, report_to="none"))
    return {"peak_rss_mb": rss_mb(), "baseline_rss_mb": base}


def job_ppo_lora_mem(a, p):
    from rlhf.recipes import ppo

    sys.modules.setdefault("bench_rewards", sys.modules[__name__])
    base = rss_mb()
    ppo.run(ppo.Config(model=p["model"], data=p["rl"], output_dir=fresh(a, "ppo-lora-mem"), max_steps=3,
                       rollout_batch_size=a.batch_size, mini_batch_size=a.batch_size, batch_size=a.batch_size, ppo_epochs=1,
                       max_new_tokens=a.max_new_tokens, reward_fn="bench_rewards:vowel_fraction", lora=True, lora_r=16,
                       report_to="none"))
    return {"peak_rss_mb": rss_mb(), "baseline_rss_mb": base}


JOBS = {name[4:]: fn for name, fn in globals().items() if name.startswith("job_")}


def run_job(name: str, a, paths: dict, may_fail: bool = False) -> dict:
    """One job in a process of its own. ``may_fail``: a job that dies (a peer killed for memory) is
    reported as such, ``{"failed": ...}``, instead of ending the run."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--paths", json.dumps(paths)] + a.passthrough
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        why = "killed (SIGKILL: out of memory?)" if proc.returncode == -9 else f"exit status {proc.returncode}"
        if may_fail:
            print(f"  {name}: {why}", file=sys.stderr)
            return {"failed": why}
        raise SystemExit(f"benchmark job {name} failed ({why}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][7:])
    print(f"  {name}: done", file=sys.stderr)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--mem-hidden", type=int, default=512, help="Model width for the memory comparison.")
    ap.add_argument("--mem-layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=151936, help="Vocabulary of the memory jobs' Qwen2.5-0.5B-shaped model.")
    ap.add_argument("--vocab-batch", type=int, default=64,
                    help="Memory jobs: sequences a step (SFT rows, GRPO completions; DPO: half as many pairs).")
    ap.add_argument("--vocab-new-tokens", type=int, default=128)
    ap.add_argument("--vocab-steps", type=int, default=1)
    ap.add_argument("--skip-vocab", action="store_true", help="No memory jobs at the real vocabulary.")
    ap.add_argument("--repeat", type=int, default=5,
                    help="Runs of each speed job, interleaved; the median time is reported.")
    ap.add_argument("--json", help="Write figures and ratios here.")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--paths", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        # The clock starts after imports, for both libraries: `from trl import ...` brings in
        # accelerate, datasets, peft and transformers' Trainer utilities, so load them here for
        # every job rather than let our lazy imports land inside our clock only.
        import accelerate, datasets, peft, torch, transformers.optimization  # noqa: F401, E401

        # DeepSpeed too, where installed (the `deepspeed` extra): transformers' save_pretrained imports
        # it through accelerate's unwrap check the first time a model is saved (0.3 s on 2 CPU cores),
        # in both libraries' jobs, and TRL's GRPO on its first generation.
        if importlib.util.find_spec("deepspeed") is not None:
            import deepspeed  # noqa: F401

        torch.manual_seed(0)
        name = a.worker
        if name.startswith("vocab_"):  # a memory job at the real vocabulary: its own sizes
            name, a.steps, a.max_new_tokens = name[6:], a.vocab_steps, a.vocab_new_tokens
            a.batch_size = a.vocab_batch // 2 if name.startswith("dpo") else a.vocab_batch  # a pair is 2 sequences
        print("RESULT " + json.dumps(JOBS[name](a, json.loads(a.paths))))
        return
    root = tempfile.mkdtemp(prefix="rlhf-bench-")
    a.passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                     if k in ("steps", "batch_size", "generations", "max_new_tokens", "max_length", "vocab_batch",
                              "vocab_new_tokens", "vocab_steps")] + [f"--root={root}"]
    n_rows = a.steps * a.batch_size
    small, big = setup(root, a.hidden, a.layers, n_rows), setup(root, a.mem_hidden, a.mem_layers, n_rows)
    speed = ["dpo_ours", "grpo_ours", "grpo4_ours"] + ([] if a.skip_trl else ["dpo_trl", "grpo_trl", "grpo4_trl"])
    r = {}
    for _ in range(a.repeat):  # interleaved, so a slow spell of the machine hits both libraries
        for name in speed:
            r.setdefault(name, []).append(run_job(name, a, small))
    r = {name: {"seconds": statistics.median(x["seconds"] for x in runs), "items": runs[0]["items"],
                "tokens": statistics.median(x["tokens"] for x in runs),
                "peak_rss_mb": max(x["peak_rss_mb"] for x in runs), "all_seconds": [x["seconds"] for x in runs]}
         for name, runs in r.items()}
    r["ppo_breakdown"] = run_job("ppo_breakdown", a, small)
    r.update({name: run_job(name, a, big) for name in ("sft_mem", "ppo_lora_mem")})
    if not a.skip_vocab:  # peak memory at a real vocabulary, ours and TRL's, one job each
        vocab = setup_vocab(root, small, a.vocab)
        for algo in ("sft", "dpo", "grpo"):
            for lib in ("ours",) + (() if a.skip_trl else ("trl",)):
                r[f"vocab_{algo}_{lib}"] = run_job(f"vocab_{algo}_{lib}", a, vocab, may_fail=lib == "trl")
    report(a, r)


def report(a, r: dict) -> None:
    nan = float("nan")

    def rate(job):
        return r[job]["items"] / r[job]["seconds"] if job in r else nan

    out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
           "settings": {k: getattr(a, k) for k in ("steps", "batch_size", "generations", "max_new_tokens", "hidden", "layers")},
           "raw": r}
    print(f"\nrlhf vs TRL, {out['machine']}; {a.steps} steps, batch {a.batch_size}, G={a.generations}, "
          f"{a.max_new_tokens} new tokens, Llama {a.layers}x{a.hidden}; median of {a.repeat} runs\n")
    print(f"{'':28}{'rlhf':>10}{'TRL':>10}{'ratio':>8}")
    for algo, ours, theirs, unit in (("DPO", "dpo_ours", "dpo_trl", "pairs/s"), ("GRPO", "grpo_ours", "grpo_trl",
                                                                                "completions/s")):
        rows = ((unit, lambda j: rate(j)), ("tokens/s", lambda j: r[j]["tokens"] / r[j]["seconds"] if j in r else nan),
                ("peak RSS MB", lambda j: r[j]["peak_rss_mb"] if j in r else nan))
        for label, f in rows:
            o, t = f(ours), f(theirs)
            print(f"{algo + ' ' + label:28}{o:10.1f}{t:10.1f}{o / t:8.2f}")
            out[f"{algo.lower()}_{label.replace(' ', '_').replace('/', '_per_')}"] = {"rlhf": o, "trl": t}
        out[f"{algo.lower()}_speedup_vs_trl"] = rate(ours) / rate(theirs) if theirs in r else None
    o, t = rate("grpo4_ours"), rate("grpo4_trl")
    print(f"{'GRPO 4 minibatches/rollout':28}{o:10.1f}{t:10.1f}{o / t:8.2f}   completions/s (TRL: steps_per_generation=4)")
    out["grpo_4_minibatches_speedup_vs_trl"] = o / t if "grpo4_trl" in r else None
    split, bound = r["ppo_breakdown"]["split"], r["ppo_breakdown"]["bound"]
    out["ppo_step_over_bound"] = split["time/step"] / bound["total"]
    print("\nPPO step (rlhf), mean seconds:")
    for k in ("time/generate", "time/score", "time/policy_value_pass", "time/reference_pass", "time/train",
                  "time/weight_sync", "time/step"):
        print(f"  {k:28}{split.get(k, float('nan')):8.3f}")
    print(f"  lower bound: generate {bound['generate']:.3f} + update fwd/bwd {bound['forward_backward']:.3f} + "
          f"2 x forward {bound['forward']:.3f} = {bound['total']:.3f}")
    print(f"  step / bound = {out['ppo_step_over_bound']:.2f}")
    sft_m, ppo_m = r["sft_mem"], r["ppo_lora_mem"]
    out["ppo_lora_peak_over_sft"] = ppo_m["peak_rss_mb"] / sft_m["peak_rss_mb"]
    out["ppo_lora_peak_over_sft_above_baseline"] = ((ppo_m["peak_rss_mb"] - ppo_m["baseline_rss_mb"])
                                                    / (sft_m["peak_rss_mb"] - sft_m["baseline_rss_mb"]))
    print(f"\nPeak RSS, Llama {a.mem_layers}x{a.mem_hidden}: SFT {sft_m['peak_rss_mb']:.0f} MB, PPO+LoRA "
          f"{ppo_m['peak_rss_mb']:.0f} MB: ratio {out['ppo_lora_peak_over_sft']:.2f} "
          f"({out['ppo_lora_peak_over_sft_above_baseline']:.2f} above the {sft_m['baseline_rss_mb']:.0f} MB import baseline)")
    if not a.skip_vocab:
        print(f"\nPeak RSS MB at vocabulary {a.vocab} (Qwen2.5-0.5B shape cut to 2 layers, random weights): "
              f"{a.vocab_batch} sequences a step (SFT rows, GRPO completions, G={a.generations}; "
              f"{a.vocab_batch // 2} DPO pairs), {a.vocab_new_tokens} new "
              f"tokens, max length {a.max_length}, {a.vocab_steps} step(s)")
        print(f"{'':28}{'rlhf':>10}{'TRL':>10}{'ratio':>8}{'rlhf s':>9}{'TRL s':>9}")
        for algo in ("sft", "dpo", "grpo"):
            ours, theirs = r[f"vocab_{algo}_ours"], r.get(f"vocab_{algo}_trl", {})
            o, t = ours["peak_rss_mb"], theirs.get("peak_rss_mb", nan)
            print(f"{algo.upper() + ' peak RSS MB':28}{o:10.0f}{t:10.0f}{o / t:8.2f}{ours['seconds']:9.1f}"
                  f"{theirs.get('seconds', nan):9.1f}" + (f"   TRL {theirs['failed']}" if "failed" in theirs else ""))
            out[f"{algo}_peak_vs_trl_{a.vocab // 1000}k"] = o / t if "peak_rss_mb" in theirs else None
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
