"""Mutated records through the one loading path: every line either loads into well-typed Examples (texts
are strings of valid Unicode, ids are integers, the submission is plain JSON) or is refused with a
FastformersError naming its file and line; never any other exception."""

from __future__ import annotations

import copy
import json
import random
from collections import Counter

import pytest

from fastformers.data import load_examples
from fastformers.errors import FastformersError
from fastformers.tasks import IDX_LIMIT, Example, Task, get_task
from tests.conftest import MAKERS

N = 500  # mutated lines per task
REPLACEMENTS = (
    None,
    [],
    [1, "a"],
    {},
    {"a": [1]},
    0,
    7,
    -3,
    2.5,
    float("inf"),
    float("-inf"),
    float("nan"),
    2**70,
    True,
    False,
    "",
    "text",
    "\ud800",
    "a\udfffb",
    "@placeholder",
)
BAD_BYTES = (0x80, 0xBF, 0xC3, 0xE2, 0xF0, 0xFE, 0xFF)


def _slots(value, path: tuple = ()):
    """The path (keys and list indexes) of every field at any depth."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield path + (key,)
        yield from _slots(child, path + (key,))


def mutate(rng: random.Random, record: dict) -> bytes:
    """One jsonl line: the record with 1-3 fields replaced or deleted (or itself replaced), then sometimes
    cut short or given an invalid UTF-8 byte."""
    mutated = copy.deepcopy(record)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        slots = list(_slots(mutated))
        if not slots or rng.random() < 0.03:
            mutated = copy.deepcopy(rng.choice(REPLACEMENTS))
            break
        *parents, last = rng.choice(slots)
        parent = mutated
        for step in parents:
            parent = parent[step]
        if rng.random() < 0.25:
            del parent[last]
        else:
            parent[last] = copy.deepcopy(rng.choice(REPLACEMENTS))
    line = json.dumps(mutated).encode()  # a surrogate is written as its \ud800 escape, inf as Infinity
    damage = rng.random()
    if damage < 0.1:
        line = line[: rng.randrange(len(line))]
    elif damage < 0.2:
        at = rng.randrange(len(line) + 1)
        line = line[:at] + bytes([rng.choice(BAD_BYTES)]) + line[at:]
    return line


def _assert_well_typed(task: Task, examples: list[Example]) -> None:
    for example in examples:
        assert isinstance(example.uid, str)
        for pair in example.pairs:
            for text in pair:
                assert text is None or isinstance(text, str)
                if text is not None:
                    text.encode("utf-8")  # what the tokenizer does: no lone surrogate gets there
        for key in ("idx", "passage", "question", "answer"):
            if key in example.meta:
                assert type(example.meta[key]) is int and 0 <= example.meta[key] < IDX_LIMIT
        width = task.num_labels if task.labels else len(example.pairs)
        assert example.label is None or example.label in range(width)
        assert all(gold in range(len(example.pairs)) for gold in example.golds)
        for key in ("candidates", "answers"):
            assert all(isinstance(text, str) for text in example.meta.get(key, []))
    json.dumps(task.submit(examples, [0] * len(examples)), allow_nan=False)  # no Infinity in a submission


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
        _assert_well_typed(task, examples)
        outcomes["loaded"] += 1
    assert outcomes["refused"] and outcomes["loaded"], outcomes  # the fuzz reaches both outcomes
