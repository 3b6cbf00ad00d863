"""`make test-gpu`: every recipe in bf16 on CUDA on a Qwen2.5-0.5B-shaped model, and the invariants in bf16.

Skipped, with one line, where there is no CUDA device. The model has Qwen2.5-0.5B's shape
(494M parameters, 151,936-row vocabulary) and random weights (``rlhf.models.shapes``); the
recipes run through their own ``run`` functions, so bf16 is accelerate's mixed precision (fp32
master weights, bf16 autocast) and PPO/GRPO sample with the default CUDA engine. Each recipe's
peak GPU memory is reported in bytes per policy parameter at the end of the run.

Tolerances in bf16 (stated here, measured values printed in the report):
- first PPO ratio: |mean ratio - 1| <= 0.01 and approx. KL <= 1e-3 on the first minibatch;
- packed = padded log-probs: mean |diff| <= 0.02 nats, max |diff| <= 0.25 nats (bf16 logits of a
  151,936-way softmax);
- our sampling loop = ``generate``: the same tokens under one seed (one sample per prompt, so both
  run the very same shapes);
- the static engine: its sampled tokens' log-probs within mean 0.02 nats of the training forward's.
"""

import gc
import json
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device here: make test-gpu needs one", allow_module_level=True)
pytestmark = pytest.mark.gpu

SHAPE = os.environ.get("RLHF_GPU_SHAPE", "qwen2.5-0.5b")
REPORT: list[str] = []  # printed by conftest's terminal summary
N_PARAMS: list[int] = []  # the policy's parameter count, once the model is built


def report(line: str) -> None:
    REPORT.append(line)
    path = os.environ.get("RLHF_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


TEXTS = ["Thank you for your patience, a replacement is on its way.", "I am so sorry about the delay.",
         "Your order is delayed.", "Hello, how can I help you today?", "The headphones arrived broken."]


@pytest.fixture(scope="module")
def gpu_dir(tmp_path_factory, tokenizer):
    from rlhf.models import save_pretrained
    from rlhf.models.shapes import shaped_causal_lm

    d = str(tmp_path_factory.mktemp(SHAPE))
    model = shaped_causal_lm(SHAPE, tokenizer, device="cuda")
    N_PARAMS.append(sum(p.numel() for p in model.parameters()))
    save_pretrained(model, tokenizer, d)
    del model
    torch.cuda.empty_cache()
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("gpu-data")

    def write(name, rows):
        path = root / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    return {"sft": write("sft.jsonl", [{"prompt": f"Customer {i}: my order is late.", "completion": " " + rng.choice(TEXTS)}
                                       for i in range(64)]),
            "pairs": write("pairs.jsonl", [{"prompt": f"Customer {i}: my order is late.", "chosen": " " + TEXTS[0],
                                            "rejected": " " + TEXTS[2]} for i in range(64)]),
            "prompts": write("prompts.jsonl", [{"prompt": f"Customer {i}: my order is late."} for i in range(64)])}


def run_measured(name: str, run, cfg) -> dict:
    """Run a recipe; report its peak GPU memory as bytes per policy parameter."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    metrics = run(cfg)
    peak = torch.cuda.max_memory_allocated()
    report(f"peak memory {name:24} {peak / 2**30:6.2f} GiB = {peak / N_PARAMS[0]:5.1f} bytes/param")
    return metrics


def rows_of(output_dir, key):
    return [json.loads(x) for x in open(os.path.join(output_dir, "metrics.jsonl")) if f'"{key}"' in x]


COMMON = dict(report_to="none", seed=0, save_total_limit=0)


def test_sft_bf16(gpu_dir, data, tmp_path):
    from rlhf.recipes import sft

    cfg = sft.Config(model=gpu_dir, data=data["sft"], output_dir=str(tmp_path / "sft"), max_steps=6, batch_size=8,
                     lr=1e-4, max_length=128, **COMMON)
    run_measured("SFT", sft.run, cfg)
    losses = [r["train/loss"] for r in rows_of(cfg.output_dir, "train/loss")]
    assert losses[-1] < losses[0] - 0.1, losses


def test_reward_model_bf16(gpu_dir, data, tmp_path):
    from rlhf.recipes import reward

    cfg = reward.Config(model=gpu_dir, data=data["pairs"], output_dir=str(tmp_path / "rm"), max_steps=6, batch_size=8,
                        lr=1e-5, max_length=128, **COMMON)
    run_measured("reward model", reward.run, cfg)
    rows = rows_of(cfg.output_dir, "train/loss")
    assert rows[-1]["train/loss"] < rows[0]["train/loss"], [r["train/loss"] for r in rows]


def test_dpo_bf16(gpu_dir, data, tmp_path):
    from rlhf.recipes import dpo

    cfg = dpo.Config(model=gpu_dir, data=data["pairs"], output_dir=str(tmp_path / "dpo"), max_steps=6, batch_size=8,
                     lr=1e-5, max_length=128, **COMMON)
    run_measured("DPO", dpo.run, cfg)
    rows = rows_of(cfg.output_dir, "train/loss")
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"], [r["rewards/margins"] for r in rows]


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_ppo_bf16_first_ratio_is_one(gpu_dir, data, tmp_path, critic):
    from rlhf.recipes import ppo

    cfg = ppo.Config(model=gpu_dir, data=data["prompts"], output_dir=str(tmp_path / f"ppo-{critic}"), max_steps=2,
                     rollout_batch_size=16, mini_batch_size=16, batch_size=8, ppo_epochs=1, max_new_tokens=32,
                     reward_fn="rule_rewards:vowel_fraction", critic=critic, lr=1e-6, **COMMON)
    run_measured(f"PPO ({critic} critic)", ppo.run, cfg)
    first = rows_of(cfg.output_dir, "policy/ratio_mean")[0]
    report(f"PPO ({critic}) first ratio mean {first['policy/ratio_mean']:.5f}, approx KL {first['policy/approxkl']:.2e}")
    assert abs(first["policy/ratio_mean"] - 1) <= 0.01 and abs(first["policy/approxkl"]) <= 1e-3, first


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_grpo_bf16(gpu_dir, data, tmp_path, lora):
    from rlhf.recipes import grpo

    cfg = grpo.Config(model=gpu_dir, data=data["prompts"], output_dir=str(tmp_path / "grpo"), max_steps=3,
                      rollout_batch_size=8, num_generations=4, mini_batch_size=32, batch_size=16, max_new_tokens=32,
                      reward_fn="rule_rewards:vowel_fraction", lr=1e-5 if lora else 1e-6, lora=lora, **COMMON)
    m = run_measured("GRPO + LoRA" if lora else "GRPO", grpo.run, cfg)
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values() if isinstance(v, float)), m
    assert m["completions/mean_length"] > 0


# ---- invariants in bf16 ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bf16_model(gpu_dir):
    from rlhf.models import load_causal_lm

    model = load_causal_lm(gpu_dir, dtype="bf16", device="cuda").eval()
    yield model
    del model
    torch.cuda.empty_cache()


def sampled_batch(model, tokenizer, params, prompts):
    from rlhf.rollout import HFRollout

    return HFRollout(model, tokenizer.pad_token_id, tokenizer.eos_token_id).generate(prompts, params)


def prompts_of(tokenizer, n):
    return [tokenizer(f"Customer {i}: my order is late{'!' * (i % 5)}")["input_ids"] for i in range(n)]


def test_packed_equals_padded_in_bf16(bf16_model, tokenizer):
    from rlhf.recipes.logprobs import model_response_logprobs, packed_response_logprobs
    from rlhf.rollout import SamplingParams

    torch.manual_seed(0)
    batch = sampled_batch(bf16_model, tokenizer, SamplingParams(max_new_tokens=48, num_samples=4), prompts_of(tokenizer, 8))
    P, on = batch.prompt_ids.shape[1], batch.response_mask.bool()
    with torch.no_grad():
        padded, _ = model_response_logprobs(bf16_model, batch.input_ids, batch.attention_mask, P)
        packed, _ = packed_response_logprobs(bf16_model, batch.input_ids, batch.attention_mask, P)
        halves = torch.cat([model_response_logprobs(bf16_model, batch.input_ids[i : i + 16], batch.attention_mask[i : i + 16], P)[0]
                            for i in (0, 16)])
    diff, floor = (packed - padded)[on].abs(), (halves - padded)[on].abs()
    report(f"packed vs padded (bf16): mean |diff| {diff.mean():.4f}, max {diff.max():.4f} nats; "
           f"padded in two halves vs whole: mean {floor.mean():.4f}, max {floor.max():.4f}")
    assert diff.mean() <= 0.02 and diff.max() <= 0.25


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampling_loop_equals_generate_in_bf16(bf16_model, tokenizer, temperature):
    from rlhf.rollout import HFRollout, SamplingParams

    params = SamplingParams(temperature=temperature, max_new_tokens=32)
    out = []
    for use_generate in (False, True):
        torch.manual_seed(5)
        out.append(HFRollout(bf16_model, tokenizer.pad_token_id, tokenizer.eos_token_id,
                             use_generate=use_generate).generate(prompts_of(tokenizer, 16), params))
    same = (out[0].response_ids == out[1].response_ids).float().mean()
    report(f"sampling loop vs generate (bf16, T={temperature}): {same:.4f} of tokens equal")
    assert torch.equal(out[0].response_ids, out[1].response_ids)


def test_static_engine_samples_the_policy_in_bf16_and_follows_load_weights(gpu_dir, tokenizer):
    """Log-probs of the engine's samples against the policy's training forward (fp32 weights under
    bf16 autocast, as the recipes run it), before and after an update pushed by load_weights."""
    from rlhf.models import load_causal_lm
    from rlhf.recipes.logprobs import model_response_logprobs
    from rlhf.rollout import SamplingParams, StaticRollout, merged_named_weights

    policy = load_causal_lm(gpu_dir, device="cuda").eval()
    engine = StaticRollout(policy, tokenizer.pad_token_id, tokenizer.eos_token_id)
    engine.record_logprobs = True
    params = SamplingParams(temperature=0.7, max_new_tokens=40, num_samples=4)

    def gap():
        torch.manual_seed(0)
        batch = engine.generate(prompts_of(tokenizer, 16), params)
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            lp, _ = model_response_logprobs(policy, batch.input_ids, batch.attention_mask, batch.prompt_ids.shape[1], 0.7)
        on = batch.response_mask.bool()
        return (engine.last_logprobs[on] - lp[on].float()).abs().mean().item()

    before = gap()
    with torch.no_grad():
        torch.manual_seed(1)
        for p in policy.parameters():
            p.mul_(1 + 0.2 * torch.randn_like(p))  # an update large enough to move every log-prob
    stale = gap()
    engine.load_weights(merged_named_weights(policy))
    after = gap()
    report(f"static engine vs training forward (bf16): mean |logprob diff| {before:.4f} nats; "
           f"after an update: {stale:.4f} stale, {after:.4f} after load_weights")
    assert before <= 0.02 and after <= 0.02 and stale > 5 * after
