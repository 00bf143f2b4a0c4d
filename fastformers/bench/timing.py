"""Timed passes interleaved round-robin: every setting's processes are loaded first, then round r runs one
pass of each setting in an order rotated by r, so a neighbour that slows the machine for a while, or a warm
cache that favours whoever runs second, falls on every setting alike."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastformers.instances import Instances, Served

log = logging.getLogger(__name__)


def rotated(count: int, round_: int) -> list[int]:
    """0..count-1 starting at round_ % count: each setting leads one round in turn."""
    start = round_ % count if count else 0
    return list(range(start, count)) + list(range(start))


def measure_interleaved(
    starters: list[Callable[[], Instances]], repeats: int, on_order: Callable[[list[int]], None] | None = None
) -> list[Served]:
    """Starts every setting's instances (load and warm-up, untimed), then `repeats` rounds of one timed pass
    each, then one round of latency calls; returns each setting's measurements in the order given."""
    pools: list[Instances] = []
    try:
        for start in starters:
            pools.append(start())
        for round_ in range(repeats):
            order = rotated(len(pools), round_)
            if on_order:
                on_order(order)
            for i in order:
                pools[i].timed_pass()
        for i in rotated(len(pools), repeats):
            pools[i].latency_pass()
        return [pool.close() for pool in pools]
    except BaseException:
        for pool in pools:
            pool.terminate()
        raise
