"""The model zoo: the invariants that keep RLHF honest, on every architecture and attention kernel.

Tiny random models (hidden 64, 2 layers, weights drawn wide so log-probs are far from uniform)
of each architecture in ``rlhf.models.tiny.ARCHITECTURES``, under each attention implementation
that runs on CPU (flex attention: forward only, it has no CPU backward). Sliding-window models
get a window of 4 tokens, shorter than the test sequences.

``make test`` runs a slice (marked ``zoo_slice`` below: the kernels and windows that once gave
wrong numbers); ``make test-zoo`` (``pytest -m zoo``) runs the whole matrix.
"""

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf.algos import logprobs_from_logits, sft_loss
from rlhf.data import collate_packed, collate_preference, collate_preference_shared, collate_sft, pad
from rlhf.models import (
    Critic, PolicyWithValueHead, Reference, apply_lora, causal_logits, check_packing, load_sequence_classifier, packed_logits, packing_support,
    save_pretrained, sequence_scores, tiny_causal_lm,
)
from rlhf.models.tiny import ARCHITECTURES
from rlhf.recipes import dpo
from rlhf.recipes.logprobs import model_response_logprobs, packed_response_logprobs
from rlhf.rollout import HFRollout, SamplingParams

WINDOWED = {"mistral", "gemma2", "gemma3", "mixtral", "qwen3_moe"}
KERNELS = {"gpt2": ["eager", "sdpa"], "gptj": ["eager"]}  # what transformers supports for them
SLICE = {("llama", "eager"), ("mistral", "sdpa"), ("gemma2", "eager"), ("gpt2", "eager"), ("gptj", "eager"),
         ("qwen3_moe", "sdpa")}
MATRIX = [(a, k) for a in ARCHITECTURES for k in KERNELS.get(a, ["eager", "sdpa", "flex_attention"])]


def cases(*, grad: bool = False):
    """(arch, kernel) pairs as pytest params: the slice in the default run, the rest under -m zoo."""
    out = []
    for arch, kernel in MATRIX:
        if grad and kernel == "flex_attention":
            continue
        marks = [] if (arch, kernel) in SLICE else [pytest.mark.zoo]
        out.append(pytest.param(arch, kernel, marks=marks, id=f"{arch}-{kernel}"))
    return out


_MODELS: dict = {}

# torch's inductor writes C++ that does not compile for flex attention on CPU once it turns to
# dynamic shapes (seen with torch 2.13: "cur_qSplitSize2 was not declared"); one static
# compile per shape avoids that path. Flex attention has no CPU backward anyway.
torch._dynamo.config.automatic_dynamic_shapes = False
torch._dynamo.config.recompile_limit = 256


def zoo_model(tokenizer, arch: str, kernel: str):
    key = (arch, kernel)
    if key not in _MODELS:
        _MODELS[key] = tiny_causal_lm(tokenizer, arch, attn_implementation=kernel, initializer_range=0.2,
                                      sliding_window=4 if arch in WINDOWED else None).eval()
    return _MODELS[key]


def rand_ids(rng: random.Random, lo: int, hi: int) -> list[int]:
    return [rng.randint(8, 250) for _ in range(rng.randint(lo, hi))]


@pytest.mark.parametrize("arch,kernel", cases())
def test_packed_equals_padded_for_sft_dpo_and_grpo(arch, kernel, tokenizer):
    model = zoo_model(tokenizer, arch, kernel)
    support, why = packing_support(model)
    assert support == "shared", why
    rng = random.Random(0)
    with torch.no_grad():
        # SFT: examples side by side, positions restarting; per-token losses as in the padded batch.
        examples = [{"input_ids": (ids := rand_ids(rng, 3, 12)), "labels": [-100] + ids[1:]} for _ in range(4)]
        padded = collate_sft(examples, 0)
        want = sft_loss(causal_logits(model, padded["input_ids"], padded["attention_mask"]), padded["labels"])[0]
        packed = collate_packed(examples, 0)
        got = sft_loss(packed_logits(model, packed), packed["labels"])[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # DPO: [prompt | chosen | rejected], and flash attention's [prompt | chosen][prompt | rejected].
        pairs = [{"prompt_ids": rand_ids(rng, 1, 8), "chosen_ids": rand_ids(rng, 1, 9), "rejected_ids": rand_ids(rng, 1, 9)}
                 for _ in range(5)]
        c1, r1 = dpo.pair_logps(model, collate_preference(pairs, 0))
        for shared in (True, False):
            c2, r2 = dpo.pair_logps(model, collate_preference_shared(pairs, 0, row_tokens=30, shared=shared))
            torch.testing.assert_close(torch.stack([c2, r2]), torch.stack([c1, r1]), atol=1e-4, rtol=1e-5)
        # GRPO: G = 3 samples of each left-padded prompt, replies of different lengths.
        prompts = [rand_ids(rng, 1, 9) for _ in range(3)]
        replies = [rand_ids(rng, 1, 10) for _ in range(9)]
        ids = torch.cat([pad([p for p in prompts for _ in range(3)], 0, side="left"), pad(replies, 0)], 1)
        mask = torch.cat([pad([[1] * len(p) for p in prompts for _ in range(3)], 0, side="left"),
                          pad([[1] * len(r) for r in replies], 0)], 1)
        P, on = max(map(len, prompts)), pad([[1] * len(r) for r in replies], 0).bool()
        want, want_ent = model_response_logprobs(model, ids, mask, P, 0.7, with_entropy=True)
        for layout in ("shared", "packed"):
            got, got_ent = packed_response_logprobs(model, ids, mask, P, 0.7, with_entropy=True, max_row_tokens=40,
                                                    layout=layout)
            torch.testing.assert_close(got[on], want[on], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_ent[on], want_ent[on], atol=1e-5, rtol=1e-5)
    for layout in ("shared", "packed"):
        assert check_packing(model, layout) < 1e-3


@pytest.mark.parametrize("arch,kernel", cases())
def test_layout_mask_equals_create_causal_masks(arch, kernel, tokenizer):
    """The shared-prefix mask, expanded by indexing, is the one transformers' create_causal_mask
    writes (through vmap) for the same layout: value for value, in the kernel's own form, for
    each layer type (sliding windows on positions)."""
    from transformers.masking_utils import and_masks, create_causal_mask, sliding_window_overlay

    from rlhf.data import pack_shared_prefixes
    from rlhf.models.packing import _text_config, layer_types, shared_prefix_mask

    model = zoo_model(tokenizer, arch, kernel)
    rng = random.Random(2)
    groups = [(rand_ids(rng, 1, 7), [rand_ids(rng, 1, 6) for _ in range(rng.randint(1, 3))]) for _ in range(5)]
    b = pack_shared_prefixes(groups, 0, row_tokens=24)  # several groups a row, and row padding
    pos, seg, br = b["position_ids"], b["segment_ids"], b["branch_ids"]
    got = shared_prefix_mask(model, pos, seg, br)
    config = _text_config(model)

    def layout(bi, hi, q, kv):
        return (seg[bi, q] == seg[bi, kv]) & ((br[bi, kv] == 0) | (br[bi, kv] == br[bi, q]))

    def window(bi, hi, q, kv):
        return sliding_window_overlay(config.sliding_window)(bi, hi, pos[bi, q], pos[bi, kv])

    embeds = torch.empty(*pos.shape, 0, dtype=model.dtype)
    for kind in layer_types(config):
        fn = and_masks(layout, window) if kind == "sliding_attention" else layout
        want = create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None, past_key_values=None,
                                  position_ids=None, and_mask_function=fn, allow_is_causal_skip=False)
        mine = got[kind] if isinstance(got, dict) else got
        if kernel == "flex_attention":
            mine, want = mine.to_dense(), want.to_dense()
        assert mine.dtype == want.dtype and mine.shape == want.shape
        assert torch.equal(mine, want), kind


@pytest.mark.parametrize("arch,kernel", cases(grad=True))
def test_lm_head_over_chunks_equals_whole_logits(arch, kernel, tokenizer, monkeypatch):
    """Response log-probs, entropy and their gradients, and DPO's reply log-probs, with the LM head
    run over chunks of positions (recomputed in the backward pass) equal those read off the whole
    logits, to 1e-6 of each tensor's largest entry (the gradient: in L2 norm); also with the entropy
    as a metric (GRPO's update, the fused backward of a linear head). Matmuls of another shape round
    differently in float32, so exact equality is not to be had."""
    import rlhf.algos.tokens as tokens
    from rlhf.models import causal_hidden
    from rlhf.recipes.logprobs import pair_logps, response_logprobs, sequence_logps

    model = zoo_model(tokenizer, arch, kernel)
    assert causal_hidden(model, torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long)) is not None
    monkeypatch.setattr(tokens, "_CHUNK_ELEMENTS", 7 * model.config.vocab_size)  # 7 positions a chunk
    rng = random.Random(3)
    seqs = [(rand_ids(rng, 1, 6), rand_ids(rng, 2, 7)) for _ in range(4)]
    P = max(len(p) for p, _ in seqs)
    ids = torch.cat([pad([p for p, _ in seqs], 0, side="left"), pad([r for _, r in seqs], 0)], 1)
    mask = torch.cat([pad([[1] * len(p) for p, _ in seqs], 0, side="left"), pad([[1] * len(r) for _, r in seqs], 0)], 1)
    weights = torch.randn(ids.shape[0], ids.shape[1] - P, generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters()]
    results = []
    for chunked in (True, False):
        if chunked:
            lp, ent = model_response_logprobs(model, ids, mask, P, 0.7, with_entropy=True)
        else:
            logits = causal_logits(model, ids, mask, ids.shape[1] - P + 1)
            lp, ent = response_logprobs(logits, ids, P, 0.7, with_entropy=True)
        grads = torch.autograd.grad((lp * weights).sum() + (ent * weights).sum(), params, allow_unused=True)
        results.append((lp.detach(), ent.detach(), grads))
    (lp1, ent1, g1), (lp2, ent2, g2) = results

    def close(a, b, what):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max() + 1e-12, (what, float((a - b).abs().max()), float(b.abs().max()))

    close(lp1, lp2, "logprobs")
    close(ent1, ent2, "entropy")
    # The gradient, all parameters as one vector: relative L2 error (some entries are 0 in exact
    # arithmetic, OPT's key biases, and float32 noise in both).
    a, b = (torch.cat([g.flatten() for g in gs if g is not None]) for gs in (g1, g2))
    assert torch.linalg.vector_norm(a - b) <= 1e-6 * torch.linalg.vector_norm(b), float((a - b).norm() / b.norm())
    # GRPO's update: the entropy a metric without gradient (an nn.Linear head: the fused backward that sums
    # the weight's gradient over the chunks in place), against the whole logits' log-probs and gradient.
    lp3, ent3 = model_response_logprobs(model, ids, mask, P, 0.7, with_entropy=True, entropy_grad=False)
    g3 = torch.autograd.grad((lp3 * weights).sum(), params, allow_unused=True)
    lp4, _ = response_logprobs(causal_logits(model, ids, mask, ids.shape[1] - P + 1), ids, P, 0.7)
    g4 = torch.autograd.grad((lp4 * weights).sum(), params, allow_unused=True)
    close(lp3.detach(), lp2, "logprobs, entropy as a metric")
    close(ent3, ent2, "entropy as a metric")
    a, b = (torch.cat([g.flatten() for g in gs if g is not None]) for gs in (g3, g4))
    assert torch.linalg.vector_norm(a - b) <= 1e-6 * torch.linalg.vector_norm(b), float((a - b).norm() / b.norm())
    pairs = [{"prompt_ids": p, "chosen_ids": r, "rejected_ids": r[::-1]} for p, r in seqs]
    batch = collate_preference(pairs, 0)
    with torch.no_grad():
        chosen, rejected = pair_logps(model, batch)
        whole = sequence_logps(causal_logits(model, batch["input_ids"], batch["attention_mask"]), batch["input_ids"],
                               batch["response_mask"])
    close(torch.cat([chosen, rejected]), whole, "pair logps")


@pytest.mark.parametrize("arch,kernel", cases())
def test_left_padded_prompts_score_as_alone(arch, kernel, tokenizer, tmp_path):
    """The rollout's batch (prompts of different lengths, left-padded) gives each response the
    log-probs and values it has alone: what makes the first PPO ratio exactly 1 against the
    sampler, and puts V(s_t) on the state before response token t, for the value head on the
    policy and for a separate critic."""
    from rlhf.recipes.ppo import policy_forward

    model = zoo_model(tokenizer, arch, kernel)
    save_pretrained(model, tokenizer, str(tmp_path))
    critic = Critic(load_sequence_classifier(str(tmp_path), attn_implementation=kernel).eval())
    shared = PolicyWithValueHead(model).eval()
    rng = random.Random(1)
    seqs = [(rand_ids(rng, 1, 9), rand_ids(rng, 2, 6)) for _ in range(4)]
    P = max(len(p) for p, _ in seqs)
    ids = torch.cat([pad([p for p, _ in seqs], 0, side="left"), pad([r for _, r in seqs], 0)], 1)
    mask = torch.cat([pad([[1] * len(p) for p, _ in seqs], 0, side="left"), pad([[1] * len(r) for _, r in seqs], 0)], 1)
    with torch.no_grad():
        for body, head in ((shared, None), (model, critic)):
            logprobs, values, _ = policy_forward(body, head, ids, mask, P, 1.0)
            for i, (p, r) in enumerate(seqs):
                one = torch.tensor([p + r])
                lp, v, _ = policy_forward(body, head, one, torch.ones_like(one), len(p), 1.0)
                torch.testing.assert_close(logprobs[i, : len(r)], lp[0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(values[i, : len(r)], v[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,kernel", cases())
def test_sampling_loop_matches_generate(arch, kernel, tokenizer):
    model = zoo_model(tokenizer, arch, kernel)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16], [17]]
    params = SamplingParams(temperature=1.0, max_new_tokens=6, num_samples=2)
    out = []
    for use_generate in (False, True):
        torch.manual_seed(3)
        out.append(HFRollout(model, tokenizer.pad_token_id, tokenizer.eos_token_id, use_generate=use_generate)
                   .generate(prompts, params))
    assert torch.equal(out[0].response_ids, out[1].response_ids)
    assert torch.equal(out[0].response_mask, out[1].response_mask)


@pytest.mark.parametrize("arch,kernel", cases())
def test_reward_read_at_last_real_token_and_reload(arch, kernel, tokenizer, tmp_path):
    """Saved outputs reload with plain transformers (same logits); the reward model's score is
    read at the last real token, whatever the padding, as transformers itself reads it."""
    model = zoo_model(tokenizer, arch, kernel)
    save_pretrained(model, tokenizer, str(tmp_path))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation=kernel).eval()
    ids = torch.randint(8, 250, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)
        rm = load_sequence_classifier(str(tmp_path)).eval()
        rm.set_attn_implementation(kernel)
        a, b = [5, 6, 7, 8, 9, 10], [11, 12, tokenizer.eos_token_id]
        alone = torch.cat([sequence_scores(rm, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in (a, b)])
        pad_id = tokenizer.pad_token_id
        right = sequence_scores(rm, torch.tensor([a, b + [pad_id] * 3]), torch.tensor([[1] * 6, [1] * 3 + [0] * 3]))
        left = sequence_scores(rm, torch.tensor([a, [pad_id] * 3 + b]), torch.tensor([[1] * 6, [0] * 3 + [1] * 3]))
        torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)
        hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path), num_labels=1,
                                                                attn_implementation=kernel).eval()
        hf.load_state_dict(rm.state_dict())  # the same random score head
        theirs = hf(torch.tensor([a, b + [pad_id] * 3])).logits[:, 0]  # transformers' own read (PAD != EOS)
        torch.testing.assert_close(right, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,kernel", cases())
def test_lora_reference_equals_its_base(arch, kernel, tokenizer):
    base = zoo_model(tokenizer, arch, kernel)
    policy = apply_lora(tiny_causal_lm(tokenizer, arch, attn_implementation=kernel, initializer_range=0.2,
                                       sliding_window=4 if arch in WINDOWED else None), r=4, alpha=8)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # the adapters now change the output, so "disabled" matters
    ids = torch.randint(8, 250, (2, 8))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = logprobs_from_logits(causal_logits(base, ids, mask)[:, :-1], ids[:, 1:])
        got = logprobs_from_logits(Reference(policy)(ids, mask)[:, :-1], ids[:, 1:])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        adapted = logprobs_from_logits(causal_logits(policy.eval(), ids, mask)[:, :-1], ids[:, 1:])
    assert (adapted - want).abs().max() > 1e-3


# ---- one step of every recipe on each model (the CLI's own entry points) -----------------------

@pytest.fixture(scope="module")
def zoo_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo-data")
    rng = random.Random(0)
    words = "order late sorry refund box item help thanks".split()

    def text(n):
        return " ".join(rng.choice(words) for _ in range(n))

    files = {"sft": [{"prompt": text(4), "completion": text(5)} for _ in range(8)],
             "pairs": [{"prompt": text(4), "chosen": text(5), "rejected": text(3)} for _ in range(8)],
             "prompts": [{"prompt": text(rng.randint(2, 6))} for _ in range(8)]}
    for name, rows in files.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


@pytest.mark.zoo
@pytest.mark.parametrize("arch,kernel", [c for c in cases(grad=True)])
def test_one_step_of_every_recipe(arch, kernel, tokenizer, zoo_data, tmp_path):
    from rlhf.recipes import grpo, ppo, reward, sft

    model_dir = str(tmp_path / "base")
    save_pretrained(zoo_model(tokenizer, arch, kernel), tokenizer, model_dir)
    common = dict(max_steps=1, report_to="none", seed=0, max_length=48)
    sft.run(sft.Config(model=model_dir, data=str(zoo_data / "sft.jsonl"), output_dir=str(tmp_path / "sft"),
                       batch_size=4, packing=True, **common))
    reward.run(reward.Config(model=str(tmp_path / "sft"), data=str(zoo_data / "pairs.jsonl"),
                             output_dir=str(tmp_path / "rm"), batch_size=4, **common))
    dpo.run(dpo.Config(model=str(tmp_path / "sft"), data=str(zoo_data / "pairs.jsonl"), output_dir=str(tmp_path / "dpo"),
                       batch_size=4, **common))
    ppo.run(ppo.Config(model=str(tmp_path / "sft"), reward_model=str(tmp_path / "rm"), data=str(zoo_data / "prompts.jsonl"),
                       output_dir=str(tmp_path / "ppo"), rollout_batch_size=4, mini_batch_size=4, batch_size=4,
                       ppo_epochs=1, max_new_tokens=6, **common))
    row = [json.loads(x) for x in open(tmp_path / "ppo" / "metrics.jsonl") if "policy/ratio_mean" in x][0]
    assert row["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # one epoch, one minibatch: exactly on-policy
    grpo.run(grpo.Config(model=str(tmp_path / "sft"), data=str(zoo_data / "prompts.jsonl"), output_dir=str(tmp_path / "grpo"),
                         reward_fn="rule_rewards:vowel_fraction", rollout_batch_size=2, num_generations=2,
                         mini_batch_size=4, max_new_tokens=6, **common))
    for out in ("sft", "rm", "dpo", "ppo", "grpo"):
        assert (tmp_path / out / "model.safetensors").exists(), out


def test_a_layout_that_differs_from_padded_is_not_used(tokenizer, monkeypatch):
    """The start-up probe: where the padding-free result differs (here a mask that forgets the
    layout, as the eager kernel once did), the recipe gets padded batches and says why, once."""
    from rlhf.models import packing
    from rlhf.recipes.logprobs import choose_layout

    model = zoo_model(tokenizer, "llama", "eager")
    said: list[str] = []
    assert choose_layout(model, True, "shared", said.append) == "shared" and "probe within" in said[-1]
    real = packing.shared_prefix_mask
    monkeypatch.setattr(packing, "shared_prefix_mask",
                        lambda m, pos, seg, branch: real(m, pos, torch.zeros_like(seg), torch.zeros_like(branch)))
    for kind in ("shared", "packed"):
        assert choose_layout(model, True, kind, said.append) is None
        assert said[-1].startswith("padding-free batches: off: on this model the") and "batches are padded" in said[-1]
    assert choose_layout(model, False, "shared", said.append) is None and len(said) == 3


def test_layers_without_attention_masks_are_not_packed(tokenizer):
    """Hybrid models (linear-attention or recurrent layers, as Qwen3-Next's ``linear_attention``)
    carry state across a packed row that no mask can cut: such models are never packed."""
    model = tiny_causal_lm(tokenizer, "qwen2")
    model.config.layer_types = ["full_attention", "linear_attention"]
    support, why = packing_support(model)
    assert support is None and "linear_attention" in why


def test_flash_layout_hands_the_model_one_row(tokenizer, monkeypatch):
    """transformers' flash path reads sequence boundaries from positions only in a batch of one
    row: a packed batch of several rows goes to the model as one row, and comes back as rows."""
    from rlhf.models import packing

    model = zoo_model(tokenizer, "llama", "sdpa")  # SDPA reads positions the same way in one row
    rng = random.Random(2)
    pairs = [{"prompt_ids": rand_ids(rng, 1, 8), "chosen_ids": rand_ids(rng, 1, 9), "rejected_ids": rand_ids(rng, 1, 9)}
             for _ in range(4)]
    batch = collate_preference_shared(pairs, 0, row_tokens=30, shared=False)
    assert batch["input_ids"].shape[0] > 1
    monkeypatch.setattr(packing, "packing_support", lambda m: ("packed", "flash (stand-in)"))
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    try:
        with torch.no_grad():
            c2, r2 = dpo.pair_logps(model, batch)
            c1, r1 = dpo.pair_logps(model, collate_preference(pairs, 0))
    finally:
        hook.remove()
    assert shapes[0][0] == 1 and shapes[0][1] == batch["input_ids"].numel()
    torch.testing.assert_close(torch.stack([c2, r2]), torch.stack([c1, r1]), atol=1e-4, rtol=1e-5)


def test_probe_under_mixed_precision_uses_half_precision_tolerance(tokenizer):
    """Under bf16 autocast (accelerate's mixed precision on a GPU) packed and padded differ by
    bf16 rounding; the probe must judge them with half precision's tolerance, not float32's."""
    from rlhf.recipes.logprobs import choose_layout

    model = zoo_model(tokenizer, "llama", "sdpa")
    said: list[str] = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert choose_layout(model, True, "shared", said.append, mixed_precision=True) == "shared", said
