"""rlhf on one GPU, in one run: rollout engines, update MFU, GRPO and DPO against TRL, PPO's step bound, memory.

    make bench-gpu                                   # or: python benchmarks/gpu.py --json gpu.json
    python benchmarks/gpu.py --tiny --skip-trl       # the same code on CPU at toy sizes (CI runs this)

The model has Qwen2.5-0.5B's shape with random weights (``rlhf.models.shapes``; nothing is
downloaded), so sampled responses run to their length limit (a random model emits EOS about
once in 151,936 tokens). Sections, all on the same card in the same run:

1. Decode tokens/s of each engine (``generate``, our sampling loop, transformers' continuous
   batching, the static-cache CUDA-graph engine) at each ``--seqs`` count, end to end (prefill
   included), and as a fraction of the bound: the prompts' FLOPs at the card's bf16 peak plus,
   per decode step, the bytes of the weights and of the KV cache read, at the card's bandwidth.
2. MFU of the SFT, DPO and GRPO updates (forward, backward, AdamW step; bf16 autocast, fp32
   master weights, as the recipes run) at ``--update-len`` tokens a sequence: model FLOPs are
   6 N per token plus causal attention, 6 x layers x width x sequence length per token.
3. GRPO completions/s and DPO pairs/s, ours against TRL's trainers (TRL without vLLM samples with
   ``generate``), equal settings, each job in its own process, whole job timed as in
   ``compare.py`` (model load, reference pass, training, save); peak GPU memory of each job.
4. PPO: our mean step against its lower bound (one call of the same engine, the update's
   forward and backward, and the two scoring forwards, timed alone on the same batch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PEAK_FLOPS = {"cuda": 989e12}  # H100 SXM dense bf16 (datasheet)
PEAK_BYTES = {"cuda": 3.35e12}  # H100 SXM HBM3 (datasheet)


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clock() -> float:
    sync()
    return time.perf_counter()


def peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def reset_peak() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def shape_of(a):
    return "tiny" if a.tiny else a.shape


def build_model(a, dtype, tokenizer=None, device=None):
    import torch

    from rlhf.models.shapes import SHAPES, shaped_causal_lm

    SHAPES.setdefault("tiny", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=True))
    if a.tiny:
        from rlhf.models.shapes import shaped_config
        from transformers import AutoModelForCausalLM

        config = shaped_config("tiny", tokenizer, vocab_size=1024)
        torch.manual_seed(0)
        with torch.device(device or a.device):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    return shaped_causal_lm(a.shape, tokenizer, device=device or a.device, dtype=dtype)


# ---- 1. decode engines --------------------------------------------------------------------------

class ContinuousBatching:
    """transformers' continuous batching (paged attention) behind ``generate(prompts, params)``."""

    def __init__(self, model, pad_id, eos_id):
        self.model, self.pad_id, self.eos_id = model, pad_id, eos_id

    def generate(self, prompts, params):
        from transformers import GenerationConfig

        cfg = GenerationConfig(do_sample=params.temperature > 0, temperature=params.temperature or None, top_k=0,
                               top_p=1.0, max_new_tokens=params.max_new_tokens, eos_token_id=self.eos_id,
                               pad_token_id=self.pad_id)
        out = self.model.generate_batch(inputs=prompts, generation_config=cfg, progress_bar=False)
        return [o.generated_tokens for o in out.values()]


def bandwidth_bound(config, n_params: int, B: int, P: int, T: int, peak_flops: float, peak_bytes: float) -> float:
    """Seconds no engine can beat: prompt FLOPs (2 N per token) at peak, then per step the bf16
    weights and the KV cache of every sequence (P + t tokens at step t) read once at bandwidth."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2  # K and V, bf16
    weights = 2 * n_params
    kv = B * kv_per_token * sum(P + t for t in range(T))
    return 2 * n_params * B * P / peak_flops + (T * weights + kv) / peak_bytes


def measure_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, bytes read plus written per second (median of 10)."""
    import torch

    x = torch.empty(2**29, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    times = []
    for _ in range(12):
        t0 = clock()
        y.copy_(x)
        times.append(clock() - t0)
    return 2 * x.numel() * 2 / statistics.median(times[2:])


def section_decode(a) -> list[dict]:
    import copy

    import torch

    from rlhf.rollout import HFRollout, SamplingParams, StaticRollout

    torch.manual_seed(0)
    model = build_model(a, torch.bfloat16 if a.device == "cuda" else torch.float32).eval()
    V, eos, pad_id = model.config.vocab_size, 2, 0
    n_params = sum(p.numel() for p in model.parameters())
    engines = {
        "generate": lambda: HFRollout(model, pad_id, eos, use_generate=True),
        "loop": lambda: HFRollout(model, pad_id, eos),
        "static + CUDA graphs" if a.device == "cuda" else "static (eager on CPU)": lambda: StaticRollout(model, pad_id, eos),
        "continuous batching": lambda: ContinuousBatching(copy.deepcopy(model), pad_id, eos),
    }
    engines = {k: v for k, v in engines.items() if k.split()[0] in a.engines}
    peak_flops, peak_bytes = PEAK_FLOPS.get(a.device), PEAK_BYTES.get(a.device)
    rows = []
    for name, make in engines.items():
        try:
            engine = make()
        except Exception as e:  # an engine this transformers lacks is reported, not fatal
            rows.append({"engine": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
            continue
        for B in a.seqs:
            g = torch.Generator().manual_seed(B)
            prompts = torch.randint(10, V, (B, a.prompt_len), generator=g).tolist()
            params = SamplingParams(temperature=1.0, max_new_tokens=a.new_tokens)
            try:
                engine.generate(prompts, params)  # warm-up: kernels, graph capture, allocator
                times = []
                for _ in range(a.decode_repeat):
                    t0 = clock()
                    out = engine.generate(prompts, params)
                    times.append(clock() - t0)
            except Exception as e:
                rows.append({"engine": name, "seqs": B, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
                print(f"  decode {name} x{B}: FAILED {rows[-1]['error']}", file=sys.stderr)
                break
            tokens = sum(map(len, out)) if isinstance(out, list) else out.response_ids.numel()
            seconds = statistics.median(times)
            row = {"engine": name, "seqs": B, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
            if peak_bytes:
                bound = bandwidth_bound(model.config, n_params, B, a.prompt_len, a.new_tokens, peak_flops, peak_bytes)
                row["bound_tokens_per_s"] = B * a.new_tokens / bound
                row["fraction_of_bound"] = row["tokens_per_s"] / row["bound_tokens_per_s"]
            rows.append(row)
            print(f"  decode {name} x{B}: {row['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
        del engine
        reset_peak()
    return rows


# ---- 2. update MFU ------------------------------------------------------------------------------

def update_flops(config, n_params: int, tokens: int, seq_len: int) -> float:
    """6 N per token plus causal attention (QK^T and AV, forward and backward, half the square)."""
    width = config.num_attention_heads * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return tokens * (6 * n_params + 6 * config.num_hidden_layers * width * seq_len)


def section_mfu(a) -> list[dict]:
    import torch
    from accelerate import Accelerator

    from rlhf.algos import dpo_loss
    from rlhf.data import collate_preference
    from rlhf.recipes import dpo, grpo, sft
    from rlhf.recipes.logprobs import model_response_logprobs, packed_response_logprobs

    rows = []
    L, V = a.update_len, None
    for kind in ("SFT", "DPO", "GRPO padded", "GRPO packed"):
        reset_peak()
        accelerator = Accelerator(mixed_precision="bf16" if a.device == "cuda" else "no", cpu=a.device != "cuda")
        model = build_model(a, torch.float32)
        model.config.use_cache = False
        V = model.config.vocab_size
        n_params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        model, optimizer = accelerator.prepare(model, optimizer)
        model.train()
        g = torch.Generator().manual_seed(0)
        B = a.update_batch
        if kind == "SFT":
            ids = torch.randint(10, V, (B, L), generator=g).to(accelerator.device)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

            def step():
                loss, _ = sft.loss_fn(model, batch)
                return loss
            tokens = B * L
        elif kind == "DPO":
            P = L // 4
            pairs = [{"prompt_ids": torch.randint(10, V, (P,), generator=g).tolist(),
                      "chosen_ids": torch.randint(10, V, (L - P,), generator=g).tolist(),
                      "rejected_ids": torch.randint(10, V, (L - P,), generator=g).tolist()} for _ in range(B // 2)]
            batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v
                     for k, v in collate_preference(pairs, 0).items()}
            ref = torch.zeros(B // 2, device=accelerator.device)

            def step():
                chosen, rejected = dpo.pair_logps(model, batch)
                return dpo_loss(chosen, rejected, ref, ref, 0.1)[0]
            tokens = B * L  # B // 2 pairs, two sequences of L each
        else:
            G, P = 8, min(64, L // 4)
            n = max(G, B * 4 // G * G) if not a.tiny else G
            prompts = torch.randint(10, V, (n // G, P), generator=g).repeat_interleave(G, 0)
            ids = torch.cat([prompts, torch.randint(10, V, (n, L - P), generator=g)], 1).to(accelerator.device)
            cfg = grpo.Config(model="-", data="-", mini_batch_size=n, batch_size=B, beta=0.04)
            fn = packed_response_logprobs if kind.endswith("packed") else model_response_logprobs
            buf = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_len": P,
                   "response_mask": torch.ones(n, L - P, dtype=torch.long, device=ids.device),
                   "old_logprobs": None, "ref_logprobs": torch.full((n, L - P), -12.0, device=ids.device),
                   "advantages": torch.randn(n, L - P, generator=g).to(ids.device)}
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
            step = None
            tokens = n * L
        times = []
        try:
            for i in range(a.update_repeat + 2):
                t0 = clock()
                if step is None:
                    grpo.grpo_update(cfg, accelerator, model, optimizer, scheduler, buf, fn)
                else:
                    accelerator.backward(step())
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                times.append(clock() - t0)
        except torch.OutOfMemoryError as e:
            rows.append({"update": kind, "error": f"out of memory ({str(e).splitlines()[0][:80]})"})
            del model, optimizer
            continue
        seconds = statistics.median(times[2:])
        flops = update_flops(accelerator.unwrap_model(model).config, n_params, tokens, L)
        row = {"update": kind, "batch_tokens": tokens, "seconds": seconds, "tflops": flops / seconds / 1e12,
               "peak_gib": peak_gib()}
        if a.device in PEAK_FLOPS:
            row["mfu"] = flops / seconds / PEAK_FLOPS[a.device]
        rows.append(row)
        print(f"  update {kind}: {seconds * 1e3:.0f} ms, {row['tflops']:.1f} TFLOP/s", file=sys.stderr)
        del model, optimizer, accelerator
    reset_peak()
    return rows


# ---- 3-4. recipes, ours and TRL's, each job in its own process -------------------------------

def setup_jobs(a, root: str) -> dict:
    from rlhf.demo.world import build_datasets, corpus
    from rlhf.models import save_pretrained, train_tokenizer

    data = build_datasets(0, n_sft=64, n_pairs=512, n_rl=256, n_eval=16)
    tok = train_tokenizer(corpus(data), vocab_size=512)
    paths = {"model": os.path.join(root, "model")}
    save_pretrained(build_model(a, __import__("torch").float32, tok), tok, paths["model"])
    for name in ("pairs", "rl"):
        paths[name] = os.path.join(root, f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in data[name])
    return paths


def vowel_fraction(prompts, completions, **kw):
    """The same rule reward for both libraries (TRL passes conversational completions as messages)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch in "aeiou" for ch in t) / max(len(t), 1) for t in texts]


def job_grpo_ours(a, p):
    from rlhf.recipes import grpo

    sys.modules.setdefault("bench_rewards", sys.modules[__name__])
    t = clock()
    grpo.run(grpo.Config(model=p["model"], data=p["rl"], output_dir=os.path.join(a.root, "grpo-ours"),
                         max_steps=a.rl_steps, rollout_batch_size=a.rl_batch // a.generations,
                         num_generations=a.generations, mini_batch_size=a.rl_batch, batch_size=a.rl_micro,
                         max_new_tokens=a.rl_new_tokens, reward_fn="bench_rewards:vowel_fraction", lr=1e-6, beta=0.04,
                         report_to="none", save_total_limit=0, rollout_engine=a.rollout_engine))
    seconds = clock() - t
    rows = [json.loads(x) for x in open(os.path.join(a.root, "grpo-ours", "metrics.jsonl")) if '"reward"' in x]
    return {"seconds": seconds, "items": a.rl_steps * a.rl_batch, "peak_gib": peak_gib(),
            "mean_length": statistics.mean(r["completions/mean_length"] for r in rows),
            "generate_share": sum(r["time/generate"] for r in rows[1:]) / max(1e-9, sum(r["time/step"] for r in rows[1:]))}


def job_grpo_trl(a, p):
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    rows = [{"prompt": json.loads(x)["prompt"]} for x in open(p["rl"])]
    t = clock()
    args = GRPOConfig(output_dir=os.path.join(a.root, "grpo-trl"), per_device_train_batch_size=a.rl_batch,
                      num_generations=a.generations, max_completion_length=a.rl_new_tokens, max_steps=a.rl_steps,
                      learning_rate=1e-6, beta=0.04, report_to=[], save_strategy="no", logging_steps=1,
                      bf16=True, temperature=1.0, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=p["model"], reward_funcs=vowel_fraction, args=args,
                          train_dataset=datasets.Dataset.from_list(rows))
    trainer.train()
    trainer.save_model()
    seconds = clock() - t
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"seconds": seconds, "items": a.rl_steps * a.rl_batch, "peak_gib": peak_gib(),
            "mean_length": statistics.mean(h["completions/mean_length"] for h in logs)}


def job_dpo_ours(a, p):
    from rlhf.recipes import dpo

    t = clock()
    dpo.run(dpo.Config(model=p["model"], data=p["pairs"], output_dir=os.path.join(a.root, "dpo-ours"),
                       max_steps=a.dpo_steps, batch_size=a.dpo_batch, lr=1e-6, max_length=a.dpo_max_length,
                       report_to="none", save_total_limit=0))
    return {"seconds": clock() - t, "items": a.dpo_steps * a.dpo_batch, "peak_gib": peak_gib()}


def job_dpo_trl(a, p):
    import datasets
    from trl import DPOConfig, DPOTrainer

    rows = [{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]}
            for r in (json.loads(x) for x in open(p["pairs"]))]
    t = clock()
    args = DPOConfig(output_dir=os.path.join(a.root, "dpo-trl"), per_device_train_batch_size=a.dpo_batch,
                     max_steps=a.dpo_steps, learning_rate=1e-6, max_length=a.dpo_max_length, beta=0.1, report_to=[],
                     save_strategy="no", logging_steps=a.dpo_steps, bf16=True, precompute_ref_log_probs=True,
                     dataloader_num_workers=0)
    trainer = DPOTrainer(model=p["model"], args=args, train_dataset=datasets.Dataset.from_list(rows))
    trainer.train()
    trainer.save_model()
    return {"seconds": clock() - t, "items": a.dpo_steps * a.dpo_batch, "peak_gib": peak_gib()}


def job_ppo(a, p):
    """Our PPO steps, then the lower bound timed alone on one of its batches, in the same process."""
    import torch

    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.recipes import ppo
    from rlhf.rollout import SamplingParams, make_rollout

    sys.modules.setdefault("bench_rewards", sys.modules[__name__])
    out = os.path.join(a.root, "ppo-ours")
    ppo.run(ppo.Config(model=p["model"], data=p["rl"], output_dir=out, max_steps=a.rl_steps,
                       rollout_batch_size=a.rl_batch, mini_batch_size=a.rl_batch, batch_size=a.rl_micro, ppo_epochs=1,
                       max_new_tokens=a.rl_new_tokens, reward_fn="bench_rewards:vowel_fraction", lr=1e-6,
                       report_to="none", save_total_limit=0, rollout_engine=a.rollout_engine))
    peak = peak_gib()
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if "time/step" in x][1:]  # skip warm-up
    split = {k: statistics.mean(r[k] for r in rows) for k in rows[0] if k.startswith("time/")}
    # The bound: the same engine once (warmed up), the update's forward + backward, two scoring forwards.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reset_peak()  # the recipe's models are gone: the bound's model gets the card to itself
    tok, model = load_tokenizer(p["model"]), load_causal_lm(p["model"], device=device)
    prompts = [tok.apply_chat_template(json.loads(x)["prompt"], add_generation_prompt=True, tokenize=True)
               for x in list(open(p["rl"]))[: a.rl_batch]]
    prompts = [x["input_ids"] if hasattr(x, "keys") else x for x in prompts]
    engine = make_rollout(a.rollout_engine, model, tok.pad_token_id, tok.eos_token_id, device)
    params = SamplingParams(max_new_tokens=a.rl_new_tokens)
    engine.generate(prompts, params)
    t0 = clock()
    batch = engine.generate(prompts, params)
    t_gen = clock() - t0
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    autocast = torch.autocast(device, torch.bfloat16, enabled=device == "cuda")
    model.train()
    times_fb, times_f = [], []
    for _ in range(3):
        t0 = clock()
        for i in range(0, ids.shape[0], a.rl_micro):
            with autocast:
                loss = model(input_ids=ids[i : i + a.rl_micro], attention_mask=mask[i : i + a.rl_micro]).logits.float().mean()
            loss.backward()
        times_fb.append(clock() - t0)
        with torch.no_grad(), autocast:
            t0 = clock()
            for i in range(0, ids.shape[0], a.rl_micro):
                model(input_ids=ids[i : i + a.rl_micro], attention_mask=mask[i : i + a.rl_micro])
            times_f.append(clock() - t0)
    t_fb, t_f = min(times_fb[1:]), min(times_f[1:])
    bound = t_gen + t_fb + 2 * t_f
    return {"split": split, "peak_gib": peak,
            "bound": {"generate": t_gen, "forward_backward": t_fb, "forward": t_f, "total": bound}}


JOBS = {name[4:]: fn for name, fn in globals().items() if name.startswith("job_")}


def run_job(name: str, a, paths: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--paths", json.dumps(paths)] + a.passthrough
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"  job {name} FAILED:\n{proc.stderr[-2500:]}", file=sys.stderr)
        return {"error": proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else f"exit {proc.returncode}"}
    print(f"  job {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return json.loads(lines[-1][7:])


# ---- the report ---------------------------------------------------------------------------------

def report(a, r: dict) -> None:
    print(f"\nrlhf on {r['device']}; {r['date']}; torch {r['torch']}, transformers {r['transformers']}"
          + (f", TRL {r['trl']}" if r.get("trl") else "") + f"; model {shape_of(a)} ({r['n_params'] / 1e6:.0f}M params)")
    if r.get("bandwidth_tb_s"):
        print(f"device-to-device copy: {r['bandwidth_tb_s']:.2f} TB/s measured; bounds use {PEAK_BYTES['cuda'] / 1e12:.2f} TB/s "
              f"and {PEAK_FLOPS['cuda'] / 1e12:.0f} TFLOP/s")
    if "decode" in r:
        print(f"\n1. Decode, prompts of {a.prompt_len} tokens, {a.new_tokens} new tokens, temperature 1, end to end")
        print(f"{'engine':24}{'seqs':>6}{'tokens/s':>12}{'vs generate':>13}{'of bound':>10}")
        base = {x["seqs"]: x["tokens_per_s"] for x in r["decode"] if x.get("engine") == "generate" and "tokens_per_s" in x}
        for x in r["decode"]:
            if "error" in x:
                print(f"{x['engine']:24}{x.get('seqs', ''):>6}  failed: {x['error']}")
                continue
            vs = x["tokens_per_s"] / base[x["seqs"]] if x["seqs"] in base else float("nan")
            print(f"{x['engine']:24}{x['seqs']:>6}{x['tokens_per_s']:>12.0f}{vs:>12.2f}x{x.get('fraction_of_bound', float('nan')):>10.1%}")
    if "mfu" in r:
        print(f"\n2. Updates at {a.update_len} tokens a sequence (forward, backward, AdamW; bf16 autocast)")
        print(f"{'update':14}{'tokens':>8}{'ms':>9}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}")
        for x in r["mfu"]:
            if "error" in x:
                print(f"{x['update']:14}  failed: {x['error']}")
                continue
            print(f"{x['update']:14}{x['batch_tokens']:>8}{x['seconds'] * 1e3:>9.0f}{x['tflops']:>10.1f}"
                  f"{x.get('mfu', float('nan')):>8.1%}{x['peak_gib']:>10.1f}")
    jobs = r.get("jobs", {})
    if jobs:
        print(f"\n3. Against TRL: GRPO {a.rl_steps} steps x {a.rl_batch} completions (G={a.generations}, "
              f"{a.rl_new_tokens} new tokens); DPO {a.dpo_steps} steps x {a.dpo_batch} pairs; whole jobs")
        print(f"{'':22}{'rlhf':>10}{'TRL':>10}{'ratio':>8}")
        for algo, unit in (("grpo", "completions/s"), ("dpo", "pairs/s")):
            o, t = jobs.get(f"{algo}_ours", {}), jobs.get(f"{algo}_trl", {})
            rate = lambda j: j["items"] / j["seconds"] if "seconds" in j else float("nan")  # noqa: E731
            print(f"{algo.upper() + ' ' + unit:22}{rate(o):>10.2f}{rate(t):>10.2f}{rate(o) / rate(t):>8.2f}")
            print(f"{algo.upper() + ' peak GiB':22}{o.get('peak_gib', float('nan')):>10.1f}{t.get('peak_gib', float('nan')):>10.1f}")
            for j, who in ((o, "rlhf"), (t, "TRL")):
                if "error" in j:
                    print(f"  {algo} {who} failed: {j['error']}")
        if "grpo_ours" in jobs and "generate_share" in jobs["grpo_ours"]:
            print(f"  our GRPO step: {jobs['grpo_ours']['generate_share']:.0%} of it sampling (steps after the first)")
    if "ppo" in jobs and "split" in jobs["ppo"]:
        split, bound = jobs["ppo"]["split"], jobs["ppo"]["bound"]
        print(f"\n4. PPO step ({a.rl_batch} prompts, {a.rl_new_tokens} new tokens, 1 epoch), mean seconds after the first:")
        for k in ("time/generate", "time/score", "time/policy_value_pass", "time/reference_pass", "time/train",
                  "time/weight_sync", "time/step"):
            print(f"  {k:26}{split.get(k, float('nan')):8.3f}")
        print(f"  lower bound: generate {bound['generate']:.3f} + update fwd/bwd {bound['forward_backward']:.3f} + "
              f"2 x forward {bound['forward']:.3f} = {bound['total']:.3f}")
        print(f"  step / bound = {split['time/step'] / bound['total']:.2f}; peak {jobs['ppo']['peak_gib']:.1f} GiB")
    elif "ppo" in jobs:
        print(f"\n4. PPO failed: {jobs['ppo'].get('error')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="Toy sizes (automatic without CUDA).")
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--sections", default="decode,mfu,jobs", help="Comma list of decode, mfu, jobs.")
    ap.add_argument("--engines", default="generate,loop,static,continuous",
                    help="Comma list; continuous batching is left out without CUDA (on CPU it produced no tokens here).")
    ap.add_argument("--seqs", default="64,256,512")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--decode-repeat", type=int, default=1)
    ap.add_argument("--update-len", type=int, default=1024)
    ap.add_argument("--update-batch", type=int, default=8)
    ap.add_argument("--update-repeat", type=int, default=3)
    ap.add_argument("--rl-steps", type=int, default=6)
    ap.add_argument("--rl-batch", type=int, default=64)
    ap.add_argument("--rl-micro", type=int, default=16)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--rl-new-tokens", type=int, default=128)
    ap.add_argument("--dpo-steps", type=int, default=20)
    ap.add_argument("--dpo-batch", type=int, default=16)
    ap.add_argument("--dpo-max-length", type=int, default=512)
    ap.add_argument("--jobs", default="grpo_ours,dpo_ours,ppo,grpo_trl,dpo_trl", help="Comma list of section 3-4 jobs.")
    ap.add_argument("--rollout-engine", default="auto", help="Engine of our GRPO and PPO jobs (and of PPO's bound).")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--json", help="Write every figure here.")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--paths", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    a = ap.parse_args()
    import torch

    a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device == "cpu" and not a.tiny:
        print("no CUDA device: running at toy sizes (--tiny)", file=sys.stderr)
        a.tiny = True
    if a.tiny:
        a.seqs, a.new_tokens, a.prompt_len, a.update_len, a.update_batch = "2,4", 6, 8, 32, 2
        a.rl_steps, a.rl_batch, a.rl_micro, a.generations, a.rl_new_tokens = 2, 4, 4, 2, 6
        a.dpo_steps, a.dpo_batch, a.dpo_max_length, a.update_repeat = 2, 4, 64, 1
    a.seqs = [int(x) for x in str(a.seqs).split(",")]
    a.engines = [x.strip() for x in a.engines.split(",") if a.device == "cuda" or x.strip() != "continuous"]
    if a.worker:
        import accelerate, datasets, peft, transformers.optimization  # noqa: F401, E401  (imports outside the clock)

        torch.manual_seed(0)
        reset_peak()
        print("RESULT " + json.dumps(JOBS[a.worker](a, json.loads(a.paths))))
        return
    import platform

    import transformers

    sections = a.sections.split(",")
    r = {"device": torch.cuda.get_device_name() if a.device == "cuda" else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
         "transformers": transformers.__version__, "settings": {k: v for k, v in vars(a).items() if k != "passthrough"}}
    try:
        import trl

        r["trl"] = trl.__version__
    except ImportError:
        a.skip_trl = True
    r["n_params"] = sum(p.numel() for p in build_model(a, torch.float32, None, device="meta").parameters())
    if a.device == "cuda":
        r["bandwidth_tb_s"] = measure_bandwidth() / 1e12
    if "decode" in sections:
        r["decode"] = section_decode(a)
    if "mfu" in sections:
        r["mfu"] = section_mfu(a)
    if "jobs" in sections:
        root = tempfile.mkdtemp(prefix="rlhf-gpu-bench-")
        a.passthrough = [f"--root={root}"] + (["--tiny"] if a.tiny else []) + [
            f"--{k.replace('_', '-')}={getattr(a, k)}" for k in ("shape", "rollout_engine", "rl_steps", "rl_batch", "rl_micro", "generations",
                                                                 "rl_new_tokens", "dpo_steps", "dpo_batch", "dpo_max_length")]
        paths = setup_jobs(a, root)
        names = [n for n in a.jobs.split(",") if not (a.skip_trl and n.endswith("_trl"))]
        r["jobs"] = {name: run_job(name, a, paths) for name in names}
    report(a, r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2, default=str)


if __name__ == "__main__":
    main()
