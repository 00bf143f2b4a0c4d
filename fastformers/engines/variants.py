"""int8 variants as data: each engine's yaml names its int8 recipes (`engines.<engine>.int8.<name>`), each a
precision of that engine, and says on which CPUs it is worth trying (`when: {vnni: false}`). Without VNNI the
u8s8 `vpmaddubsw` path saturates its 16-bit sums, so those CPUs need 7-bit weights, U8U8 or NNCF's overflow
fix tried as rows; with VNNI the project's own recipe and the stock one suffice."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastformers.errors import FastformersError

VARIANTS_BUILT_BY = "int8"  # the run precision whose export builds every declared variant
FEATURES = ("vnni",)  # what a variant's `when` may name
SELECTIONS = ("needed", "all")  # benchmark.search.variants: the variants this CPU needs, or every one declared


@dataclass(frozen=True)
class Variant:
    """What every engine's int8 variant has: its name (a precision), the CPUs it is tried on, whether it is the
    stock recipe the pick is held to."""

    name: str
    when: tuple[tuple[str, bool], ...] = ()
    stock: bool = False
    settings: Mapping[str, Any] = field(default_factory=dict, compare=False)  # the engine's own recipe fields

    def applies(self, features: Mapping[str, bool]) -> bool:
        return all(features.get(key) == wanted for key, wanted in self.when)


def parse_when(when: Any, field_name: str) -> tuple[tuple[str, bool], ...]:
    """`{vnni: false}` as sorted pairs; an unknown feature or a non-boolean value is refused."""
    if not when:
        return ()
    if not isinstance(when, Mapping):
        raise FastformersError(f"{field_name}.when={when!r} must map CPU features to true/false, e.g. {{vnni: false}}")
    pairs = []
    for key, value in when.items():
        if key not in FEATURES or not isinstance(value, bool):
            raise FastformersError(
                f"{field_name}.when: {key}={value!r}: a variant's condition names a CPU feature of {list(FEATURES)} "
                "with true or false"
            )
        pairs.append((str(key), value))
    return tuple(sorted(pairs))


def parse_variants(spec: Mapping | None, field_name: str, known: tuple[str, ...]) -> dict[str, Variant]:
    """An engine's `int8` block as variants; `known` = the recipe fields the engine takes. Exactly one is
    `stock: true`: the reference recipe the pick must measurably beat."""
    variants = {}
    for name, given in (spec or {}).items():
        where = f"{field_name}.{name}"
        body = dict(given or {})
        if not str(name).startswith("int8"):
            raise FastformersError(f"{where}: a variant's name starts with int8 (it is a precision, e.g. int8_rr)")
        unknown = sorted(set(body) - set(known) - {"when", "stock"})
        if unknown:
            raise FastformersError(f"{where}: unknown key {unknown[0]!r}; a variant takes {sorted(known)}, when, stock")
        when = parse_when(body.pop("when", None), where)
        stock = bool(body.pop("stock", False))
        variants[str(name)] = Variant(str(name), when, stock, body)
    if variants and sum(v.stock for v in variants.values()) != 1:
        raise FastformersError(f"{field_name}: exactly one variant must be stock: true (the reference recipe)")
    return variants


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags the kernel reports for this CPU (Linux /proc/cpuinfo); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def int8_features(flags: frozenset[str] | None = None) -> dict[str, bool]:
    """What decides which int8 recipes this CPU needs: VNNI (AVX512-VNNI or AVX-VNNI, or AMX) multiplies u8 by s8
    into 32-bit sums without the 16-bit saturation of `vpmaddubsw`."""
    flags = cpu_flags() if flags is None else flags
    return {"vnni": bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})}


def selected(variants: Mapping[str, Variant], selection: str, features: Mapping[str, bool]) -> list[str]:
    """The variants to time: those whose condition this CPU meets (`needed`), or all (`all`)."""
    if selection not in SELECTIONS:
        raise FastformersError(f"benchmark.search.variants={selection!r} must be one of {list(SELECTIONS)}")
    return [name for name, v in variants.items() if selection == "all" or v.applies(features)]
