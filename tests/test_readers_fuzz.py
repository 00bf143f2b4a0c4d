"""Mutated records through the one loading path: every line either loads into well-typed Examples (texts
are strings of valid Unicode, ids are integers, the submission is plain JSON) or is refused with a
FastformersError naming its file and line; never any other exception."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest

from fastformers.data.fixtures import MAKERS, ill_typed, mutate
from fastformers.data.loading import load_examples
from fastformers.data.tasks import Example, get_task
from fastformers.errors import FastformersError

N = 500  # mutated lines per task


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_mutated_records_load_well_typed_or_are_refused(tmp_path, name):
    task = get_task(name.lower())
    record = MAKERS[name](random.Random(0), 5, True)
    rng = random.Random(f"fuzz-{name}")
    (tmp_path / name).mkdir()
    data = tmp_path / name / "train.jsonl"
    outcomes: Counter[str] = Counter()
    for _ in range(N):
        line = mutate(rng, record)
        data.write_bytes(line + b"\n")
        try:
            examples = load_examples(task, tmp_path, "train")
        except FastformersError as err:
            message = str(err)
            assert message.startswith(f"{data}:") and "\n" not in message, (line, message)
            outcomes["refused"] += 1
            continue
        except Exception as err:
            pytest.fail(f"{type(err).__name__} ({err}) on line {line!r}")
        assert ill_typed(task, examples) is None, line
        outcomes["loaded"] += 1
    assert outcomes["refused"] and outcomes["loaded"], outcomes  # the fuzz reaches both outcomes


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"pairs": [("\ud800 lone", "b")]}, "no valid Unicode string"),
        ({"label": 3}, "label 3 not in range(3)"),
        ({"meta": {"idx": True}}, "meta idx=True is no id"),
        ({"meta": {"idx": 2**63}}, "is no id in [0, 2**63)"),
    ],
)
def test_the_type_check_of_the_fuzz_names_what_is_ill_typed(change, problem):
    task = get_task("cb")
    good = Example(uid="0", pairs=[("a premise", "a hypothesis")], label=2, meta={"idx": 0})
    assert ill_typed(task, [good]) is None
    assert problem in (ill_typed(task, [replace(good, **change)]) or "")
