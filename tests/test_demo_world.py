"""The SupportBot world: deterministic data, and a gold labeller that people would agree with."""

from rlhf.demo.world import SEED_PROMPT, Complaint, World, build_datasets, gold_score, parse_complaint

ANGRY = Complaint("order", "late", "angry", SEED_PROMPT)

GOOD = ("I understand how frustrating this is. I am sorry about your order. I have escalated your order with the "
        "courier. You will hear from us within 24 hours.")


def test_gold_ranks_good_replies_above_bad_ones():
    ranked = [
        GOOD,
        "I am sorry about your order. I have escalated your order with the courier.",  # helpful, less warm
        "I understand how frustrating this is. Please wait.",                           # warm, no help
        "Your order is delayed.",                                                       # SupportBot-v1
        "Your order is delayed. Stop complaining.",                                     # rude
    ]
    scores = [gold_score(ANGRY, r) for r in ranked]
    assert scores == sorted(scores, reverse=True), scores


def test_gold_is_not_fooled_by_repeated_sorry_or_length():
    sorry = " ".join(["I am so sorry for the trouble."] * 6)
    assert gold_score(ANGRY, sorry) < gold_score(ANGRY, "Your order is delayed.")
    many_apologies = "I am sorry about your order. I am so sorry for the trouble. Sorry about that."
    assert gold_score(ANGRY, many_apologies) < gold_score(ANGRY, "I am sorry about your order.")
    padded = GOOD + " Thank you for your patience. Thanks for telling us. Is there anything else I can do?"
    assert gold_score(ANGRY, padded) < gold_score(ANGRY, GOOD)
    stuffed = "sorry order courier escalated frustrating 24 hours"  # keywords, not sentences
    assert gold_score(ANGRY, stuffed) < 0


def test_gold_wants_the_action_for_this_problem_and_product():
    right = gold_score(ANGRY, "I have escalated your order with the courier.")
    wrong_problem = gold_score(ANGRY, "I have arranged a free replacement order.")
    wrong_product = gold_score(ANGRY, "I have escalated your laptop with the courier.")
    assert right > wrong_product and right > wrong_problem


def test_world_is_deterministic_and_eval_prompts_are_held_out():
    a, b = build_datasets(seed=3), build_datasets(seed=3)
    assert a == b and build_datasets(seed=4)["sft"] != a["sft"]
    eval_texts = {r["complaint"] for r in a["eval"]}
    assert SEED_PROMPT in eval_texts
    assert not eval_texts & {r["prompt"][0]["content"] for r in a["sft"] + a["pairs"] + a["rl"]}
    assert 0.5 < a["ceiling"][0]["gold_agreement_ceiling"] < 1.0
    assert parse_complaint(SEED_PROMPT) == ANGRY


def test_sft_demonstrations_are_mostly_mediocre():
    w = World(0)
    complaints = [w.complaint() for _ in range(400)]
    demo = [gold_score(c, w.sft_demonstration(c)) for c in complaints]
    best = [gold_score(c, w.response(c, "good")) for c in complaints]
    assert sum(demo) / len(demo) < 0.5 * sum(best) / len(best)


def test_grammar_expands_alternatives_and_options():
    from rlhf.demo.world import expand

    assert expand("I [know|see] it[ well|].") == ["I know it well.", "I know it.", "I see it well.", "I see it."]


def test_gold_wants_the_problem_named_right_and_rejects_spliced_sentences():
    right = gold_score(ANGRY, "I am so sorry about the late delivery.")
    wrong = gold_score(ANGRY, "I am so sorry about the double charge.")
    assert right > wrong
    w = World(0)
    # Half of one sentence, half of another: mostly nonsense, and people notice (by chance it can
    # make another sentence of the world, which then scores as that sentence).
    scores = [gold_score(ANGRY, w.splice(GOOD, ANGRY)) for _ in range(40)]
    assert max(scores) <= gold_score(ANGRY, GOOD) and sum(s < gold_score(ANGRY, GOOD) - 0.5 for s in scores) >= 30
