"""Small data in the official SuperGLUE jsonl shapes, written by the project (labels follow keywords, so a tiny
model can learn them): what the tests and the smoke checks run on where the real files are absent."""

from __future__ import annotations

import json
import random
from pathlib import Path

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
