"""Scores of generated text against references: BLEU, chrF, ROUGE-1/2/L, exact match, token
F1, and accuracy / precision / recall / F1 for classification-style tasks.

    score(["bleu", "rouge"], predictions, references) -> {"bleu": 23.1, "rouge1": 0.41, ...}

Each example has one or more references. Every metric is on the scale its usual source
reports, so numbers compare with published ones and with the library called directly:

    bleu, chrf                sacrebleu, corpus level, 0-100 (BLEU with its default 13a
                              tokenization; a missing reference is None, sacrebleu's way of
                              allowing a different number of references per example)
    rouge1, rouge2, rougeL    rouge-score, F-measure with Porter stemming, the best reference
                              per example (score_multi), averaged over examples, 0-1
    exact_match, token_f1     SQuAD-style: lowercase, no punctuation, no articles, squeezed
                              whitespace; best reference per example, averaged, 0-1
    accuracy, precision,      the prediction's normalized first line against the first
    recall, f1                reference as labels; precision/recall/F1 macro-averaged over the
                              labels seen (gold or predicted), 0 where undefined, 0-1

sacrebleu and rouge-score have no SQuAD-style or label metrics, so those few lines are here.
"""

import collections
import re
import string
from typing import Sequence

# Names a task may ask for; "rouge" and "classification" are shorthands for their group.
GROUPS = {"rouge": ("rouge1", "rouge2", "rougeL"),
          "classification": ("accuracy", "precision", "recall", "f1")}
NAMES = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match", "token_f1", "accuracy",
         "precision", "recall", "f1")


def expand(names: Sequence[str]) -> list[str]:
    """["bleu", "rouge"] -> ["bleu", "rouge1", "rouge2", "rougeL"]; unknown names raise."""
    out: list[str] = []
    for name in names:
        for n in GROUPS.get(name, (name,)):
            if n not in NAMES:
                raise ValueError(f"unknown metric {n!r}; choose from "
                                 f"{', '.join(NAMES + tuple(GROUPS))}")
            if n not in out:
                out.append(n)
    return out


def score(names: Sequence[str], predictions: Sequence[str],
          references: Sequence[Sequence[str]], *, matches: Sequence[bool] | None = None
          ) -> dict[str, float]:
    """Corpus scores of `predictions` (one per example) against `references` (lists).

    `matches` replaces the string comparison of exact_match by a task's own answer check
    (the arithmetic task compares numbers, see eval_tasks).
    """
    names = expand(names)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {}
    out: dict[str, float] = {}
    if "bleu" in names:
        out["bleu"] = bleu(predictions, references)
    if "chrf" in names:
        out["chrf"] = chrf(predictions, references)
    rouge_names = [n for n in names if n.startswith("rouge")]
    if rouge_names:
        out.update(rouge(predictions, references, rouge_names))
    if "exact_match" in names:
        per = matches if matches is not None else [
            exact_match(p, r) for p, r in zip(predictions, references)]
        out["exact_match"] = sum(map(float, per)) / len(per)
    if "token_f1" in names:
        out["token_f1"] = sum(token_f1(p, r) for p, r in zip(predictions, references)) / len(
            predictions)
    label_names = [n for n in names if n in GROUPS["classification"]]
    if label_names:
        labels = classification(predictions, [r[0] for r in references])
        out.update({n: labels[n] for n in label_names})
    return out


# ---------------------------------------------------------------------------------------------
# Library metrics.


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Per-example reference lists -> sacrebleu's streams (stream i = every example's i-th)."""
    most = max(len(r) for r in references)
    return [[r[i] if i < len(r) else None for r in references] for i in range(most)]


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), _reference_streams(references)).score)


def chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(predictions), _reference_streams(references)).score)


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]],
          types: Sequence[str] = GROUPS["rouge"]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    totals = dict.fromkeys(types, 0.0)
    for prediction, refs in zip(predictions, references):
        best = scorer.score_multi(list(refs), prediction)
        for t in types:
            totals[t] += best[t].fmeasure
    return {t: v / len(predictions) for t, v in totals.items()}


# ---------------------------------------------------------------------------------------------
# SQuAD-style answer metrics.

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and English articles, squeeze whitespace (SQuAD v1.1)."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: Sequence[str]) -> bool:
    return any(normalize_answer(prediction) == normalize_answer(r) for r in references)


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """Bag-of-tokens F1 against the best reference."""
    def one(reference: str) -> float:
        pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
        if not pred or not ref:
            return float(pred == ref)  # both empty: a match; one empty: nothing in common
        common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(pred), common / len(ref)
        return 2 * precision * recall / (precision + recall)
    return max(one(r) for r in references)


# ---------------------------------------------------------------------------------------------
# Labels.


def normalize_label(text: str) -> str:
    """A generated label: its first non-empty line, casefolded, without surrounding punctuation."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return first.strip().strip(string.punctuation + " \t").casefold()


def classification(predictions: Sequence[str], gold: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro precision/recall/F1 over every label seen in gold or predictions."""
    pred = [normalize_label(p) for p in predictions]
    true = [normalize_label(g) for g in gold]
    labels = sorted(set(pred) | set(true))
    precisions, recalls, f1s = [], [], []
    for label in labels:
        tp = sum(p == label and t == label for p, t in zip(pred, true))
        predicted, actual = pred.count(label), true.count(label)
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        precisions.append(p)
        recalls.append(r)
        f1s.append(2 * p * r / (p + r) if p + r else 0.0)
    n = len(labels)
    return {"accuracy": sum(p == t for p, t in zip(pred, true)) / len(true),
            "precision": sum(precisions) / n, "recall": sum(recalls) / n, "f1": sum(f1s) / n}
