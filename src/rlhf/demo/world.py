"""A synthetic customer-support world: complaints, responses, and a gold "human labeller".

Seed 002 Part 5: SupportBot-v1 answers a frustrated customer coldly ("Your order is
delayed."); RLHF should make it empathetic and helpful. Everything here is deterministic
given a seed, and needs no download.

Replies are built from a sentence grammar with many wordings per kind of sentence (about
10,000 sentences), so a good reply can be phrased in many ways and aligned text need not
collapse onto one template. The gold labeller :func:`gold_score` stands in for people. It
reads a response sentence by sentence against that grammar and rewards what people value:
acknowledging the customer's feelings, one apology, a concrete next step *for this problem*
and product, a time frame, courtesy. It penalises rudeness, sentences it cannot parse
(garbled or spliced text), naming another product or problem, repeated sentences, extra
apologies and padding, so repeating "sorry" or writing more does not pay. It is used only
to label preference pairs (Bradley-Terry sampling with noise) and to evaluate; training
never sees it.
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
NOUNS = {  # {n}: how a reply names the problem
    "late": ["the delay", "the late delivery", "the wait for your {p}", "the delayed {p}"],
    "broken": ["the broken {p}", "the damaged {p}", "the faulty {p}", "the damage"],
    "wrong": ["the wrong {p}", "the mix-up with your {p}", "the wrong item", "the wrong delivery"],
    "charged": ["the double charge", "the billing error", "the overcharge on your {p}", "the extra charge"],
}
def expand(template: str) -> list[str]:
    """Every sentence a template says: ``[a|b]`` is a or b, ``[a|]`` makes a optional."""
    m = re.search(r"\[([^\[\]]*)\]", template)
    if m is None:
        return [re.sub(r"\s+", " ", template).strip()]
    return [s for alt in m.group(1).split("|") for s in expand(template[: m.start()] + alt + template[m.end() :])]


def _grammar(*templates: str) -> list[str]:
    return [s for t in templates for s in expand(t)]


# The world's sentence grammar. Each kind has many wordings (people do not all talk alike), so
# an aligned bot can be good in many ways; {p} is the product, {x} the problem phrase.
ACTIONS = {
    "late": _grammar(
        "I have [escalated|flagged|chased] your {p} with [the courier|the carrier|our delivery team|the depot].",
        "I have asked [the warehouse|our depot|the shipping team] to [send|ship|dispatch|resend] your {p} "
        "[by express|by priority post|by courier|overnight].",
        "I have [upgraded|moved] the shipping of your {p} [for free|at no cost|to next-day delivery|to priority].",
        "I have [traced|tracked down|located|found] your {p} and booked a new delivery [slot|date|window]."),
    "broken": _grammar(
        "I have arranged a [free|new|brand new|faster] replacement {p}[ for you| today|].",
        "I have started a [full|complete|same-day|priority] refund for your {p}.",
        "I have booked a free repair of your {p}[ with our technician| at our service centre| at home|].",
        "I have [sent|emailed|posted] you a [prepaid|free|return] label to [return|send back] your {p}."),
    "wrong": _grammar(
        "I have [sent|shipped|dispatched] the correct {p} [today|this morning|by express|overnight].",
        "I have booked a free return and [a correct|the right|a new] {p}[ for you|].",
        "I have [swapped|exchanged|replaced] your {p} for the one you ordered.",
        "I have [reserved|set aside|put aside|held] the right {p} for you."),
    "charged": _grammar(
        "I have refunded the [extra|double|second|wrong] charge for your {p}[ in full|].",
        "I have corrected the price of your {p}[ on your account| in our system| on your invoice|].",
        "I have [cancelled|reversed|voided] the [second|duplicate|extra] payment for your {p}.",
        "I have credited the difference for your {p}[ to your card| to your account| as cash|]."),
}
TONES = {
    "calm": ["Hi, my {p} {x}. Could you check?", "Hello, my {p} {x}. What can I do?",
             "My {p} {x}. Can you help me?"],
    "annoyed": ["My {p} {x} again.", "Why is it that my {p} {x}?", "Seriously, my {p} {x}."],
    "angry": ["My {p} {x} again! This is unacceptable.", "My {p} {x}! I am furious.",
              "This is ridiculous, my {p} {x}! Fix it now."],
}
EMPATHY = _grammar(
    "I [understand|can see|know|realise|appreciate|can imagine] how [frustrating|annoying|upsetting|disappointing|"
    "stressful|tiring|irritating] [this|that|all this|it] [is|must be|has been|feels].",
    "[That|This|It] [must be|sounds|is] [really|so|truly|very|deeply] [frustrating|annoying|disappointing|upsetting|"
    "stressful|inconvenient].",
    "I [completely|fully|totally|really] [understand|share|get] your [frustration|disappointment|annoyance|concern|anger].",
    "Your [frustration|concern|anger|disappointment] is [completely|totally|entirely|perfectly] "
    "[understandable|fair|justified|reasonable].",
    "[Dealing with|Having] {n} [is|must be] [really|so|truly] [frustrating|annoying|stressful|upsetting].",
    "I can [see|imagine|understand] why you [are|feel] [upset|annoyed|frustrated|unhappy|let down].",
    "You [deserved|expected|paid for] [better|much better|a better experience|a smoother experience] [from us|than this].")
APOLOGY = _grammar(
    "I am [|so |really |truly |very |deeply |terribly ]sorry about your {p}.",
    "I am [so|really|truly|very|deeply|terribly] sorry [for the trouble|for the hassle|for the wait|for the mess|"
    "this happened|about all this].",
    "Sorry about that.",
    "I am [so|really|truly|very|deeply|terribly] sorry about {n}.",
    "[I|We] [apologise|sincerely apologise|truly apologise] for {n}.",
    "[I|We] [apologise|sincerely apologise|truly apologise|deeply apologise] for [the inconvenience|the trouble|"
    "the mix-up|this experience|the confusion].",
    "Please accept [my|our] [apologies|sincere apologies|deepest apologies|heartfelt apologies][ for this|].")
TIMEFRAME = _grammar(
    "[You will hear from us|You will get an update|Expect an email from me|I will update you|We will confirm it|"
    "You will get a confirmation|I will call you|I will follow up] [within 24 hours|by tomorrow|within two days|"
    "by this evening|by Friday|by Monday|before noon|within the hour|by the weekend].",
    "[It|Everything|All of it] [will be sorted|should be resolved|will be done|will be fixed|should be settled] "
    "[by tomorrow|by Friday|within two days|this week|by Monday|before the weekend].",
    "It should reach you [by Friday|by Monday|tomorrow|within three days|early next week].",
    "Your {p} [will be sorted|will be dealt with|will be taken care of|should be fine again] [by Friday|by Monday|"
    "tomorrow|within two days|this week].")
COURTESY = _grammar(
    "Thank you for your [patience|understanding|message|time|trust].",
    "[Thanks|Thank you|Many thanks] for [telling us|letting us know|reaching out|flagging this|getting in touch].",
    "[Thanks|Thank you] for [telling us|letting us know] about {n}.",
    "Is there anything else I can [do|help with|do for you|look into]?",
    "Please [reply|write back|let me know|get in touch|message me] if you need anything else.",
    "Thank you for being a [loyal|valued|long-time|patient] customer.",
    "[Have a nice day|Have a good day|Take care|All the best|Kind regards].")
CURT = ["Your {p} {x}.", "Please wait.", "Check the website.", "We are looking into it.", "It is being handled.",
        "See our help page."]
CURT_GENERIC = [s for s in CURT if "{" not in s]
RUDE = ["That is not our problem.", "Wait like everyone else.", "Stop complaining.", "Read the terms next time.",
        "Nothing we can do."]
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
    kinds = [("empathy", EMPATHY, None), ("apology", APOLOGY, None), ("timeframe", TIMEFRAME, None),
             ("courtesy", COURTESY, None), ("curt", CURT, None), ("rude", RUDE, None)]
    kinds += [("action", ACTIONS[problem], problem) for problem in PROBLEMS]
    for kind, sentences, action_problem in kinds:
        for s in sentences:
            about = "{x}" in s or "{n}" in s  # names the problem
            for problem in PROBLEMS if about else [action_problem]:
                for x in PROBLEMS[problem] if "{x}" in s else [""]:
                    for n in NOUNS[problem] if "{n}" in s else [""]:
                        names_product = "{p}" in s or "{p}" in n
                        for p in PRODUCTS if names_product else [None]:
                            table[_norm(s.format(p=p, x=x, n=n.format(p=p)))] = (kind, problem, p)
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
        else:  # naming another product or problem than the customer's
            score -= 0.25 * ((product not in (None, complaint.product)) + (problem not in (None, complaint.problem)))
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

    def say(self, sentences: list[str], c: Complaint, problem: str | None = None) -> str:
        """One of ``sentences``, its slots filled for complaint ``c`` (or about another ``problem``)."""
        r, problem = self.rng, problem or c.problem
        return r.choice(sentences).format(p=c.product, x=r.choice(PROBLEMS[problem]),
                                          n=r.choice(NOUNS[problem]).format(p=c.product))

    def splice(self, text: str, c: Complaint) -> str:
        """The same text with one sentence spliced from two the world can say: half of each, which reads as
        nonsense ("I have asked the correct phone by express."), the way a small model garbles."""
        sentences = split_sentences(text)
        i = self.rng.randrange(len(sentences))
        other = self.say(self.rng.choice([EMPATHY, APOLOGY, TIMEFRAME, COURTESY] + list(ACTIONS.values())), c).split()
        head = sentences[i].rstrip(".!?").split()
        cut_a, cut_b = self.rng.randint(1, max(1, len(head) - 1)), self.rng.randint(1, max(1, len(other) - 1))
        sentences[i] = " ".join(head[:cut_a] + other[cut_b:])
        if not sentences[i].endswith((".", "!", "?")):
            sentences[i] += "."
        return " ".join(sentences)

    def response(self, c: Complaint, style: str | None = None) -> str:
        """A response in one of the styles: curt, rude, partial, good, boilerplate, verbose, wrong, or garbled."""
        r, say = self.rng, self.say
        style = style or r.choice(["curt", "curt", "rude", "partial", "partial", "good", "good", "boilerplate", "verbose",
                                   "wrong", "garbled", "garbled"])
        if style == "garbled":
            text = self.response(c, r.choice(["partial", "good"]))
            return self.garble(text) if r.random() < 0.5 else self.splice(text, c)
        action = say(ACTIONS[c.problem], c)
        if style == "curt":
            parts = [say(CURT, c)]
        elif style == "rude":
            parts = [say(CURT, c), say(RUDE, c)]
        elif style == "partial":
            parts = r.choice([[say(APOLOGY, c), say(CURT_GENERIC, c)], [action], [say(EMPATHY, c), say(CURT_GENERIC, c)],
                              [action, say(COURTESY, c)]])
        elif style == "good":
            warm = r.sample([say(EMPATHY, c), say(APOLOGY, c)], 2)  # people open either way
            parts = r.choice([warm + [action, say(TIMEFRAME, c)], [warm[0], action, say(TIMEFRAME, c), warm[1]]])
            if r.random() < 0.5:
                parts.insert(r.choice([0, len(parts)]), say(COURTESY, c))
        elif style == "boilerplate":  # polite, and no help at all
            parts = [say(COURTESY, c), say(CURT_GENERIC, c)] + ([say(TIMEFRAME, c)] if r.random() < 0.5 else [])
            parts.append(say(COURTESY, c))
        elif style == "verbose":  # grovelling and padding
            parts = [say(APOLOGY, c), say(APOLOGY, c), say(EMPATHY, c), "Sorry about that.", say(CURT_GENERIC, c),
                     say(COURTESY, c), say(COURTESY, c)]
        elif style == "wrong":  # helpful, for another problem
            other = r.choice([k for k in PROBLEMS if k != c.problem])
            parts = [say(APOLOGY, c), say(ACTIONS[other], c, other)]
        else:
            raise ValueError(f"unknown style {style!r}")
        return " ".join(parts)

    def sft_demonstration(self, c: Complaint) -> str:
        """Mostly mediocre demonstrations, as from SupportBot-v1: room to improve."""
        return self.response(c, self.rng.choices(["curt", "boilerplate", "verbose", "wrong", "partial", "good"],
                                               weights=[0.1, 0.3, 0.2, 0.1, 0.15, 0.15])[0])

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
