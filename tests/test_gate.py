"""The accuracy gate's statistics (fastformers/bench/gate.py): known values, and the properties that make a verdict
hold: a flip toward the float graph or the truth never turns a pass into a failure, a handful of differing units
can never fail the score test, and the printed margin is the true distance to the other verdict."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from fastformers.bench import gate
from fastformers.data import metrics


def accuracy(golds):
    def score(positions, preds):
        return sum(preds[i] == golds[i] for i in positions) / max(len(positions), 1)

    return score


def cb_score(golds):
    """CB's score: the mean of accuracy and macro-F1 over 3 classes (the task's own metric functions)."""

    def score(positions, preds):
        g, p = [golds[i] for i in positions], [preds[i] for i in positions]
        return metrics.with_score({"accuracy": metrics.accuracy(g, p), "f1": metrics.macro_f1(g, p, 3)})["score"]

    return score


def mcc_score(golds):
    def score(positions, preds):
        return metrics.mcc([golds[i] for i in positions], [preds[i] for i in positions])

    return score


SCORES = {"accuracy": accuracy, "cb": cb_score, "mcc": mcc_score}


def singles(n):
    return [[i] for i in range(n)]


@pytest.mark.parametrize(
    ("d", "n", "lower", "upper"),
    [
        (0, 30, 0.0, 1 - 0.025 ** (1 / 30)),  # none seen: the two-sided upper bound is 1 - (alpha/2)^(1/n)
        (30, 30, 0.025 ** (1 / 30), 1.0),
        (5, 10, 0.1871, 0.8129),  # the textbook interval of 5 of 10
    ],
)
def test_clopper_pearson_interval_matches_known_values(d, n, lower, upper):
    lo, hi = gate.cp_interval(d, n)
    assert lo == pytest.approx(lower, abs=1e-4) and hi == pytest.approx(upper, abs=1e-4)


@pytest.mark.parametrize(("d", "n"), [(2, 56), (11, 306), (40, 1000)])
def test_clopper_pearson_bounds_put_exactly_the_tail_mass_beyond_the_count(d, n):
    """By definition: at the lower bound, seeing d or more has probability 0.05; at the upper, d or fewer."""

    def tail_at_least(k, rate):
        return sum(math.comb(n, j) * rate**j * (1 - rate) ** (n - j) for j in range(k, n + 1))

    assert tail_at_least(d, gate.cp_lower(d, n)) == pytest.approx(0.05, abs=1e-6)
    assert 1 - tail_at_least(d + 1, gate.cp_upper(d, n)) == pytest.approx(0.05, abs=1e-6)


def test_one_sided_lower_bound_of_an_all_success_sample_is_the_rule_of_three_value():
    assert gate.cp_lower(10, 10) == pytest.approx(0.05 ** (1 / 10), abs=1e-9)
    assert gate.cp_lower(0, 100) == 0.0


def test_the_cb_row_of_the_issue_passes_agreement_and_its_score_test():
    """2 of 56 predictions moved, accuracy kept, macro-F1 down by a neutral example: no evidence of a loss."""
    assert not gate.agreement_fails(2, 56, 0.05)
    golds = [0] * 23 + [1] * 28 + [2] * 5
    ref = list(golds[:45]) + [1] * 6 + [0, 2, 2, 0, 1]  # some mistakes of its own
    row = list(ref)
    row[51], row[10] = 1, 2  # one neutral lost, one entailment moved
    p, k = gate.randomization_p(cb_score(golds), row, ref, singles(56))
    assert k == 2 and p >= 0.25


def test_a_clear_loss_fails_the_score_test_and_is_exact_mcnemar_for_accuracy():
    golds = [0] * 40
    ref = list(golds)
    row = [1] * 7 + golds[7:]  # 7 losses, no wins: exact McNemar p = 1/2^7
    p, k = gate.randomization_p(accuracy(golds), row, ref, singles(40))
    assert k == 7 and p == pytest.approx(1 / 128)


def test_many_differing_units_use_seeded_draws_with_a_valid_p():
    golds = [0] * 60
    row = [1] * 12 + [0] * 48
    p1, k = gate.randomization_p(accuracy(golds), row, golds, singles(60), draws=500, seed=3)
    p2, _ = gate.randomization_p(accuracy(golds), row, golds, singles(60), draws=500, seed=3)
    assert k == 12 and p1 == p2 and 1 / 501 <= p1 < 0.01


def random_case(rng, n, classes, k_max):
    golds = [rng.randrange(classes) for _ in range(n)]
    ref = [g if rng.random() < 0.7 else rng.randrange(classes) for g in golds]
    row = list(ref)
    for i in rng.sample(range(n), rng.randint(0, k_max)):
        row[i] = rng.choice([c for c in range(classes) if c != ref[i]])
    return golds, ref, row


@pytest.mark.parametrize("metric", sorted(SCORES))
def test_four_or_fewer_differing_units_never_fail_at_alpha_005(metric):
    rng = random.Random(metric)
    for _ in range(40):
        golds, ref, row = random_case(rng, 20, 3, 4)
        p, k = gate.randomization_p(SCORES[metric](golds), row, ref, singles(20))
        assert k <= 4 and p >= 0.0625  # the observed swap is one of at most 16


def test_even_an_arbitrary_score_function_cannot_fail_four_differing_units():
    rng = random.Random(1)
    _, ref, row = random_case(rng, 12, 2, 4)
    table = {}

    def arbitrary(positions, preds):
        return table.setdefault(tuple(preds[i] for i in positions), rng.random())

    p, _ = gate.randomization_p(arbitrary, row, ref, singles(12))
    assert p >= 0.0625


@pytest.mark.parametrize("metric", ["accuracy", "cb"])
def test_a_flip_toward_the_truth_never_turns_a_score_pass_into_a_failure(metric):
    rng = random.Random(metric)
    checked = 0
    for _ in range(12):
        golds, ref, row = random_case(rng, 10, 3 if metric == "cb" else 2, 6)
        score = SCORES[metric](golds)
        p, _ = gate.randomization_p(score, row, ref, singles(10))
        for i in (i for i in range(10) if row[i] != golds[i]):
            moved = list(row)
            moved[i] = golds[i]
            p_moved, _ = gate.randomization_p(score, moved, ref, singles(10))
            assert p_moved >= p - 1e-12
            checked += 1
    assert checked > 20


def test_a_flip_toward_the_float_graph_never_turns_an_agreement_pass_into_a_failure():
    for n in (30, 300, 1000):
        for d in range(1, n // 5):
            if not gate.agreement_fails(d, n, 0.05):
                assert not gate.agreement_fails(d - 1, n, 0.05)


def test_a_flip_toward_both_the_float_graph_and_the_truth_never_fails_a_passing_row():
    rng = random.Random(7)
    limits = gate.GateLimits(bootstrap=10)
    for _ in range(30):
        golds, ref, row = random_case(rng, 12, 2, 7)
        sample = gate.Labelled(golds, [2] * 12, singles(12), accuracy(golds))
        verdict = gate.judge(row, ref, row, ref, sample, limits)
        for i in (i for i in range(12) if row[i] != ref[i] and ref[i] == golds[i]):
            moved = list(row)
            moved[i] = ref[i]
            if verdict["gate_passed"]:
                assert gate.judge(moved, ref, moved, ref, sample, limits)["gate_passed"]


def brute_force_margin(fails, row, choices, cap):
    """The fewest examples whose predictions, set to any other value, change `fails`."""
    failed = fails(row)
    for m in range(1, cap + 1):
        for positions in itertools.combinations(range(len(row)), m):
            for values in itertools.product(*[[c for c in range(choices) if c != row[i]] for i in positions]):
                moved = list(row)
                for i, v in zip(positions, values):
                    moved[i] = v
                if fails(moved) != failed:
                    return m
    return None


def test_the_score_margin_is_the_fewest_flips_that_change_the_verdict():
    rng = random.Random(11)
    seen = set()
    for _ in range(12):
        golds, ref, row = random_case(rng, 9, 2, 9)
        score = accuracy(golds)

        def fails(preds, score=score, ref=ref):
            return gate.randomization_p(score, preds, ref, singles(9))[0] < 0.05

        margin = gate.score_margin(fails, row, ref, golds, [2] * 9, cap=3)
        assert margin == brute_force_margin(fails, row, 2, 3)
        seen.add((fails(row), margin))
    assert {failed for failed, _ in seen} == {True, False}  # both directions were checked


def test_the_agreement_margin_is_the_fewest_flips_that_change_the_verdict():
    for n, d in [(56, 2), (300, 25), (300, 10), (1000, 80)]:
        margin = gate.agreement_margin(d, n, 0.05)
        failed = gate.agreement_fails(d, n, 0.05)
        step = -1 if failed else 1
        assert margin is not None
        assert all(gate.agreement_fails(d + step * m, n, 0.05) == failed for m in range(margin))
        assert gate.agreement_fails(d + step * margin, n, 0.05) != failed


def test_the_bootstrap_interval_holds_the_observed_delta_and_is_zero_width_without_differences():
    golds = [0, 1] * 20
    ref = list(golds)
    row = [1 - g if i < 4 else g for i, g in enumerate(golds)]
    delta, lo, hi = gate.bootstrap_delta(accuracy(golds), row, ref, singles(40), draws=300, seed=0)
    assert delta == pytest.approx(-0.1) and lo <= delta <= hi <= 0
    assert gate.bootstrap_delta(accuracy(golds), ref, ref, singles(40)) == (0.0, 0.0, 0.0)


def test_units_swap_together_so_a_question_counts_once():
    golds = [1, 1, 0, 0, 1, 1]
    units = [[0, 1], [2, 3], [4, 5]]
    row = [0, 0, 0, 0, 1, 1]
    _, k = gate.randomization_p(accuracy(golds), row, golds, units)
    assert k == 1
