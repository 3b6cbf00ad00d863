"""A synthetic customer-support world: complaints, responses, and a gold "human labeller".

Seed 002 Part 5: SupportBot-v1 answers a frustrated customer coldly ("Your order is
delayed."); RLHF should make it empathetic and helpful. Everything here is deterministic
given a seed, and needs no download.

The gold labeller :func:`gold_score` stands in for people. It reads a response sentence by
sentence against the world's sentence grammar and rewards what people value: acknowledging
the customer's feelings, one apology, a concrete next step *for this problem*, a time frame,
courtesy. It penalises rudeness, sentences it cannot parse (degenerate text), repeated
sentences, extra apologies and padding, so repeating "sorry" or writing more does not pay.
It is used only to label preference pairs (Bradley-Terry sampling with noise) and to
evaluate; training never sees it.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

PRODUCTS = ["order", "package", "headphones", "laptop", "phone", "coffee machine", "shoes", "jacket",
            "blender", "monitor", "keyboard", "camera"]
PROBLEMS = {
    "late": ["is late", "has not arrived", "is delayed"],
    "broken": ["arrived broken", "stopped working", "is damaged"],
    "wrong": ["is the wrong item", "is the wrong size", "is not what I ordered"],
    "charged": ["was charged twice", "cost more than the listed price"],
}
ACTIONS = {
    "late": ["I have escalated your {p} with the courier", "I have asked the warehouse to send your {p} by express",
             "I have upgraded the shipping of your {p} for free", "I have traced your {p} and booked a new delivery slot"],
    "broken": ["I have arranged a free replacement {p}", "I have started a full refund for your {p}",
               "I have booked a free repair of your {p}", "I have sent you a prepaid label to return your {p}"],
    "wrong": ["I have sent the correct {p} today", "I have booked a free return and a correct {p}",
              "I have swapped your {p} for the one you ordered", "I have reserved the right {p} for you"],
    "charged": ["I have refunded the extra charge for your {p}", "I have corrected the price of your {p}",
                "I have cancelled the second payment for your {p}", "I have credited the difference for your {p}"],
}
TONES = {
    "calm": ["Hi, my {p} {x}. Could you check?", "Hello, my {p} {x}. What can I do?",
             "My {p} {x}. Can you help me?"],
    "annoyed": ["My {p} {x} again.", "Why is it that my {p} {x}?", "Seriously, my {p} {x}."],
    "angry": ["My {p} {x} again! This is unacceptable.", "My {p} {x}! I am furious.",
              "This is ridiculous, my {p} {x}! Fix it now."],
}
EMPATHY = ["I understand how frustrating this is.", "I can see why you are upset.", "That must be really annoying.",
           "I know how disappointing this must be.", "I completely understand your frustration.",
           "That is not the experience you deserve."]
APOLOGY = ["I am sorry about your {p}.", "I am so sorry for the trouble.", "Sorry about that.",
           "I apologise for the inconvenience.", "I am really sorry this happened."]
TIMEFRAME = ["You will hear from us within 24 hours.", "It will be sorted by tomorrow.",
             "You will get an update within two days.", "Expect an email from me by this evening.",
             "It should reach you by Friday."]
COURTESY = ["Thank you for your patience.", "Thanks for telling us.", "Is there anything else I can do?",
            "Thank you for being a loyal customer.", "Please reply if you need anything else."]
CURT = ["Your {p} {x}.", "Please wait.", "Check the website.", "We are looking into it."]
RUDE = ["That is not our problem.", "Wait like everyone else.", "Stop complaining.", "Read the terms next time."]
SEED_PROMPT = "My order is late again! This is unacceptable."


@dataclass(frozen=True)
class Complaint:
    product: str
    problem: str
    tone: str
    text: str


def _sentence_table() -> dict[str, tuple[str, str | None, str | None]]:
    """Every sentence the world can say -> (kind, problem, product)."""
    table: dict[str, tuple[str, str | None, str | None]] = {}
    for p in PRODUCTS:
        for problem, phrases in PROBLEMS.items():
            for template in ACTIONS[problem]:
                table[_norm(template.format(p=p) + ".")] = ("action", problem, p)
            for x in phrases:
                table[_norm(CURT[0].format(p=p, x=x))] = ("curt", problem, p)
        table[_norm(APOLOGY[0].format(p=p))] = ("apology", None, p)
    for kind, sentences in (("empathy", EMPATHY), ("apology", APOLOGY[1:]), ("timeframe", TIMEFRAME),
                            ("courtesy", COURTESY), ("curt", CURT[1:]), ("rude", RUDE)):
        for s in sentences:
            table[_norm(s)] = (kind, None, None)
    return table


def _norm(sentence: str) -> str:
    return re.sub(r"\s+", " ", sentence.strip().lower().rstrip(".!?"))


_TABLE = _sentence_table()


def split_sentences(text: str) -> list[str]:
    return [s for s in (x.strip() for x in re.split(r"(?<=[.!?])\s+", text.strip())) if s]


def gold_score(complaint: Complaint, response: str) -> float:
    """The gold labeller's score of ``response`` to ``complaint`` (higher is better)."""
    sentences = split_sentences(response)
    if not sentences:
        return -3.0
    seen, kinds = set(), []
    score = 0.0
    for s in sentences:
        key = _norm(s)
        if key in seen:
            score -= 1.0  # repeating yourself is not empathy
            continue
        seen.add(key)
        kind, problem, product = _TABLE.get(key, ("unparsed", None, None))
        kinds.append(kind)
        if kind == "unparsed":
            score -= 1.0  # degenerate or garbled text
        elif kind == "action":
            score += 1.5 if problem == complaint.problem else -0.5
            score += 0.25 if product == complaint.product else -0.25
        elif kind == "curt":
            score -= 0.25 if product in (None, complaint.product) else 0.5
        elif kind == "rude":
            score -= 2.0
        elif kind == "apology" and product is not None and product != complaint.product:
            score -= 0.25
    weight = {"calm": 0.75, "annoyed": 1.0, "angry": 1.5}[complaint.tone]
    if "empathy" in kinds:
        score += 1.0 * weight
    n_apologies = kinds.count("apology")
    if n_apologies:
        score += 0.5 * weight - 0.75 * (n_apologies - 1)  # one apology is good; more is grovelling
    if "action" in kinds and "timeframe" in kinds:
        score += 0.75  # a time frame only helps with a concrete next step
    if "courtesy" in kinds:
        score += 0.25
    if len(sentences) > 5:
        score -= 0.5 * (len(sentences) - 5)  # padding
    return score


class World:
    """Seeded generator of complaints and of responses of every quality."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def complaint(self) -> Complaint:
        r = self.rng
        p, problem, tone = r.choice(PRODUCTS), r.choice(list(PROBLEMS)), r.choice(list(TONES))
        return Complaint(p, problem, tone, r.choice(TONES[tone]).format(p=p, x=r.choice(PROBLEMS[problem])))

    def garble(self, text: str) -> str:
        """The same text with one or two typos: a dropped, doubled or merged word (people notice)."""
        words = text.split(" ")
        for _ in range(self.rng.choice([1, 2])):
            i = self.rng.randrange(len(words))
            w = words[i]
            kind = self.rng.choice(["drop", "double", "merge"])
            if kind == "drop" and len(w) > 2:
                j = self.rng.randrange(len(w))
                words[i] = w[:j] + w[j + 1 :]
            elif kind == "double" and w:
                j = self.rng.randrange(len(w))
                words[i] = w[:j] + w[j] * 2 + w[j:]
            elif i + 1 < len(words):
                words[i : i + 2] = [w + words[i + 1]]
        return " ".join(words)

    def response(self, c: Complaint, style: str | None = None) -> str:
        """A response in one of the styles: curt, rude, partial, good, verbose, wrong, or garbled."""
        r = self.rng
        style = style or r.choice(["curt", "curt", "rude", "partial", "partial", "good", "good", "verbose", "wrong",
                                   "garbled"])
        if style == "garbled":
            return self.garble(self.response(c, r.choice(["partial", "good"])))
        x = r.choice(PROBLEMS[c.problem])
        action = r.choice(ACTIONS[c.problem]).format(p=c.product) + "."
        if style == "curt":
            parts = [r.choice(CURT).format(p=c.product, x=x)]
        elif style == "rude":
            parts = [r.choice(CURT).format(p=c.product, x=x), r.choice(RUDE)]
        elif style == "partial":
            parts = r.choice([[r.choice(APOLOGY).format(p=c.product), r.choice(CURT[1:])],
                              [action], [r.choice(EMPATHY), r.choice(CURT[1:])], [action, r.choice(COURTESY)]])
        elif style == "good":
            parts = [r.choice(EMPATHY), r.choice(APOLOGY).format(p=c.product), action, r.choice(TIMEFRAME)]
            if r.random() < 0.5:
                parts.append(r.choice(COURTESY))
        elif style == "verbose":
            parts = [r.choice(APOLOGY).format(p=c.product), r.choice(APOLOGY[1:]), r.choice(EMPATHY), "Sorry about that.",
                     r.choice(CURT[1:]), r.choice(COURTESY), r.choice(COURTESY)]
        elif style == "wrong":
            other = r.choice([k for k in PROBLEMS if k != c.problem])
            parts = [r.choice(APOLOGY).format(p=c.product), r.choice(ACTIONS[other]).format(p=c.product) + "."]
        else:
            raise ValueError(f"unknown style {style!r}")
        return " ".join(parts)

    def sft_demonstration(self, c: Complaint) -> str:
        """Mostly mediocre demonstrations, as from SupportBot-v1: room to improve."""
        return self.response(c, self.rng.choices(["curt", "partial", "good"], weights=[0.5, 0.35, 0.15])[0])

    def preference(self, c: Complaint, temperature: float = 1.0) -> tuple[str, str, float]:
        """Two responses, labelled by a noisy human: P(a preferred) = sigmoid((g(a) - g(b)) / T).

        Returns (chosen, rejected, p) where p is the probability the label is right by gold.
        """
        a, b = self.response(c), self.response(c)
        while b == a:
            b = self.response(c)
        ga, gb = gold_score(c, a), gold_score(c, b)
        p_a = 1.0 / (1.0 + math.exp(-(ga - gb) / temperature))
        a_wins = self.rng.random() < p_a
        return (a, b, p_a) if a_wins else (b, a, 1.0 - p_a)


def messages(c: Complaint) -> list[dict]:
    return [{"role": "user", "content": c.text}]


def parse_complaint(text: str) -> Complaint | None:
    """Recover the product, problem and tone of a complaint text (for scoring held-out prompts)."""
    for tone, templates in TONES.items():
        for t in templates:
            for p in PRODUCTS:
                for problem, phrases in PROBLEMS.items():
                    for x in phrases:
                        if t.format(p=p, x=x) == text:
                            return Complaint(p, problem, tone, text)
    return None


def build_datasets(seed: int = 0, n_sft: int = 2000, n_pairs: int = 2000, n_rl: int = 512, n_eval: int = 128,
                   n_pref_eval: int = 400, temperature: float = 1.0) -> dict[str, list[dict]]:
    """All splits, as records in TRL's conversational format. Eval prompts are held out."""
    world = World(seed)
    eval_complaints = {SEED_PROMPT: parse_complaint(SEED_PROMPT)}  # the seed's prompt is always held out
    while len(eval_complaints) < n_eval:
        c = world.complaint()
        eval_complaints.setdefault(c.text, c)
    train_complaints = []
    while len(train_complaints) < max(n_sft, n_pairs, n_rl):
        c = world.complaint()
        if c.text not in eval_complaints:
            train_complaints.append(c)
    sft = [{"prompt": messages(c), "completion": world.sft_demonstration(c)} for c in train_complaints[:n_sft]]
    pairs, pairs_eval, ceiling = [], [], []
    held_out = (list(eval_complaints.values()) * (1 + n_pref_eval // len(eval_complaints)))[:n_pref_eval]
    for i, c in enumerate(train_complaints[:n_pairs] + held_out):
        chosen, rejected, p_right = world.preference(c, temperature)
        row = {"prompt": messages(c), "chosen": chosen, "rejected": rejected}
        if i < n_pairs:
            pairs.append(row)
        else:
            pairs_eval.append(row)
            ceiling.append(max(p_right, 1.0 - p_right))
    rl = [{"prompt": messages(c), "complaint": c.text} for c in train_complaints[:n_rl]]
    evals = [{"prompt": messages(c), "complaint": c.text} for c in eval_complaints.values()]
    return {"sft": sft, "pairs": pairs, "pairs_eval": pairs_eval, "rl": rl, "eval": evals,
            "ceiling": [{"gold_agreement_ceiling": sum(ceiling) / max(len(ceiling), 1)}]}


def corpus(datasets: dict[str, list[dict]]) -> list[str]:
    """All text of the world, for training the tokenizer."""
    texts = []
    for row in datasets["sft"] + datasets["pairs"]:
        texts.append(row["prompt"][0]["content"])
        texts += [row[k] for k in ("completion", "chosen", "rejected") if k in row]
    return texts
