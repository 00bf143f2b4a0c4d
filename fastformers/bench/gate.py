"""The accuracy gate's statistics, as small pure functions. A gated row is held to the float graph twice:
agreement (needs no labels, so it is judged on a large pool: fails when the Clopper-Pearson lower bound of its
disagreement rate exceeds the limit) and the task's score on the labelled units (fails when a paired
randomization test says the row loses with p < alpha). Neither verdict is decided by one or two examples."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta

# score(positions, preds): the task's score of the examples at `positions` (repeats allowed) predicted as `preds`
# (a prediction per example of the whole labelled sample, indexed by position).
ScoreFn = Callable[[Sequence[int], Sequence[int]], float]
EXACT_UP_TO = 10  # differing units up to which the randomization test enumerates all 2^k swaps
MARGIN_CAP = 5  # the margin search stops here: a verdict more than this many flips away prints as ">5"


def cp_lower(d: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson lower bound of a rate seen as d of n: exact, never below the truth more often
    than 1 - confidence."""
    return 0.0 if d == 0 else float(beta.ppf(1 - confidence, d, n - d + 1))


def cp_upper(d: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound of d of n."""
    return 1.0 if d == n else float(beta.ppf(confidence, d + 1, n - d))


def cp_interval(d: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The two-sided Clopper-Pearson interval of d of n (each tail (1 - level) / 2), for the table."""
    one_sided = 1 - (1 - level) / 2
    return cp_lower(d, n, one_sided), cp_upper(d, n, one_sided)


def agreement_fails(d: int, n: int, max_disagreement: float) -> bool:
    """Fails only when the row surely disagrees with the float graph on more than `max_disagreement` (95%)."""
    return cp_lower(d, n) > max_disagreement


def agreement_margin(d: int, n: int, max_disagreement: float) -> int | None:
    """The fewest predictions that, moved to or away from the float graph's, change the agreement verdict
    (None: no number of flips within the pool would)."""
    failed = agreement_fails(d, n, max_disagreement)
    for m in range(1, n + 1):
        moved = d - m if failed else d + m
        if not 0 <= moved <= n:
            return None
        if agreement_fails(moved, n, max_disagreement) != failed:
            return m
    return None


def differing_units(row: Sequence[int], ref: Sequence[int], units: Sequence[Sequence[int]]) -> list[int]:
    """Indices of the units (lists of example positions) where the row predicts anything differently."""
    return [u for u, unit in enumerate(units) if any(row[i] != ref[i] for i in unit)]


def swapped(row: Sequence[int], ref: Sequence[int], units: Sequence[Sequence[int]], chosen) -> tuple[list, list]:
    """The two prediction lists with the `chosen` units' predictions exchanged between row and reference."""
    a, b = list(row), list(ref)
    for u in chosen:
        for i in units[u]:
            a[i], b[i] = b[i], a[i]
    return a, b


def randomization_p(
    score: ScoreFn,
    row: Sequence[int],
    ref: Sequence[int],
    units: Sequence[Sequence[int]],
    draws: int = 2000,
    seed: int = 0,
) -> tuple[float, int]:
    """One-sided p of a loss and k, the units that differ. Under "the row is as good as the float graph" either
    prediction of a unit is as likely the row's, so every swap of differing units is as likely as the observed
    one: p = the share of swaps whose score difference is no larger. Exact over all 2^k swaps when k is small
    (for accuracy this is exact McNemar), else `draws` seeded swaps (p = (1 + hits) / (1 + draws))."""
    every = [i for unit in units for i in unit]
    differing = differing_units(row, ref, units)
    k = len(differing)
    if k == 0:
        return 1.0, 0

    def delta(chosen) -> float:
        a, b = swapped(row, ref, units, chosen)
        return score(every, a) - score(every, b)

    observed = delta(()) + 1e-12  # float sums of the same counts in another order must tie
    if k <= EXACT_UP_TO:
        swaps = itertools.chain.from_iterable(itertools.combinations(differing, r) for r in range(k + 1))
        hits = sum(delta(chosen) <= observed for chosen in swaps)
        return hits / 2**k, k
    rng = random.Random(seed)
    hits = sum(delta([u for u in differing if rng.random() < 0.5]) <= observed for _ in range(draws))
    return (1 + hits) / (1 + draws), k


def bootstrap_delta(
    score: ScoreFn,
    row: Sequence[int],
    ref: Sequence[int],
    units: Sequence[Sequence[int]],
    draws: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """The row's score minus the reference's, and its percentile interval from a paired bootstrap over units
    (both scored on the same resampled units, so the interval reflects only where they differ)."""
    every = [i for unit in units for i in unit]
    observed = score(every, row) - score(every, ref)
    if not differing_units(row, ref, units):
        return observed, observed, observed
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(draws):
        picked = [i for u in rng.integers(0, len(units), len(units)) for i in units[u]]
        deltas.append(score(picked, row) - score(picked, ref))
    lo, hi = np.percentile(deltas, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return observed, float(lo), float(hi)


@dataclass(frozen=True)
class Flip:
    """One example's prediction moved: `toward_fail` says which way it pushes the score test."""

    position: int
    prediction: int
    toward_fail: bool


def score_flips(row: Sequence[int], ref: Sequence[int], golds: Sequence[int], choices: Sequence[int]) -> list[Flip]:
    """Every single-example move that matters to the score test, in four kinds: a new loss (both right, the row
    goes wrong), a lost win (the row right alone: it takes the reference's), a lost loss (the reference right
    alone: the row takes it) and a new win (both wrong alike: the row goes right). `choices`: the number of
    labels or candidates of each example."""
    flips = []
    for i, (r, f, g) in enumerate(zip(row, ref, golds, strict=True)):
        if r == f == g and choices[i] > 1:
            flips.append(Flip(i, (g + 1) % choices[i], True))
        elif r == g != f:
            flips.append(Flip(i, f, True))
        elif f == g != r:
            flips.append(Flip(i, f, False))
        elif r == f != g:
            flips.append(Flip(i, g, False))
    return flips


def score_margin(
    fails: Callable[[Sequence[int]], bool],
    row: Sequence[int],
    ref: Sequence[int],
    golds: Sequence[int],
    choices: Sequence[int],
    cap: int = MARGIN_CAP,
) -> int | None:
    """The fewest moved predictions that change the score verdict (`fails(preds)`), None when more than `cap`.
    Tries every mix of the two kinds that push the right way (for accuracy, examples of a kind are alike, so
    the first ones of each kind stand for all: the search is exact)."""
    failed = fails(row)
    flips = [flip for flip in score_flips(row, ref, golds, choices) if flip.toward_fail != failed]
    kinds = [[f for f in flips if (row[f.position] == ref[f.position]) == first] for first in (True, False)]
    for m in range(1, cap + 1):
        for x in range(m + 1):
            if x > len(kinds[0]) or m - x > len(kinds[1]):
                continue
            moved = list(row)
            for flip in kinds[0][:x] + kinds[1][: m - x]:
                moved[flip.position] = flip.prediction
            if fails(moved) != failed:
                return m
    return None


def margin_label(margin: int | None, cap: int = MARGIN_CAP) -> str:
    """A margin for the table; None or -1 (the stored form of None): beyond the search's cap."""
    return f">{cap}" if margin is None or margin < 0 else str(margin)


@dataclass(frozen=True)
class GateLimits:
    """benchmark.gate's numbers, plain."""

    max_disagreement: float = 0.05
    alpha: float = 0.05
    permutations: int = 2000
    bootstrap: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class Labelled:
    """The labelled sample the score test runs on: golds, choices per example, units and the task's score."""

    golds: Sequence[int]
    choices: Sequence[int]
    units: Sequence[Sequence[int]]
    score: ScoreFn


def judge(
    pool_row: Sequence[int], pool_ref: Sequence[int], row: Sequence[int], ref: Sequence[int], sample: Labelled, limits
) -> dict:
    """Both verdicts of one row against the float graph, and the margin of the whole: for a pass, the fewest
    flips that would fail it; for a failure, the fewest that would clear its failing test(s)."""
    n, d = len(pool_row), int(np.not_equal(pool_row, pool_ref).sum())
    lo, hi = cp_interval(d, n)
    agree_failed = agreement_fails(d, n, limits.max_disagreement)

    def score_fails(preds: Sequence[int]) -> bool:
        p, _ = randomization_p(sample.score, preds, ref, sample.units, limits.permutations, limits.seed)
        return p < limits.alpha

    p, k = randomization_p(sample.score, row, ref, sample.units, limits.permutations, limits.seed)
    delta, delta_lo, delta_hi = bootstrap_delta(sample.score, row, ref, sample.units, limits.bootstrap, limits.seed)
    score_failed = p < limits.alpha
    agree_margin = agreement_margin(d, n, limits.max_disagreement)
    margin_of_score = score_margin(score_fails, row, ref, sample.golds, sample.choices)
    if agree_failed or score_failed:
        margins = [m for m, failed in ((agree_margin, agree_failed), (margin_of_score, score_failed)) if failed]
        margin = None if None in margins else max(m for m in margins if m is not None)
    else:
        margin = min((m for m in (agree_margin, margin_of_score) if m is not None), default=None)
    return {
        "pool_examples": n,
        "pool_disagreements": d,
        "disagreement": d / n,
        "disagreement_lo": lo,
        "disagreement_hi": hi,
        "disagreement_lower_one_sided": cp_lower(d, n),
        "agreement_passed": float(not agree_failed),
        "differing_units": k,
        "score_delta_points": 100 * delta,
        "score_delta_lo_points": 100 * delta_lo,
        "score_delta_hi_points": 100 * delta_hi,
        "score_p": p,
        "score_passed": float(not score_failed),
        "gate_passed": float(not (agree_failed or score_failed)),
        "gate_margin": -1 if margin is None else margin,
    }
