"""Timed passes interleaved: every setting's processes are loaded and warmed first, then each round runs one
timed pass of each setting, then one end-to-end pass of each (tokenizing included), then its latency calls, in
a seeded shuffled order: the leader of a round takes
turns (a seeded order of the settings) and the rest is shuffled anew, so no setting always runs first or always
follows the same neighbour, and a neighbour that slows the machine for a while falls on every setting alike."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

from fastformers.bench.instances import Instances, Served

log = logging.getLogger(__name__)


def round_order(count: int, round_: int, seed: int = 0) -> list[int]:
    """The order of round `round_`: led by the (round_ % count)-th of a seeded order of 0..count-1, the others
    shuffled by a generator seeded with (seed, round_)."""
    if not count:
        return []
    leaders = list(range(count))
    random.Random(seed).shuffle(leaders)
    lead = leaders[round_ % count]
    rest = [i for i in range(count) if i != lead]
    random.Random(f"{seed}:{round_}").shuffle(rest)
    return [lead, *rest]


def measure_interleaved(
    starters: list[Callable[[], Instances]],
    repeats: int,
    on_order: Callable[[list[int]], None] | None = None,
    seed: int = 0,
) -> list[Served]:
    """Starts every setting's instances (load and warm-up, untimed), then `repeats` rounds of one timed pass,
    one end-to-end pass and one set of latency calls each; returns each setting's measurements in the order
    given."""
    pools: list[Instances] = []
    try:
        for start in starters:
            pools.append(start())
        for round_ in range(repeats):
            order = round_order(len(pools), round_, seed)
            if on_order:
                on_order(order)
            for i in order:
                pools[i].timed_pass()
            for i in order:
                pools[i].e2e_pass()
            for i in order:
                pools[i].latency_pass()
        return [pool.close() for pool in pools]
    except BaseException:
        for pool in pools:
            pool.terminate()
        raise
