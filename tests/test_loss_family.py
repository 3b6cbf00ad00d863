"""The RLVR loss family (issue 25): each policy loss and normalisation by hand, DAPO's shaping and
filtering, REINFORCE++, batch-scaled advantages; and, where TRL is installed (the bench extra), each
GRPO ``loss_type`` and DPO loss against TRL 1.13's own code on identical inputs."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rlhf.algos import (
    LOSS_TYPES,
    dpo_loss,
    group_advantages,
    importance_log_ratio,
    kl_estimate,
    normalise_policy_loss,
    overlong_penalty,
    policy_loss_terms,
    reinforce_pp_advantages,
    tied_groups,
)
from rlhf.rollout import RolloutBatch, concat_batches


def T(x):
    return torch.tensor(x, dtype=torch.float)


# ratios (1.5, 0.5, 1.0) on one sequence of three tokens
LOGPROBS = T([[-1.0, -2.0, -0.5]])
OLD = LOGPROBS - torch.log(T([[1.5, 0.5, 1.0]]))
MASK = T([[1.0, 1.0, 1.0]])


def test_clipped_surrogate_by_hand():
    adv = T([[1.0, -1.0, 2.0]])
    per_token, m = policy_loss_terms("grpo", LOGPROBS, OLD, adv, MASK, clip_eps=0.2)
    # r 1.5, A 1: min(1.5, 1.2) -> -1.2; r 0.5, A -1: min(-0.5, -0.8) -> +0.8; r 1, A 2: -2.
    assert per_token.tolist()[0] == pytest.approx([-1.2, 0.8, -2.0], abs=1e-6)
    assert m["clip_ratio/high_mean"].item() == pytest.approx(1 / 3)
    assert m["clip_ratio/low_mean"].item() == pytest.approx(1 / 3)
    assert m["clip_ratio/region_mean"].item() == pytest.approx(2 / 3)
    # DAPO's clip-higher: eps_high 0.6 lets r 1.5 through.
    per_token, _ = policy_loss_terms("dapo", LOGPROBS, OLD, adv, MASK, clip_eps=0.2, clip_eps_high=0.6)
    assert per_token[0, 0].item() == pytest.approx(-1.5)
    # INTELLECT-2's delta caps the unclipped ratio of a negative advantage: r 1.5, A -1, delta 1.3 -> +1.3.
    per_token, _ = policy_loss_terms("grpo", LOGPROBS, OLD, T([[-1.0, -1.0, -1.0]]), MASK, delta=1.3)
    assert per_token[0, 0].item() == pytest.approx(1.3)


def test_cispo_by_hand_keeps_a_gradient_on_every_token():
    logprobs = LOGPROBS.clone().requires_grad_(True)
    adv = T([[1.0, -1.0, 2.0]])
    per_token, m = policy_loss_terms("cispo", logprobs, OLD, adv, MASK, clip_eps_high=1.2)
    # -sg(min(r, 1.2)) A log pi: -1.2*1*(-1) = 1.2; -0.5*(-1)*(-2) = -1; -1*2*(-0.5) = 1.
    assert per_token.tolist()[0] == pytest.approx([1.2, -1.0, 1.0], abs=1e-6)
    per_token.sum().backward()
    # d/dlog pi = -sg(w) A: the clipped first token still has gradient -1.2 (the PPO clip would give 0).
    assert logprobs.grad.tolist()[0] == pytest.approx([-1.2, 0.5, -2.0], abs=1e-6)
    assert m["cispo_clip_ratio"].item() == pytest.approx(1 / 3)


def test_sapo_soft_gate_by_hand():
    adv = T([[1.0, -1.0, 2.0]])
    ratio = torch.exp(LOGPROBS - OLD).requires_grad_(True)
    per_token, _ = policy_loss_terms("sapo", torch.log(ratio), torch.zeros_like(ratio), adv, MASK)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [-4 * sig(0.5) * 1.0, -(4 / 1.05) * sig(1.05 * -0.5) * -1.0, -4 * 0.5 * 2.0]
    assert per_token.tolist()[0] == pytest.approx(expected, abs=1e-6)
    per_token[0, 2].backward()  # at r = 1 the gate's slope is 1: d/dr = -A = -2
    assert ratio.grad[0, 2].item() == pytest.approx(-2.0, abs=1e-6)


def test_sequence_level_ratio_gspo_and_vespo_by_hand():
    # GSPO: one ratio per sequence, exp(mean log r) = exp((log 1.5 + log 0.5) / 3) = 0.908560.
    seq = importance_log_ratio(LOGPROBS, OLD, MASK, "sequence")
    assert seq.shape == (1, 1) and math.exp(seq.item()) == pytest.approx(0.908560, abs=1e-6)
    per_token, _ = policy_loss_terms("grpo", LOGPROBS, OLD, T([1.0]), MASK, importance_sampling_level="sequence")
    assert per_token.tolist()[0] == pytest.approx([-0.908560] * 3, abs=1e-6)
    # VESPO: w = 1.5 * 0.5 * 1 = 0.75; A >= 0: phi = e^3 0.75^2 e^(-3 * 0.75) = 1.190812; -phi A log pi.
    per_token, m = policy_loss_terms("vespo", LOGPROBS, OLD, T([1.0]), MASK)
    phi = math.exp(3) * 0.75**2 * math.exp(-2.25)
    assert m["vespo/phi_seq_mean"].item() == pytest.approx(phi, abs=1e-5)
    assert per_token.tolist()[0] == pytest.approx([phi * 1.0, phi * 2.0, phi * 0.5], abs=1e-5)


LOSS = T([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
LOSS_MASK = T([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize("normalisation, expected", [
    ("seq-mean", (1.5 + 3) / 2),       # each sequence's token mean, then the mean
    ("seq-sum", (3 + 3) / 2),          # each sequence's token sum, then the mean
    ("seq-sum-len", 6 / (2 * 4)),      # token sums over sequences x max_new_tokens (4)
    ("micro-tokens", 6 / 3),           # one micro-batch: its token mean
    ("batch-tokens", 6 / 3),           # the rollout's 3 tokens
])
def test_normalisations_by_hand_and_parts_sum_to_the_whole(normalisation, expected):
    kw = dict(global_seqs=2, global_tokens=3, global_micro_batches=1, max_new_tokens=4)
    assert normalise_policy_loss(LOSS, LOSS_MASK, normalisation, **kw).item() == pytest.approx(expected)
    # Split into two micro-batches of one row: the parts sum to the whole-batch value...
    kw["global_micro_batches"] = 2
    parts = sum(normalise_policy_loss(LOSS[i : i + 1], LOSS_MASK[i : i + 1], normalisation, **kw) for i in range(2))
    # ...except BNPO's, which is by definition the mean of each micro-batch's own token mean: (3/2 + 3/1) / 2.
    assert parts.item() == pytest.approx(2.25 if normalisation == "micro-tokens" else expected)


def test_every_loss_type_has_a_surrogate_and_a_normalisation():
    for name, lt in LOSS_TYPES.items():
        per_token, _ = policy_loss_terms(name, LOGPROBS, OLD, T([1.0]), MASK, clip_eps_high=5.0)
        assert per_token.shape == (1, 3)
        normalise_policy_loss(per_token, MASK, lt.normalisation, global_seqs=1, global_tokens=3,
                              global_micro_batches=1, max_new_tokens=3)
    with pytest.raises(ValueError, match="valid: grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo"):
        policy_loss_terms("ppo2", LOGPROBS, OLD, T([1.0]), MASK)


def test_batch_scaled_advantages_by_hand_and_across_processes():
    scores = T([1.0, 3.0, 2.0, 2.0])
    # group means 2 and 2: centred (-1, 1, 0, 0); the batch's unbiased std sqrt(2/3) = 0.816497.
    adv = group_advantages(scores, 2, scale="batch", eps=1e-12)
    assert adv.tolist() == pytest.approx([-1.224745, 1.224745, 0.0, 0.0], abs=1e-5)
    # Two processes with a group each: the sums over processes give the same std.
    other = [T([2.0, 4.0]), T(0.0)]  # the other process's (count, sum) and squared deviations
    reduce = lambda t: t + other.pop(0)  # noqa: E731
    assert group_advantages(scores[:2], 2, scale="batch", eps=1e-12, reduce_sum=reduce).tolist() == \
        pytest.approx([-1.224745, 1.224745], abs=1e-5)
    # TRL's eps keeps a near-tied group's noise small: (0.3, 0.3, 0.3, 0.3001) gives +-0.5 at 1e-4.
    near = group_advantages(T([0.3, 0.3, 0.3, 0.3001]), 4)
    assert near.abs().max().item() == pytest.approx(0.75 * 1e-4 / (0.5e-4 + 1e-4), rel=0.05)


def test_reinforce_pp_returns_whitened_over_the_batch_by_hand():
    rewards = T([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, returns = reinforce_pp_advantages(rewards, mask)
    assert returns.flatten().tolist() == pytest.approx([1.0, 1.0, 1.0, 2.0, 2.0, 0.0])
    # returns 1, 1, 1, 2, 2: mean 1.4, unbiased variance 1.2 / 4 = 0.3.
    low, high = -0.4 / math.sqrt(0.3), 0.6 / math.sqrt(0.3)
    assert adv.flatten().tolist() == pytest.approx([low, low, low, high, high, 0.0], abs=1e-5)


def test_overlong_penalty_and_tied_groups_by_hand():
    # L_max 10, buffer 4: no penalty up to 6, then linear to -1 at 10.
    assert overlong_penalty(T([5, 6, 8, 10]), 10, 4).tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0])
    assert overlong_penalty(T([9]), 10, 4, penalty=2.0).tolist() == pytest.approx([-1.5])
    assert tied_groups(T([1.0, 1.0, 2.0, 3.0]), 2).tolist() == [True, False]


def test_concat_batches_pads_prompts_left_and_responses_right():
    a = RolloutBatch(torch.tensor([[5, 6]]), torch.tensor([[1, 1]]), torch.tensor([[7, 8]]), torch.tensor([[1, 1]]),
                     torch.tensor([True]))
    b = RolloutBatch(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 1, 1]]), torch.tensor([[9]]), torch.tensor([[1]]),
                     torch.tensor([False]))
    c = concat_batches([a, b], pad_id=0)
    assert c.prompt_ids.tolist() == [[0, 5, 6], [1, 2, 3]] and c.prompt_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert c.response_ids.tolist() == [[7, 8], [9, 0]] and c.response_mask.tolist() == [[1, 1], [1, 0]]
    assert c.rows(torch.tensor([1])).finished.tolist() == [False]


def test_dpo_ipo_rewards_are_trls_summed_log_ratios():
    # Replies of 20 and 2 tokens (issue 25): per-token means would read accuracy 0, the sums read 1.
    _, m = dpo_loss(T([-20.0]), T([-4.5]), T([-20.5]), T([-4.0]), beta=0.1, loss_type="ipo",
                    chosen_lengths=T([20.0]), rejected_lengths=T([2.0]))
    assert m["accuracy"].item() == 1.0 and m["margin"].item() == pytest.approx(0.1, abs=1e-6)


# ---- TRL 1.13 as the oracle (run where trl is installed: pip install -e '.[bench]') ------------

B, TT, V = 4, 5, 7


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, TT, V, generator=g)
    tokens = torch.randint(V, (B, TT), generator=g)
    mask = torch.ones(B, TT)
    mask[1, 3:] = 0
    mask[2, 1:] = 0
    old = torch.log_softmax(logits + 0.3 * torch.randn(B, TT, V, generator=g), -1).gather(-1, tokens[..., None])[..., 0]
    ref = torch.log_softmax(logits + 0.3 * torch.randn(B, TT, V, generator=g), -1).gather(-1, tokens[..., None])[..., 0]
    adv = torch.randn(B, generator=g)
    return logits, tokens, mask, old, ref, adv


def _logps(W, tokens):
    return torch.log_softmax(W, -1).gather(-1, tokens[..., None])[..., 0]  # (B, T)


def _trl_grpo_loss(loss_type, W, tokens, mask, old, ref, adv, beta, level, bias_kl, micro, eps_high):
    trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    rows = [slice(i, i + B // micro) for i in range(0, B, B // micro)]
    total = 0.0
    for r in rows:
        fake = SimpleNamespace(
            aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
            importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=0.2, epsilon_high=eps_high,
            use_vllm=False, vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
            current_gradient_accumulation_steps=micro, max_completion_length=TT, _entropy_bonus_enabled=False,
            _metrics=defaultdict(lambda: defaultdict(list)), get_gamma_weights=trainer.GRPOTrainer.get_gamma_weights,
            accelerator=SimpleNamespace(num_processes=1, reduce=lambda x, reduction: x, gather=lambda x: x),
            args=SimpleNamespace(use_bias_correction_kl=bias_kl, delta=None, sapo_temperature_pos=1.0,
                                 sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                                 vespo_lambda_neg=2.0, steps_per_generation=micro),
        )
        fake._get_per_token_logps_and_entropies = lambda *a, r=r, **k: (_logps(W[r], tokens[r]),
                                                                        torch.zeros(mask[r].shape), None)
        inputs = {"prompt_ids": torch.zeros(len(tokens[r]), 1, dtype=torch.long),
                  "prompt_mask": torch.ones(len(tokens[r]), 1, dtype=torch.long), "completion_ids": tokens[r],
                  "completion_mask": mask[r], "advantages": adv[r], "old_per_token_logps": old[r],
                  "ref_per_token_logps": ref[r], "num_items_in_batch": mask.sum()}
        total = total + trainer.GRPOTrainer._compute_loss(fake, None, inputs)
    return total


def _our_grpo_loss(loss_type, W, tokens, mask, old, ref, adv, beta, level, bias_kl, micro, eps_high):
    rows = [slice(i, i + B // micro) for i in range(0, B, B // micro)]
    total = 0.0
    for r in rows:
        logprobs = _logps(W[r], tokens[r])
        per_token, _ = policy_loss_terms(loss_type, logprobs, old[r], adv[r], mask[r], clip_eps=0.2,
                                         clip_eps_high=eps_high, importance_sampling_level=level)
        if beta:
            kl = kl_estimate(logprobs, ref[r], "k3")
            if bias_kl:
                kl = kl * torch.exp(importance_log_ratio(logprobs, old[r], mask[r], level))
            per_token = per_token + beta * kl
        total = total + normalise_policy_loss(per_token, mask[r], LOSS_TYPES[loss_type].normalisation,
                                              global_seqs=B, global_tokens=mask.sum(), global_micro_batches=micro,
                                              max_new_tokens=TT)
    return total


GRPO_CASES = [(lt, 0.0, "token", False, 1) for lt in LOSS_TYPES] + [
    ("grpo", 0.04, "token", True, 1), ("dapo", 0.04, "token", False, 2), ("bnpo", 0.0, "token", False, 2),
    ("dr_grpo", 0.04, "token", True, 2), ("grpo", 0.0, "sequence", False, 1), ("luspo", 0.0, "sequence", False, 1),
    ("sapo", 0.04, "sequence", True, 2), ("cispo", 0.04, "token", True, 2), ("vespo", 0.0, "token", False, 2),
]


@pytest.mark.parametrize("loss_type, beta, level, bias_kl, micro", GRPO_CASES)
def test_grpo_loss_types_equal_trl(loss_type, beta, level, bias_kl, micro):
    logits, tokens, mask, old, ref, adv = _inputs()
    eps_high = 5.0 if loss_type == "cispo" else 0.28
    results = []
    for fn in (_trl_grpo_loss, _our_grpo_loss):
        W = logits.clone().requires_grad_(True)
        loss = fn(loss_type, W, tokens, mask, old, ref, adv, beta, level, bias_kl, micro, eps_high)
        loss.backward()
        results.append((loss.detach(), W.grad))
    (trl_loss, trl_grad), (our_loss, our_grad) = results
    assert abs(our_loss - trl_loss).item() <= 1e-6 * max(1.0, abs(trl_loss).item())
    assert (our_grad - trl_grad).abs().max().item() <= 1e-6


def _trl_dpo(loss_type, smoothing, beta, W, input_ids, completion_mask, ref_c, ref_r):
    dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    metrics = defaultdict(lambda: defaultdict(list))
    gather = lambda x: x  # noqa: E731
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device="cpu", gather=gather,
                                                                          gather_for_metrics=gather),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=smoothing, use_weighting=False,
        _metrics=metrics, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "completion_mask": completion_mask,
              "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    loss = dpo.DPOTrainer._compute_loss(fake, lambda **kw: SimpleNamespace(logits=W), inputs, False)
    return loss, {k: v[0] for k, v in metrics["train"].items()}


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)])
def test_dpo_losses_equal_trl(loss_type, smoothing):
    g = torch.Generator().manual_seed(1)
    n, L, beta = 3, 8, 0.1
    logits = torch.randn(2 * n, L, V, generator=g)
    input_ids = torch.randint(V, (2 * n, L), generator=g)
    completion_mask = torch.zeros(2 * n, L, dtype=torch.long)
    for row, (start, end) in enumerate([(2, 8), (3, 5), (2, 3), (4, 8), (2, 4), (5, 8)]):  # replies of 1 to 6 tokens
        completion_mask[row, start:end] = 1
    ref_c, ref_r = torch.randn(n, generator=g) * 3, torch.randn(n, generator=g) * 3
    results = []
    for ours in (False, True):
        W = logits.clone().requires_grad_(True)
        if ours:
            per_token = torch.log_softmax(W[:, :-1], -1).gather(-1, input_ids[:, 1:, None])[..., 0]
            shift = completion_mask[:, 1:].float()
            logps, lengths = (per_token * shift).sum(1), shift.sum(1)
            loss, m = dpo_loss(logps[:n], logps[n:], ref_c, ref_r, beta, loss_type, smoothing, lengths[:n], lengths[n:])
            m = {"rewards/chosen": m["rewards_chosen"].item(), "rewards/margins": m["margin"].item(),
                 "rewards/accuracies": m["accuracy"].item()}
        else:
            loss, m = _trl_dpo(loss_type, smoothing, beta, W, input_ids, completion_mask, ref_c, ref_r)
        loss.backward()
        results.append((loss.detach(), W.grad, m))
    (trl_loss, trl_grad, trl_m), (our_loss, our_grad, our_m) = results
    assert abs(our_loss - trl_loss).item() <= 1e-6
    assert (our_grad - trl_grad).abs().max().item() <= 1e-6
    for key in ("rewards/chosen", "rewards/margins", "rewards/accuracies"):
        assert our_m[key] == pytest.approx(trl_m[key], abs=1e-6), key


# ---- the recipe: rlhf grpo with the family's options ----------------------------------------------

def _grpo(tiny_dir, prompts_file, tmp_path, **over):
    from rlhf.recipes import grpo

    kw = dict(model=tiny_dir, data=prompts_file, reward_fn="rule_rewards:vowel_fraction", output_dir=str(tmp_path / "g"),
              max_steps=2, rollout_batch_size=4, num_generations=2, mini_batch_size=8, batch_size=8,
              max_new_tokens=8, lr=1e-2, beta=0.0, report_to="none", seed=0, monitor=False)
    kw.update(over)
    grpo.run(grpo.Config(**kw))
    import json

    return [json.loads(x) for x in open(tmp_path / "g" / "metrics.jsonl") if '"reward"' in x]


def test_dynamic_sampling_trains_on_untied_groups_only_and_counts_them(tiny_dir, prompts_file, tmp_path):
    common = dict(reward_fn="rule_rewards:starts_with_vowel", max_steps=3, log_every=1)
    plain = _grpo(tiny_dir, prompts_file, tmp_path / "plain", **common)
    assert sum(r["frac_reward_zero_std"] for r in plain) > 0  # this reward ties groups without the filter
    rows = _grpo(tiny_dir, prompts_file, tmp_path / "dyn", dynamic_sampling=True, dynamic_sampling_max_rounds=8,
                 **common)
    assert sum(r["dynamic_sampling/tied_groups"] for r in rows) > 0
    for r in rows:
        assert r["dynamic_sampling/kept_groups"] + r["dynamic_sampling/missing_groups"] == 4
        if r["dynamic_sampling/kept_tied_groups"] == 0:
            assert r["frac_reward_zero_std"] == 0.0, r  # no tied group reached the update
    assert any(r["dynamic_sampling/kept_tied_groups"] == 0 for r in rows)


def test_mask_truncated_completions_leaves_them_out_of_the_loss(tiny_dir, prompts_file, tmp_path):
    """Every response of 2 tokens is truncated (the tiny model rarely says EOS): masked, nothing trains."""
    from safetensors.torch import load_file

    before = load_file(f"{tiny_dir}/model.safetensors")
    rows = _grpo(tiny_dir, prompts_file, tmp_path, max_new_tokens=2, max_steps=1, mask_truncated_completions=True,
                 max_grad_norm=0.0)
    assert rows[-1]["completions/clipped_ratio"] == 1.0
    after = load_file(str(tmp_path / "g" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert rows[-1]["grad_norm"] == 0.0


def test_overlong_penalty_is_added_to_the_scores(tiny_dir, prompts_file, tmp_path):
    rows = _grpo(tiny_dir, prompts_file, tmp_path, max_new_tokens=4, overlong_buffer=4, overlong_penalty=2.0,
                 max_steps=1)
    # All 4-token responses (truncated) lose the full 2.0; the logged reward is the shaped one.
    assert rows[-1]["overlong/penalty_mean"] == pytest.approx(-2.0 * rows[-1]["completions/clipped_ratio"], abs=0.5)
    assert rows[-1]["overlong/penalty_mean"] < -1.0


@pytest.mark.parametrize("args, message", [
    (["--loss-type", "cispo"], "--loss-type cispo caps the importance ratio at --clip-eps-high"),
    (["--sapo-temperature-neg", "2"], "--sapo-temperature-neg changes nothing with --loss-type dapo"),
    (["--estimator", "rloo", "--scale_rewards", "false"], "--scale-rewards none changes nothing with --estimator rloo"),
    (["--estimator", "dr_grpo"], "invalid choice: 'dr_grpo' (choose from 'grpo', 'rloo', 'reinforce_pp')"),
    (["--delta", "0.9"], "--delta caps the clipped surrogate's ratio and must exceed 1"),
    (["--loss-agg", "token-mean"], "--loss-agg is not a setting of rlhf grpo: GRPO's loss and its normalisation are"),
    (["--estimator", "reinforce_pp", "--loss-type", "vespo"], "--loss-type vespo weighs each sequence"),
])
def test_grpo_family_flags_that_change_nothing_are_one_line(args, message, tiny_dir, prompts_file, tmp_path, capsys):
    from rlhf.cli import main

    code = main(["grpo", "--model", tiny_dir, "--data", prompts_file, "--reward-fn", "rule_rewards:vowel_fraction",
                 "--output-dir", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("args, message", [
    (["--label_smoothing", "0.1"], "changes nothing with --loss-type sigmoid: TRL 1.13's sigmoid ignores it too"),
    (["--loss-type", "ipo", "--label-smoothing", "0.1"], "changes nothing with --loss-type ipo"),
    (["--loss-type", "robust", "--label-smoothing", "0.5"], "in [0, 0.5) for --loss-type robust"),
])
def test_dpo_label_smoothing_where_it_changes_nothing_is_refused(args, message, tiny_dir, tmp_path, capsys):
    from rlhf.cli import main

    code = main(["dpo", "--model", tiny_dir, "--data", "x.jsonl", "--output-dir", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and message in err[0], err


def test_trl_grpo_names_set_the_family(capsys):
    from rlhf.cli import main

    code = main(["grpo", "--model", "m", "--data", "p.jsonl", "--reward-fn", "rule_rewards:vowel_fraction",
                 "--loss_type", "dr_grpo", "--scale_rewards", "false", "--importance_sampling_level", "sequence",
                 "--use_bias_correction_kl", "true", "--mask_truncated_completions", "true", "--print-config"])
    import yaml

    cfg = yaml.safe_load(capsys.readouterr().out)
    assert code == 0
    assert (cfg["loss_type"], cfg["scale_rewards"], cfg["importance_sampling_level"]) == ("dr_grpo", "none", "sequence")
    assert cfg["use_bias_correction_kl"] is True and cfg["mask_truncated_completions"] is True
