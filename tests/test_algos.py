"""Tier 1: the seeds' math, checked against numbers worked out by hand from the formulas.

Where a seed's worked table disagrees with its own formulas, the formulas win; each such
place is named below.
"""

import math
import subprocess
import sys

import pytest
import torch

from rlhf.algos import (
    ADVANTAGE_ESTIMATORS, AdaptiveKLController, FixedKLController, agg_loss,
    bradley_terry_loss, compute_advantages, dpo_loss, entropy_from_logits, gae, gae_matrix,
    group_advantages, kl_estimate, kl_penalized_rewards, logprobs_from_logits, masked_mean,
    masked_var, masked_whiten, ppo_loss, ppo_policy_loss, rloo_advantages, sft_loss, value_loss,
)

T = torch.tensor


# ---- seed 003: "A Worked Example of a Single PPO Update Step" (the crossroads) ----------

def test_seed003_crossroads_advantage_and_clipped_objective():
    # Step 2: A = R + gamma V(s_{t+1}) - V(s_t) = 5 + 0.9 * 0 - 1.5 = 3.5 (terminal next state).
    adv, ret = gae(T([[5.0]]), T([[1.5]]), T([[1.0]]), gamma=0.9, lam=0.95)
    assert adv.item() == pytest.approx(3.5)
    assert ret.item() == pytest.approx(5.0)  # V_target = A + V = 3.5 + 1.5
    # Step 4: r = 0.75 / 0.60 = 1.25; min(1.25 * 3.5, clip(1.25, 0.8, 1.2) * 3.5) = min(4.375, 4.2) = 4.2.
    loss, m = ppo_policy_loss(T([[math.log(0.75)]]), T([[math.log(0.60)]]), adv, T([[1.0]]), clip_eps=0.2)
    assert loss.item() == pytest.approx(-4.2)  # we minimise -L^CLIP
    assert m["ratio_mean"].item() == pytest.approx(1.25)
    assert m["clipfrac"].item() == 1.0


# ---- seed 002 Part 5: "Your order is delayed." ------------------------------------------
# Part B, Step 2 buffer: old and reference log-probs and V_old(S_t) for the five tokens.
OLD = T([[-1.10, -0.50, -0.70, -1.40, -0.30]])
REF = T([[-1.15, -0.50, -0.72, -1.55, -0.30]])
VALUES = T([[-1.0, -1.5, -2.0, -3.0, -4.0]])
MASK = torch.ones(1, 5)
BETA, GAMMA, LAM = 0.02, 0.99, 0.95


def test_seed002_part5_rewards():
    # R_t = r_t - beta (log pi_old - log pi_ref), r_4 = -12.0 and r_0..3 = 0:
    # R_0 = -0.02 * 0.05 = -0.001; R_1 = 0; R_2 = -0.02 * 0.02 = -0.0004;
    # R_3 = -0.02 * 0.15 = -0.003; R_4 = -12.0 - 0.02 * 0 = -12.0.
    rewards, kl = kl_penalized_rewards(T([-12.0]), OLD, REF, MASK, kl_coef=BETA)
    assert kl[0].tolist() == pytest.approx([0.05, 0.0, 0.02, 0.15, 0.0], abs=1e-6)
    assert rewards[0].tolist() == pytest.approx([-0.001, 0.0, -0.0004, -0.003, -12.0], abs=1e-6)


def test_seed002_part5_gae_follows_the_formulas():
    rewards, _ = kl_penalized_rewards(T([-12.0]), OLD, REF, MASK, kl_coef=BETA)
    adv, ret = gae(rewards, VALUES, MASK, gamma=GAMMA, lam=LAM)
    # delta_t = R_t + 0.99 V(S_{t+1}) - V(S_t), V(S_5) = 0 -- these match the seed's Step 3:
    # d4 = -12 + 4 = -8.0; d3 = -0.003 - 3.96 + 3 = -0.963; d2 = -0.0004 - 2.97 + 2 = -0.9704;
    # d1 = 0 - 1.98 + 1.5 = -0.48; d0 = -0.001 - 1.485 + 1 = -0.486.
    # A_t = d_t + 0.9405 A_{t+1}:
    # A4 = -8.0; A3 = -0.963 + 0.9405 * -8.0 = -8.487 (the seed's -8.49 agrees);
    # A2 = -0.9704 + 0.9405 * -8.487 = -8.9524235;
    # A1 = -0.48 + 0.9405 * -8.9524235 = -8.89975430175;
    # A0 = -0.486 + 0.9405 * -8.89975430175 = -8.85621892079...
    # The seed's table gives -8.05, -7.70 and -8.21 for t = 2, 1, 0: those do not follow from
    # its own delta_t and recursion, so we test the values the formulas give.
    expected_adv = [-8.856218921, -8.899754302, -8.9524235, -8.487, -8.0]
    assert adv[0].tolist() == pytest.approx(expected_adv, abs=1e-5)
    # V_target = A_t + V_old(S_t): -9.856218921, -10.399754302, -10.9524235, -11.487, -12.0
    # (the seed's V_target column is not A + V of its own A column either).
    assert ret[0].tolist() == pytest.approx([-9.856218921, -10.399754302, -10.9524235, -11.487, -12.0], abs=1e-5)


def test_seed002_part5_clipped_t0_term():
    # Part C: new log-prob -1.45, old -1.10: r_0 = exp(-0.35) = 0.704688; clip range [0.8, 1.2].
    # With the formula advantage A_0 = -8.856218921: unclipped 0.704688 * A_0 = -6.240872,
    # clipped 0.8 * A_0 = -7.084975; L^CLIP_0 = min = -7.084975, so the loss is +7.084975.
    loss, m = ppo_policy_loss(T([[-1.45]]), T([[-1.10]]), T([[-8.856218921]]), T([[1.0]]))
    assert loss.item() == pytest.approx(7.084975, abs=1e-5)
    assert m["ratio_mean"].item() == pytest.approx(0.704688, abs=1e-6)
    assert m["clipfrac"].item() == 1.0
    # With the seed's table value A_0 = -8.21 the same code gives the seed's 0.8 * -8.21 = -6.568.
    loss, _ = ppo_policy_loss(T([[-1.45]]), T([[-1.10]]), T([[-8.21]]), T([[1.0]]))
    assert loss.item() == pytest.approx(6.568, abs=1e-5)


def test_seed002_part5_value_loss_t0():
    # Part C: (V_new - V_target)^2 = (-7.5 + 7.21)^2 = 0.0841; our L^VF carries the usual 1/2.
    loss, _ = value_loss(T([[-7.5]]), T([[-1.0]]), T([[-7.21]]), T([[1.0]]))
    assert loss.item() == pytest.approx(0.5 * 0.0841, abs=1e-6)


def test_seed002_part5_combined_objective():
    # Part C Step 3: L^PPO = L^CLIP - c1 L^VF + c2 S = -7.5 - 0.5 * 0.55 + 0.01 * 2.4 = -7.751.
    loss = ppo_loss(policy_loss=T(7.5), value_loss=T(0.55), entropy=T(2.4), vf_coef=0.5, ent_coef=0.01)
    assert loss.item() == pytest.approx(7.751)  # we minimise the negated objective


# ---- GAE: equivalence, padding, estimator registry -------------------------------------

def _reference_gae(r, v, gamma, lam):
    # Plain scalar loop over one unpadded sequence, straight from the seed's recursion.
    adv, last = [0.0] * len(r), 0.0
    for t in reversed(range(len(r))):
        nv = v[t + 1] if t + 1 < len(r) else 0.0
        last = r[t] + gamma * nv - v[t] + gamma * lam * last
        adv[t] = last
    return adv


def test_gae_loop_matrix_and_scalar_reference_agree_on_right_padded_batches():
    g = torch.Generator().manual_seed(0)
    B, Tn = 6, 9
    rewards, values = torch.randn(B, Tn, generator=g), torch.randn(B, Tn, generator=g)
    lengths = [9, 1, 5, 0, 7, 3]
    mask = torch.zeros(B, Tn)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    # Junk in the padding must not leak into the result.
    rewards, values = rewards + 100 * (1 - mask), values - 100 * (1 - mask)
    adv, ret = gae(rewards, values, mask, gamma=0.97, lam=0.9)
    adv2, ret2 = gae_matrix(rewards, values, mask, gamma=0.97, lam=0.9)
    torch.testing.assert_close(adv, adv2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret, ret2, rtol=1e-5, atol=1e-5)
    for i, n in enumerate(lengths):
        ref = _reference_gae(rewards[i, :n].tolist(), values[i, :n].tolist(), 0.97, 0.9)
        assert adv[i, :n].tolist() == pytest.approx(ref, abs=1e-5)
        assert adv[i, n:].abs().sum() == 0
    assert not torch.isnan(adv).any()


def test_advantage_registry_one_signature_and_clear_error():
    mask = torch.ones(4, 3)
    scores = T([1.0, 0.0, 3.0, 3.0])
    for name in ADVANTAGE_ESTIMATORS:
        adv, ret = compute_advantages(name, response_mask=mask, scores=scores, rewards=torch.zeros(4, 3),
                                      values=torch.zeros(4, 3), group_size=2)
        assert adv.shape == ret.shape == (4, 3)
    with pytest.raises(ValueError, match="valid: gae, grpo, reinforce_pp, rloo"):
        compute_advantages("nope", response_mask=mask)


def test_group_advantages_and_rloo_by_hand():
    scores = T([1.0, 3.0, 2.0, 2.0])  # two groups of two
    # group 1: mean 2, unbiased std sqrt(2) -> (-1/sqrt 2, +1/sqrt 2); group 2: all equal -> 0.
    adv = group_advantages(scores, 2, eps=1e-12)
    assert adv.tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0, 0.0], abs=1e-6)
    # TRL's eps 1e-4 is the default: std + 1e-4 in the denominator.
    assert group_advantages(scores, 2)[1].item() == pytest.approx(1 / (math.sqrt(2) + 1e-4), abs=1e-6)
    assert group_advantages(scores, 2, scale=None).tolist() == pytest.approx([-1.0, 1.0, 0.0, 0.0])
    # RLOO, G = 3: r = (1, 2, 6): baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5.
    assert rloo_advantages(T([1.0, 2.0, 6.0]), 3).tolist() == pytest.approx([-3.0, -1.5, 4.5])
    # One sample per prompt has no group to compare with: grpo's std would be NaN, dr_grpo's advantage 0.
    for scale in ("group", "batch", None):
        with pytest.raises(ValueError, match="group_size >= 2"):
            group_advantages(T([1.0, 3.0]), 1, scale=scale)


def test_rloo_advantages_sum_to_zero_per_group():
    scores = torch.randn(5 * 4, generator=torch.Generator().manual_seed(1))
    sums = rloo_advantages(scores, 4).view(5, 4).sum(1)
    assert sums.abs().max() < 1e-5


# ---- masked statistics and aggregation --------------------------------------------------

def test_masked_stats_by_hand():
    x = T([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    m = T([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_mean(x, m).item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    assert masked_mean(x, m, dim=1).tolist() == pytest.approx([1.5, 3.0])
    assert masked_var(x, m).item() == pytest.approx(1.0)  # ((1-2)^2 + 0 + (3-2)^2) / (3 - 1)
    w = masked_whiten(x, m)
    assert w.flatten().tolist() == pytest.approx([-1.0, 0.0, 0.0, 1.0, 0.0, 0.0], abs=1e-4)
    assert masked_whiten(x, m, shift_mean=False)[0, 0].item() == pytest.approx(1.0, abs=1e-4)  # -1 + 2
    # Two processes holding the same rows: the sums double. Mean 2, sum of squares 4 over 6 - 1.
    w2 = masked_whiten(x, m, reduce_sum=lambda t: 2 * t)
    assert w2.flatten().tolist() == pytest.approx([-1 / 0.8 ** 0.5, 0.0, 0.0, 1 / 0.8 ** 0.5, 0.0, 0.0], abs=1e-4)


def test_all_masked_row_gives_no_nans():
    x, m = torch.randn(2, 4), T([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert masked_mean(x, m, dim=1)[1].item() == 0.0
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        assert torch.isfinite(agg_loss(x, m, mode))
        assert torch.isfinite(agg_loss(x, torch.zeros_like(m), mode))
    rewards, kl = kl_penalized_rewards(T([1.0, 5.0]), x, torch.zeros_like(x), m, kl_coef=0.1)
    assert rewards[1].abs().sum() == 0 and torch.isfinite(rewards).all()
    adv, _ = gae(rewards, x, m, 1.0, 0.95)
    assert torch.isfinite(adv).all()
    loss, metrics = ppo_policy_loss(x, x, x, torch.zeros_like(m))
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())


def test_agg_loss_modes_by_hand():
    x = T([[1.0, 3.0, 0.0], [6.0, 0.0, 0.0]])
    m = T([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert agg_loss(x, m, "token-mean").item() == pytest.approx(10 / 3)
    assert agg_loss(x, m, "seq-mean-token-mean").item() == pytest.approx((2 + 6) / 2)
    assert agg_loss(x, m, "seq-mean-token-sum").item() == pytest.approx((4 + 6) / 2)
    with pytest.raises(ValueError, match="valid: token-mean"):
        agg_loss(x, m, "mean")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_agg_loss_is_invariant_to_the_data_parallel_split(mode):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 6, generator=g)
    m = (torch.rand(8, 6, generator=g) > 0.4).float()
    whole = agg_loss(x, m, mode)
    n_tokens, n_seqs = m.sum(), (m.sum(1) > 0).sum()
    # Each rank holds half the sequences and is told the global counts; the parts add up.
    parts = sum(agg_loss(x[s], m[s], mode, global_tokens=n_tokens, global_seqs=n_seqs)
                for s in (slice(0, 3), slice(3, 8)))
    torch.testing.assert_close(parts, whole)


# ---- token statistics ---------------------------------------------------------------------

def test_logprobs_and_entropy_match_the_naive_forms(monkeypatch):
    import rlhf.algos.tokens as tok
    monkeypatch.setattr(tok, "_CHUNK_ELEMENTS", 7 * 11)  # force several chunks
    g = torch.Generator().manual_seed(3)
    logits, tokens = torch.randn(3, 5, 11, generator=g), torch.randint(0, 11, (3, 5), generator=g)
    naive = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(logprobs_from_logits(logits, tokens), naive)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1))
    # bf16 logits are upcast inside each chunk.
    out = logprobs_from_logits(logits.bfloat16(), tokens)
    assert out.dtype == torch.float32 and (out - naive).abs().max() < 0.05


def test_head_logprobs_over_chunks_and_entropy_as_a_metric(monkeypatch):
    """The LM head run over chunks of rows gives the whole logits' log-probs, entropy and gradients;
    ``entropy_grad=False`` gives the same entropy as a metric without gradient (GRPO's), so the
    backward pass recomputes no chunk for it."""
    import rlhf.algos.tokens as tok
    from rlhf.algos import head_logprobs

    monkeypatch.setattr(tok, "_CHUNK_ELEMENTS", 4 * 13)  # 4 rows a chunk: 3 chunks for 10 rows
    g = torch.Generator().manual_seed(5)
    head = torch.nn.Linear(6, 13, bias=False)
    hidden = torch.randn(10, 6, generator=g, requires_grad=True)
    tokens = torch.randint(0, 13, (10,), generator=g)
    logits = head(hidden) / 0.7
    w = torch.randn(10, generator=g)
    whole_lp, whole_ent = logprobs_from_logits(logits, tokens), entropy_from_logits(logits)
    want = torch.autograd.grad((whole_lp * w).sum() + (whole_ent * w).sum(), (hidden, head.weight), retain_graph=True)
    lp, ent = head_logprobs(hidden, head, tokens, 0.7, with_entropy=True)
    got = torch.autograd.grad((lp * w).sum() + (ent * w).sum(), (hidden, head.weight))
    torch.testing.assert_close((lp, ent, *got), (whole_lp, whole_ent, *want))
    lp, ent = head_logprobs(hidden, head, tokens, 0.7, with_entropy=True, entropy_grad=False)
    assert lp.requires_grad and not ent.requires_grad
    torch.testing.assert_close(ent, whole_ent.detach())
    got = torch.autograd.grad((lp * w).sum(), (hidden, head.weight))
    torch.testing.assert_close(got, torch.autograd.grad((whole_lp * w).sum(), (hidden, head.weight)))


def _checkpointed_head_stats(hidden, head, tokens, temperature, step):
    """The chunked LM head as it was before the fused backward (d907d81): every chunk through
    activation checkpointing, each chunk's weight gradient a tensor of its own, added by autograd."""
    from torch.utils.checkpoint import checkpoint

    def chunk(h, t):
        z = head(h) / temperature
        with torch.no_grad():
            return logprobs_from_logits(z, t), entropy_from_logits(z), z.argmax(-1) == t

    def lp_only(h, t):
        return logprobs_from_logits(head(h) / temperature, t)

    lp = torch.cat([checkpoint(lp_only, hidden[i : i + step], tokens[i : i + step], use_reentrant=False)
                    for i in range(0, len(hidden), step)])
    _, ent, correct = (torch.cat(x) for x in zip(*(chunk(hidden[i : i + step], tokens[i : i + step])
                                                 for i in range(0, len(hidden), step))))
    return lp, ent, correct


@pytest.mark.parametrize("bias,temperature", [(False, 1.0), (True, 0.7)])
def test_linear_head_fused_backward_equals_checkpointed_chunks(monkeypatch, bias, temperature):
    """The LM head's fused path (an ``nn.Linear`` head over several chunks, the entropy a metric: GRPO's
    update, DPO's reply log-probs) gives the log-probs, entropy, argmax hits and the hidden states'
    gradient of the checkpointed chunks bit for bit, and the weight's (and bias's) gradient, summed over
    the chunks in place, within 1e-6 of its largest entry."""
    import rlhf.algos.tokens as tok
    from rlhf.algos.tokens import head_token_stats

    monkeypatch.setattr(tok, "_CHUNK_ELEMENTS", 4 * 13)  # 4 rows a chunk: 3 chunks for 10 rows
    monkeypatch.setattr(tok, "_FUSED_CHUNKS", 1)  # the same chunks, so the same matmuls (larger: below)
    g = torch.Generator().manual_seed(7)
    head = torch.nn.Linear(6, 13, bias=bias)
    hidden = torch.randn(10, 6, generator=g, requires_grad=True)
    tokens = torch.randint(0, 13, (10,), generator=g)
    w = torch.randn(10, generator=g)
    out = head_token_stats(hidden, head, tokens, temperature, entropy=True, entropy_grad=False, correct=True)
    assert out["logprobs"].grad_fn is not None and "LinearHead" in type(out["logprobs"].grad_fn).__name__
    params = [hidden, *head.parameters()]
    got = torch.autograd.grad((out["logprobs"] * w).sum(), params)
    lp, ent, correct = _checkpointed_head_stats(hidden, head, tokens, temperature, 4)
    want = torch.autograd.grad((lp * w).sum(), params)
    assert torch.equal(out["logprobs"], lp) and torch.equal(out["entropy"], ent) and torch.equal(out["correct"], correct)
    assert torch.equal(got[0], want[0])  # the hidden states' gradient: the same operations
    for a, b in zip(got[1:], want[1:]):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max()


def test_linear_head_fused_over_larger_chunks_within_rounding(monkeypatch):
    """The fused path's chunks are ``_FUSED_CHUNKS`` times larger than the checkpointed ones: the same
    numbers within float32 rounding (matmuls of another shape), 1e-6 of each tensor's largest entry."""
    import rlhf.algos.tokens as tok
    from rlhf.algos.tokens import head_token_stats

    monkeypatch.setattr(tok, "_CHUNK_ELEMENTS", 3 * 97)  # 3 rows a chunk; fused: 12 rows, 5 chunks for 50 rows
    g = torch.Generator().manual_seed(9)
    head = torch.nn.Linear(16, 97, bias=True)
    hidden = torch.randn(50, 16, generator=g, requires_grad=True)
    tokens = torch.randint(0, 97, (50,), generator=g)
    w = torch.randn(50, generator=g)
    out = head_token_stats(hidden, head, tokens, 0.7, entropy=True, entropy_grad=False)
    params = [hidden, *head.parameters()]
    got = torch.autograd.grad((out["logprobs"] * w).sum(), params)
    lp, ent, _ = _checkpointed_head_stats(hidden, head, tokens, 0.7, 3)
    want = torch.autograd.grad((lp * w).sum(), params)
    for a, b in zip((out["logprobs"], out["entropy"], *got), (lp, ent, *want)):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max()


def test_one_chunk_of_the_head_is_kept_not_recomputed(monkeypatch):
    """Rows that fit one chunk (every small vocabulary) are not checkpointed: the backward pass runs
    no second forward of the head, and the numbers are those of the checkpointed chunk to the bit."""
    from rlhf.algos.tokens import head_token_stats

    g = torch.Generator().manual_seed(8)
    calls = []
    linear = torch.nn.Linear(6, 13, bias=False)

    def head(h):  # a callable head (softcapping models), so the general path
        calls.append(h.shape[0])
        return linear(h)

    hidden = torch.randn(10, 6, generator=g, requires_grad=True)
    tokens = torch.randint(0, 13, (10,), generator=g)
    out = head_token_stats(hidden, head, tokens, 0.7, entropy=True, entropy_grad=False)
    got = torch.autograd.grad(out["logprobs"].sum(), (hidden, linear.weight))
    assert calls == [0, 10]  # the vocabulary probe, then one forward: nothing recomputed
    lp, ent, _ = _checkpointed_head_stats(hidden, linear, tokens, 0.7, 10)
    want = torch.autograd.grad(lp.sum(), (hidden, linear.weight))
    assert torch.equal(out["logprobs"], lp) and torch.equal(out["entropy"], ent)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_entropy_of_uniform_is_log_v():
    assert entropy_from_logits(torch.zeros(1, 1, 8)).item() == pytest.approx(math.log(8))


def test_sft_loss_counts_only_labelled_tokens():
    # Vocab 2, uniform logits: every labelled token costs log 2 whatever the prompt holds.
    logits = torch.zeros(1, 4, 2)
    labels = T([[-100, -100, 1, 0]]).long()  # only positions 2 and 3 are response
    loss, m = sft_loss(logits, labels)
    assert loss.item() == pytest.approx(math.log(2))
    assert m["num_tokens"].item() == 2
    naive = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 2), labels[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx(naive.item())


# ---- KL estimators and controllers ---------------------------------------------------------

def test_kl_estimators_sign_and_size():
    lp, ref = T([math.log(0.5), math.log(0.2)]), T([math.log(0.25), math.log(0.4)])
    # lr = log 2 and -log 2
    k1, k2, k3 = (kl_estimate(lp, ref, e) for e in ("k1", "k2", "k3"))
    assert k1.tolist() == pytest.approx([math.log(2), -math.log(2)], abs=1e-6)  # can be negative
    assert k2.tolist() == pytest.approx([0.5 * math.log(2) ** 2] * 2, abs=1e-6)
    # k3 = 1/r - 1 + log r with r = pi/pi_ref: r=2 -> 0.5 - 1 + log 2 = 0.193147; r=0.5 -> 2 - 1 - log 2 = 0.306853
    assert k3.tolist() == pytest.approx([0.193147, 0.306853], abs=1e-6)
    assert (k2 >= 0).all() and (k3 >= 0).all()
    assert kl_estimate(lp, lp, "k3").abs().max() == 0
    assert torch.isfinite(kl_estimate(T([-100.0]), T([0.0]), "k3")).all()
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(lp, ref, "k4")


def test_kl_controllers():
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 8)
    assert fixed.value == 0.05
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=100)  # error clipped to +0.2: 0.1 * (1 + 0.2 * 100 / 10000) = 0.1002
    assert ctl.value == pytest.approx(0.1002)
    ctl.update(3.0, n_steps=100)  # error -0.5 clipped to -0.2: 0.1002 * 0.998
    assert ctl.value == pytest.approx(0.1002 * 0.998)


# ---- value loss, Bradley-Terry, DPO --------------------------------------------------------

def test_value_loss_clipping_by_hand():
    # old 0, new 1, target 2, clip 0.2: unclipped (1-2)^2 = 1; clipped (0.2-2)^2 = 3.24 -> max 3.24.
    loss, m = value_loss(T([[1.0]]), T([[0.0]]), T([[2.0]]), T([[1.0]]), clip_eps=0.2)
    assert loss.item() == pytest.approx(0.5 * 3.24)
    assert m["clipfrac"].item() == 1.0


def test_explained_variance():
    returns = T([[1.0, 2.0, 3.0, 4.0]])
    _, m = value_loss(returns.clone(), returns, returns, torch.ones(1, 4))
    assert m["explained_variance"].item() == pytest.approx(1.0)
    _, m = value_loss(torch.full((1, 4), 2.5), returns, returns, torch.ones(1, 4))
    assert m["explained_variance"].item() == pytest.approx(0.0, abs=1e-6)


def test_bradley_terry_by_hand():
    # s+ - s- = 0 -> log 2; = 2 -> log(1 + e^-2) = 0.126928; margin 1 on the second: log(1 + e^-1)
    loss, m = bradley_terry_loss(T([0.0, 2.0]), T([0.0, 0.0]))
    assert loss.item() == pytest.approx((math.log(2) + 0.126928) / 2, abs=1e-6)
    assert m["accuracy"].item() == 0.5 and m["margin"].item() == pytest.approx(1.0)
    loss, _ = bradley_terry_loss(T([2.0]), T([0.0]), margin=T([1.0]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_dpo_loss_is_log2_when_policy_equals_reference():
    lp, n = T([-3.0, -7.0]), T([2.0, 5.0])
    for lt, expected in (("sigmoid", math.log(2)), ("ipo", (1 / (2 * 0.1)) ** 2), ("hinge", 1.0)):
        loss, m = dpo_loss(lp, lp - 1, lp, lp - 1, beta=0.1, loss_type=lt, chosen_lengths=n, rejected_lengths=n)
        assert loss.item() == pytest.approx(expected)
    assert m["margin"].item() == 0.0 and m["accuracy"].item() == 0.0


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    for lt in ("sigmoid", "ipo", "hinge"):
        chosen, rejected = T([-5.0], requires_grad=True), T([-5.0], requires_grad=True)
        loss, _ = dpo_loss(chosen, rejected, T([-5.0]), T([-5.0]), beta=0.1, loss_type=lt,
                           chosen_lengths=T([3.0]), rejected_lengths=T([4.0]))
        loss.backward()
        assert chosen.grad.item() < 0 < rejected.grad.item(), lt  # descent raises chosen


def test_dpo_by_hand_and_label_smoothing():
    # h = (-1 - -2) - (-3 - -2) = 2; beta 0.5 -> -log sigmoid(1) = 0.313262
    loss, m = dpo_loss(T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]), beta=0.5)
    assert loss.item() == pytest.approx(0.313262, abs=1e-6)
    assert m["rewards_chosen"].item() == pytest.approx(0.5) and m["rewards_rejected"].item() == pytest.approx(-0.5)
    assert m["accuracy"].item() == 1.0 and m["margin"].item() == pytest.approx(1.0)
    # cDPO eps 0.1: 0.9 * 0.313262 + 0.1 * -log sigmoid(-1) = 0.9 * 0.313262 + 0.1 * 1.313262
    loss, _ = dpo_loss(T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]), beta=0.5, loss_type="cdpo", label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * 0.313262 + 0.1 * 1.313262, abs=1e-6)
    # robust DPO eps 0.1: (0.9 * 0.313262 - 0.1 * 1.313262) / 0.8 = 0.188262
    loss, _ = dpo_loss(T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]), beta=0.5, loss_type="robust", label_smoothing=0.1)
    assert loss.item() == pytest.approx((0.9 * 0.313262 - 0.1 * 1.313262) / 0.8, abs=1e-6)
    # TRL 1.13's sigmoid ignores label smoothing (the recipe refuses it there).
    loss, _ = dpo_loss(T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]), beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.313262, abs=1e-6)
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge, robust, cdpo"):
        dpo_loss(T([0.0]), T([0.0]), T([0.0]), T([0.0]), loss_type="kto")


def test_ipo_by_hand_uses_per_token_mean_logprobs():
    # Azar et al. 2023 on length-averaged log-probs, as TRL's loss_type="ipo".
    # chosen: policy -6 and reference -9 over 3 tokens -> means -2 and -3, ratio +1;
    # rejected: policy -8 and reference -6 over 2 tokens -> means -4 and -3, ratio -1.
    # h = 1 - (-1) = 2; beta 0.5: (h - 1 / (2 beta))^2 = (2 - 1)^2 = 1 (summed log-probs: h = 5, loss 16).
    loss, m = dpo_loss(T([-6.0]), T([-8.0]), T([-9.0]), T([-6.0]), beta=0.5, loss_type="ipo",
                       chosen_lengths=T([3.0]), rejected_lengths=T([2.0]))
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    # The implicit rewards are TRL's for every loss: beta x the summed log-ratios, +3 and -2.
    assert m["rewards_chosen"].item() == pytest.approx(1.5) and m["rewards_rejected"].item() == pytest.approx(-1.0)
    assert m["margin"].item() == pytest.approx(2.5)
    # The same per-token numbers on a response 10 times longer: the same loss and the same
    # gradient per token (summed log-probs made both grow with the length).
    grads = []
    for k in (1.0, 10.0):
        chosen = T([-6.0 * k], requires_grad=True)
        loss, _ = dpo_loss(chosen, T([-8.0 * k]), T([-9.0 * k]), T([-6.0 * k]), beta=0.5, loss_type="ipo",
                           chosen_lengths=T([3.0 * k]), rejected_lengths=T([2.0 * k]))
        loss.backward()
        assert loss.item() == pytest.approx(1.0, abs=1e-5)
        grads.append(chosen.grad.item() * 3.0 * k)  # d loss / d (mean log-prob of the chosen reply)
    assert grads[0] == pytest.approx(grads[1]) == pytest.approx(2 * (2 - 1))
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(T([0.0]), T([0.0]), T([0.0]), T([0.0]), loss_type="ipo")


def test_dual_clip_and_asymmetric_clip():
    # A = -1, r = 5: standard clip gives max(5, 0.8) = 5; dual clip 3 caps it at 3.
    loss, _ = ppo_policy_loss(T([[math.log(5.0)]]), T([[0.0]]), T([[-1.0]]), T([[1.0]]), dual_clip=3.0)
    assert loss.item() == pytest.approx(3.0)
    # A = +1, r = 1.25: eps_high 0.28 lets the ratio reach 1.25 unclipped.
    loss, m = ppo_policy_loss(T([[math.log(1.25)]]), T([[0.0]]), T([[1.0]]), T([[1.0]]), clip_eps_high=0.28)
    assert loss.item() == pytest.approx(-1.25) and m["clipfrac"].item() == 0.0


def test_algos_imports_torch_only():
    code = "import sys, rlhf.algos; print([m for m in ('transformers','peft','accelerate','datasets') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
