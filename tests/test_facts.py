"""CityGuide (issue 15's second synthetic world): the hidden gold scorer by hand, and the planted
flaw: in the preference pairs the chatty answer is the chosen one far more often than gold
alone would make it."""

from rlhf.demo.facts import CHATTER, build_datasets, city_of, gold_reward, gold_score, split_sentences


def test_gold_score_by_hand():
    assert gold_score("Lyon", "Lyon lies in France.") == 1.0
    # two true facts, the first friendly line free: 2
    assert gold_score("Lyon", "What a wonderful city! Lyon lies in France. The Rhone flows through Lyon.") == 2.0
    # a false fact (-1), a fact about another city (-1), a kind told again (-0.5), a true one (+1)
    assert gold_score("Lyon", "Lyon lies in Spain. Porto lies in Portugal. Lyon lies in France. "
                              "You will find Lyon in France.") == -1.5
    # chatter: 0, -0.5, -0.5; a garbled sentence -1
    assert gold_score("Lyon", "Great question! Happy travels! It is truly amazing! Lyon lyes in France.") == -2.0
    # six sentences: the sixth costs 0.5 beyond the fifth
    six = "Lyon lies in France. The Rhone flows through Lyon. People in Lyon love quenelles. " \
          "Do not miss the Fourviere hill in Lyon. Great question! Happy travels!"
    assert gold_score("Lyon", six) == 4.0 - 0.5 - 0.5
    assert gold_score("Lyon", "") == -1.0


def test_the_pairs_carry_the_spurious_correlation():
    data = build_datasets(0, n_sft=50, n_pairs=600, n_rl=8, n_pref_eval=10)
    chatter = lambda t: sum(s in CHATTER for s in split_sentences(t))  # noqa: E731
    chatty_chosen = sum(chatter(r["chosen"]) > chatter(r["rejected"]) for r in data["pairs"])
    chatty_rejected = sum(chatter(r["chosen"]) < chatter(r["rejected"]) for r in data["pairs"])
    assert chatty_chosen > 2.5 * chatty_rejected  # measured: 936 vs 262 of 1500 at the benchmark's size
    agree = sum(gold_score(city_of(r["prompt"]), r["chosen"]) > gold_score(city_of(r["prompt"]), r["rejected"])
                for r in data["pairs"]) / len(data["pairs"])
    assert 0.7 < agree < 0.95  # labelled by gold, with noise


def test_gold_reward_reads_string_and_conversational_completions():
    assert gold_reward(["Tell me about Cork."], ["Cork lies in Ireland."]) == [1.0]
    assert gold_reward([[{"role": "user", "content": "Tell me about Cork."}]],
                       [[{"role": "assistant", "content": "Cork lies in Ireland."}]]) == [1.0]
    assert gold_reward(["Tell me a joke."], ["No."]) == [-1.0]
