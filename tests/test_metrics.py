"""The official metrics on hand-computed cases."""

import pytest

from fastformers.data import metrics


def test_accuracy_counts_matches():
    assert metrics.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75


def test_macro_f1_is_unweighted_mean_over_all_classes():
    golds, preds = [0, 0, 1, 1, 2], [0, 0, 1, 0, 1]
    # class 0: tp=2 fp=1 fn=0 -> F1 0.8; class 1: tp=1 fp=1 fn=1 -> F1 0.5; class 2: never right -> 0
    assert metrics.macro_f1(golds, preds, 3) == pytest.approx((0.8 + 0.5 + 0.0) / 3)


def test_multirc_f1a_over_all_answers_and_em_per_question():
    golds = [1, 0, 1, 1, 0]
    preds = [1, 0, 0, 1, 0]
    questions = ["q1", "q1", "q1", "q2", "q2"]
    scores = metrics.multirc_scores(golds, preds, questions)
    # positives: tp=2 (idx 0, 3), fn=1 (idx 2), fp=0 -> p=1, r=2/3, F1a=0.8
    assert scores["f1a"] == pytest.approx(0.8)
    # q1 has a wrong answer, q2 is all right -> EM 0.5
    assert scores["em"] == pytest.approx(0.5)


def test_multirc_em_groups_by_question_not_by_position():
    scores = metrics.multirc_scores([1, 1, 0], [1, 0, 0], [("p", 1), ("p", 2), ("p", 1)])
    assert scores["em"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "raw, normal",
    [
        ("The  Eiffel Tower!", "eiffel tower"),
        ("an apple, a pear", "apple pear"),
        ("U.S.", "us"),
        ("Theatre", "theatre"),
        ("  A  ", ""),
    ],
)
def test_record_normalization(raw, normal):
    assert metrics.normalize_answer(raw) == normal


def test_record_token_f1_and_em_take_the_max_over_golds():
    scores = metrics.record_scores(["Barack Obama", "Paris"], [["Obama", "President Obama"], ["London"]])
    # query 1: vs "Obama" p=1/2 r=1 -> 2/3; vs "President Obama" p=1/2 r=1/2 -> 1/2; max 2/3; EM 0
    assert scores["f1"] == pytest.approx((2 / 3 + 0.0) / 2)
    assert scores["em"] == 0.0
    assert metrics.record_scores(["the Obama"], [["Obama"]]) == {"f1": 1.0, "em": 1.0}


def test_token_f1_counts_repeated_tokens_once_per_occurrence():
    assert metrics.token_f1("new new york", "new york") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))


def test_score_is_the_mean_of_the_task_metrics():
    assert metrics.with_score({"accuracy": 0.5, "f1": 0.3})["score"] == pytest.approx(0.4)
