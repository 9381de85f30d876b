"""Generation metrics: each one equals its library called directly on the same predictions."""

import pytest
import sacrebleu
from rouge_score import rouge_scorer
from sklearn import metrics as sk

from t5x_like.evaluation import eval_metrics

PREDICTIONS = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over a lazy dog",
    "Die Katze saß auf der Matte.",
    "running runners ran",
    "",
]
REFERENCES = [
    ["The cat sat on the mat.", "A cat was sitting on the mat."],
    ["The quick brown fox jumped over the lazy dog."],
    ["Die Katze sitzt auf der Matte.", "Eine Katze saß auf einer Matte.", "Auf der Matte saß die Katze."],
    ["The runner runs."],
    ["Nothing was said."],
]


def test_bleu_and_chrf_equal_sacrebleu_with_a_varying_number_of_references():
    got = eval_metrics.score(["bleu", "chrf"], PREDICTIONS, REFERENCES)
    # sacrebleu's own way of giving 1 to 3 references per sentence: streams padded with None.
    streams = [[refs[i] if i < len(refs) else None for refs in REFERENCES] for i in range(3)]
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, streams).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, streams).score)
    assert 0 < got["bleu"] < 100 and 0 < got["chrf"] < 100
    # One reference each: the plain single-stream call.
    single = [[r[0]] for r in REFERENCES]
    assert eval_metrics.bleu(PREDICTIONS, single) == pytest.approx(
        sacrebleu.corpus_bleu(PREDICTIONS, [[r[0] for r in REFERENCES]]).score)


def test_rouge_equals_rouge_score_with_stemming_best_reference_averaged():
    got = eval_metrics.score(["rouge"], PREDICTIONS, REFERENCES)
    assert set(got) == {"rouge1", "rouge2", "rougeL"}
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in got:
        direct = [scorer.score_multi(refs, pred)[key].fmeasure
                  for pred, refs in zip(PREDICTIONS, REFERENCES)]
        assert got[key] == pytest.approx(sum(direct) / len(direct))
    # Stemming is on: "running runners ran" shares "run" with "The runner runs."
    assert scorer.score_multi(REFERENCES[3], PREDICTIONS[3])["rouge1"].fmeasure > 0
    only_l = eval_metrics.score(["rougeL"], PREDICTIONS, REFERENCES)
    assert only_l == {"rougeL": got["rougeL"]}


def test_exact_match_and_token_f1_by_hand():
    # SQuAD normalization: case, punctuation and articles do not matter.
    assert eval_metrics.exact_match("The Cat sat on the mat", ["the cat sat on a mat."])
    assert not eval_metrics.exact_match("cat sat", ["the cat sat on the mat"])
    # pred tokens: cat sat (2); ref: cat sat on mat (4); common 2 -> P=1, R=0.5, F1=2/3.
    assert eval_metrics.token_f1("the cat sat", ["the cat sat on the mat"]) == pytest.approx(2 / 3)
    # The best reference counts: "mat" alone matches the second reference exactly.
    assert eval_metrics.token_f1("mat", ["a dog", "the mat"]) == 1.0
    # Repeated tokens count as many times as both sides have them: min(3, 1) = 1 common.
    assert eval_metrics.token_f1("go go go", ["go stop"]) == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5))
    assert eval_metrics.token_f1("", ["the"]) == 1.0  # both empty after normalization
    assert eval_metrics.token_f1("", ["cat"]) == 0.0
    got = eval_metrics.score(["exact_match", "token_f1"], ["cat", "dog"], [["the cat"], ["cat"]])
    assert got == {"exact_match": 0.5, "token_f1": 0.5}
    # A task's own answer check replaces the string comparison.
    assert eval_metrics.score(["exact_match"], ["x", "y"], [["1"], ["2"]],
                              matches=[True, False]) == {"exact_match": 0.5}


def test_classification_equals_scikit_learn_macro_averages():
    gold = ["positive", "negative", "neutral", "positive", "negative", "positive", "neutral"]
    predictions = ["Positive.", "negative", "positive\nbecause it is nice", "positive",
                   "  Neutral ", "joy", "neutral"]
    got = eval_metrics.score(["classification"], predictions, [[g] for g in gold])
    normalized = [eval_metrics.normalize_label(p) for p in predictions]
    assert normalized == ["positive", "negative", "positive", "positive", "neutral", "joy",
                          "neutral"]
    labels = sorted(set(normalized) | set(gold))
    p, r, f, _ = sk.precision_recall_fscore_support(gold, normalized, labels=labels,
                                                    average="macro", zero_division=0)
    assert got["accuracy"] == pytest.approx(sk.accuracy_score(gold, normalized))
    assert got["precision"] == pytest.approx(p)
    assert got["recall"] == pytest.approx(r)
    assert got["f1"] == pytest.approx(f)


def test_unknown_metric_names_are_refused():
    assert eval_metrics.expand(["bleu", "rouge", "rouge1"]) == ["bleu", "rouge1", "rouge2", "rougeL"]
    with pytest.raises(ValueError, match="unknown metric 'blue'"):
        eval_metrics.expand(["blue"])
