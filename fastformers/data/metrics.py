"""SuperGLUE's official metrics, computed as the leaderboard (jiant) computes them.

Every metric is a fraction in [0, 1]. A task's `score` is the mean of its metrics, which is how the
leaderboard folds two-metric tasks (CB, MultiRC, ReCoRD) into one number.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Hashable, Sequence

from sklearn.metrics import f1_score, matthews_corrcoef


def accuracy(golds: Sequence[int], preds: Sequence[int]) -> float:
    if not golds:
        return 0.0
    return sum(int(g == p) for g, p in zip(golds, preds, strict=True)) / len(golds)


def macro_f1(golds: Sequence[int], preds: Sequence[int], num_labels: int) -> float:
    """CB's F1: unweighted mean of the per-class F1 over all classes (sklearn, as jiant does)."""
    return float(f1_score(golds, preds, labels=list(range(num_labels)), average="macro", zero_division=0))


def mcc(golds: Sequence[int], preds: Sequence[int]) -> float:
    """Matthews correlation coefficient (multi-class: Gorodkin's R_K, as sklearn computes it), in [-1, 1]: 0 for
    chance or a constant prediction, 1 for perfect. The one metric here that is not a fraction in [0, 1]."""
    if not golds:
        return 0.0
    return float(matthews_corrcoef(golds, preds))


def multirc_scores(golds: Sequence[int], preds: Sequence[int], questions: Sequence[Hashable]) -> dict:
    """F1a: binary F1 over every answer option; EM: share of questions whose answers are all right."""
    f1a = float(f1_score(golds, preds, average="binary", pos_label=1, zero_division=0))
    all_right: dict[Hashable, bool] = {}
    for gold, pred, question in zip(golds, preds, questions, strict=True):
        all_right[question] = all_right.get(question, True) and gold == pred
    em = sum(all_right.values()) / len(all_right) if all_right else 0.0
    return {"f1a": f1a, "em": em}


def normalize_answer(text: str) -> str:
    """ReCoRD's official normalization: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def record_scores(predictions: Sequence[str], gold_answers: Sequence[Sequence[str]]) -> dict:
    """ReCoRD: per query the max over its gold answers of token F1 and EM, averaged over queries."""
    if not predictions:
        return {"f1": 0.0, "em": 0.0}
    f1 = em = 0.0
    for prediction, golds in zip(predictions, gold_answers, strict=True):
        f1 += max((token_f1(prediction, g) for g in golds), default=0.0)
        em += max((exact_match(prediction, g) for g in golds), default=0.0)
    return {"f1": f1 / len(predictions), "em": em / len(predictions)}


def with_score(metrics: dict) -> dict:
    """Adds `score`, the leaderboard's single number for the task: the mean of its metrics."""
    return {**metrics, "score": sum(metrics.values()) / len(metrics)}
