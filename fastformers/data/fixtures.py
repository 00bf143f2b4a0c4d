"""Small data in the official SuperGLUE jsonl shapes, written by the project (labels follow keywords, so a tiny
model can learn them): what the tests and the smoke checks run on where the real files are absent. Also what
the tests and scripts/reliability_battery.py share to provoke faults: mutated records and their type check,
and another job holding a stage's build lock."""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fastformers.data.tasks import IDX_LIMIT, Example, Task

NOUNS = ["cat", "river", "teacher", "market", "engine", "garden", "letter", "storm", "village", "doctor"]
ADJS = ["quiet", "old", "busy", "bright", "broken", "famous", "small", "cold", "green", "early"]


def _cb(rng: random.Random, i: int, labelled: bool) -> dict:
    """Label follows a keyword: 'never' -> contradiction, 'perhaps' -> neutral, else entailment."""
    noun, adj = rng.choice(NOUNS), rng.choice(ADJS)
    label = ("entailment", "contradiction", "neutral")[i % 3]
    word = {"entailment": "surely", "contradiction": "never", "neutral": "perhaps"}[label]
    record = {
        "premise": f"The {noun} near the {rng.choice(NOUNS)} was {adj} that day.",
        "hypothesis": f"the {noun} was {word} {adj}",
        "idx": i,
    }
    return record | ({"label": label} if labelled else {})


def _rte(rng, i, labelled):
    record = _cb(rng, i, True)
    label = "not_entailment" if record.pop("label") != "entailment" else "entailment"
    return record | ({"label": label} if labelled else {})


def _boolq(rng, i, labelled):
    noun, adj = rng.choice(NOUNS), rng.choice(ADJS)
    answer = i % 2 == 0
    passage = f"{noun.title()} -- The {noun} is {'' if answer else 'not '}{adj}, as everyone in town knows."
    record = {"question": f"is the {noun} {adj}", "passage": passage, "idx": i}
    return record | ({"label": answer} if labelled else {})


def _wic(rng, i, labelled):
    word = rng.choice(NOUNS)
    s1, s2 = f"A {word} stood there.", f"They saw the {word} {'again' if i % 2 else 'elsewhere'}."
    record = {
        "word": word,
        "sentence1": s1,
        "sentence2": s2,
        "idx": i,
        "version": 1.1,
        "start1": 2,
        "end1": 2 + len(word),
        "start2": 13,
        "end2": 13 + len(word),
    }
    return record | ({"label": bool(i % 2)} if labelled else {})


def _copa(rng, i, labelled):
    noun = rng.choice(NOUNS)
    question = ("cause", "effect")[i % 2]
    right, wrong = f"The {noun} got wet.", f"The {noun} sang loudly."
    label = i % 3 % 2
    choices = (right, wrong) if label == 0 else (wrong, right)
    record = {
        "premise": "It rained all day.",
        "choice1": choices[0],
        "choice2": choices[1],
        "question": question,
        "idx": i,
    }
    return record | ({"label": label} if labelled else {})


def _multirc(rng, i, labelled):
    questions = []
    for q in range(2):
        answers = []
        for a in range(3):
            answer = {
                "text": f"The {rng.choice(NOUNS)} is {'right' if a == q else 'wrong'}.",
                "idx": 10 * i + 3 * q + a,
            }
            answers.append(answer | ({"label": int(a == q)} if labelled else {}))
        questions.append({"question": f"What is question {q}?", "answers": answers, "idx": 2 * i + q})
    return {
        "idx": i,
        "version": 1.1,
        "passage": {"text": f"Passage {i} about the {rng.choice(NOUNS)}.", "questions": questions},
    }


def _record(rng, i, labelled):
    text = "Alice met Bob in Paris. Bob then flew to Rome with Alice."
    entities = [
        {"start": 0, "end": 4},
        {"start": 10, "end": 12},
        {"start": 17, "end": 21},
        {"start": 24, "end": 26},
        {"start": 41, "end": 44},
    ]
    qas = [
        {
            "query": "@placeholder flew to Rome.",
            "idx": i,
            **({"answers": [{"start": 24, "end": 26, "text": "Bob"}]} if labelled else {}),
        }
    ]
    return {"source": "fixture", "passage": {"text": text, "entities": entities}, "qas": qas, "idx": i}


MAKERS = {"CB": _cb, "RTE": _rte, "BoolQ": _boolq, "WiC": _wic, "COPA": _copa, "MultiRC": _multirc, "ReCoRD": _record}
SIZES = {"train": 48, "val": 18, "test": 9}


def write_superglue(root: Path) -> Path:
    rng = random.Random(0)
    for task, make in MAKERS.items():
        (root / task).mkdir(parents=True, exist_ok=True)
        for split, size in SIZES.items():
            rows = [make(rng, i, split != "test") for i in range(size)]
            (root / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def write_diagnostics(root: Path, size: int = 12) -> Path:
    """AX-b and AX-g in their official shapes (labelled, as released): RTE's model answers both."""
    rng = random.Random(1)
    axb, axg = [], []
    for i in range(size):
        rte = _rte(rng, i, True)
        axb.append({"sentence1": rte["premise"], "sentence2": rte["hypothesis"], "label": rte["label"], "idx": i,
                    "logic": "Negation" if "never" in rte["hypothesis"] else ""})  # fmt: skip
        pronoun = ("he", "she")[i % 2]
        axg.append({"premise": f"The {rng.choice(NOUNS)} said {pronoun} was {rng.choice(ADJS)}.",
                    "hypothesis": f"the speaker was {rng.choice(ADJS)}", "idx": i, "pair_id": i // 2,
                    "label": rte["label"]})  # fmt: skip
    for name, rows in (("AX-b", axb), ("AX-g", axg)):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


# ------------------------------------------------------------------------------------- mutated records (fuzzing)

REPLACEMENTS: tuple[Any, ...] = (
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


def _slots(value: Any, path: tuple = ()) -> Iterator[tuple]:
    """The path (keys and list indexes) of every field at any depth."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield path + (key,)
        yield from _slots(child, path + (key,))


def mutate(rng: random.Random, record: dict) -> bytes:
    """One jsonl line: the record with 1-3 fields replaced or deleted (or itself replaced), then sometimes
    cut short or given an invalid UTF-8 byte."""
    mutated: Any = copy.deepcopy(record)
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


def ill_typed(task: Task, examples: Sequence[Example]) -> str | None:
    """The first way loaded examples break what the tokenizer, the metrics and the submission rely on (texts of
    valid Unicode, integer ids in range, labels and golds in range, a plain-JSON submission), or None."""
    for example in examples:
        problem = _ill_typed_example(task, example)
        if problem:
            return f"{example.uid!r}: {problem}"
    try:
        json.dumps(task.submit(list(examples), [0] * len(examples)), allow_nan=False)
    except ValueError as err:
        return f"the submission is not plain JSON ({err})"
    return None


def _ill_typed_example(task: Task, example: Example) -> str | None:
    if not isinstance(example.uid, str):
        return f"uid {example.uid!r} is no string"
    for pair in example.pairs:
        for text in pair:
            if text is not None and not (isinstance(text, str) and _encodes(text)):
                return f"text {text!r} is no valid Unicode string"
    for key in ("idx", "passage", "question", "answer"):
        value = example.meta.get(key, 0)
        if type(value) is not int or not 0 <= value < IDX_LIMIT:
            return f"meta {key}={value!r} is no id in [0, 2**63)"
    width = task.num_labels if task.labels else len(example.pairs)
    if example.label is not None and example.label not in range(width):
        return f"label {example.label!r} not in range({width})"
    if any(gold not in range(len(example.pairs)) for gold in example.golds):
        return f"golds {example.golds!r} not all among the {len(example.pairs)} candidates"
    for key in ("candidates", "answers"):
        if not all(isinstance(text, str) for text in example.meta.get(key, [])):
            return f"meta {key} holds a non-string"
    return None


def _encodes(text: str) -> bool:
    """What the tokenizer needs: no lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
