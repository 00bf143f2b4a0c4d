"""The seven SuperGLUE tasks in one registry: how a jsonl record becomes model inputs, and how
predictions become official metrics and leaderboard submission lines.

Two shapes cover all seven tasks:
- classification: one text pair per example, one of `labels` predicted (BoolQ, CB, RTE, WiC, and
  MultiRC, whose every answer option is one binary example grouped by question);
- candidate scoring (`labels is None`): one text pair per candidate, the model gives each a score and
  the highest wins (COPA's two choices, ReCoRD's entities filling `@placeholder`).

A task can also come from config: `task.files` names the user's own files (fastformers/data/text_classification.py);
`task_config.task_of(cfg)` gives the run's task either way.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastformers.data import metrics
from fastformers.errors import FastformersError


@dataclass
class Example:
    """One unit the metric counts: a classification item, or a question with its candidates."""

    uid: str
    pairs: list[tuple[str, str | None]]  # one (first, second) text pair per row the model scores
    label: int | None = None  # class index, or index of the gold candidate (None when unlabelled)
    golds: tuple[int, ...] = ()  # candidate tasks: every candidate that matches a gold answer
    meta: dict[str, Any] = field(default_factory=dict)  # official ids, for grouping and submission
    teacher_scores: list[float] | None = None  # distillation: the teacher's scores, computed once


class RecordError(ValueError):
    """A record the reader cannot use, as `field <path>: what is wrong`; the data loader adds the file and line."""


@dataclass(frozen=True)
class Task:
    name: str  # official name: folder and submission file name
    labels: tuple[Any, ...] | None  # label values as written in the jsonl; None for candidate scoring
    read: Callable[[dict], list[Example]]  # one jsonl record -> its examples
    score: Callable[[Sequence[Example], Sequence[int]], dict]  # official metrics + `score`
    submit: Callable[[Sequence[Example], Sequence[int]], list[dict]]  # leaderboard jsonl lines
    # A task from config only (None for SuperGLUE's, whose files are data.root/<name>/<split>.jsonl):
    files: dict[str, Path] | None = field(default=None, hash=False)  # each split's file
    spec: dict[str, Any] | None = field(default=None, hash=False)  # the definition, labels resolved (serving)

    @property
    def num_labels(self) -> int:
        """Outputs of the classification head: one per class, or one score per candidate."""
        return len(self.labels) if self.labels else 1


IDX_LIMIT = 2**63  # ids and offsets are non-negative and fit a signed 64-bit integer (submission files, tensors)


def _shown(value: Any, width: int = 40) -> str:
    """A value as the jsonl spells it (null, true, [1], "text", Infinity), cut short for a one-line message."""
    try:
        text = json.dumps(value, default=repr)
    except (ValueError, RecursionError):  # a structure nested too deep to spell
        text = type(value).__name__
    return text if len(text) <= width else f"{text[: width - 3]}..."


class Fields:
    """One JSON object of a record, read field by field against the task's official schema.

    Every reader takes its fields through these accessors, so a wrong type, a missing field, an id out of
    range or a string that is not valid Unicode raises one RecordError naming the field's path
    (`passage.questions[0].answers[2].label`), and nothing is ever coerced.
    """

    def __init__(self, value: Any, path: str = ""):
        if not isinstance(value, dict):
            raise RecordError(f"{f'field {path}' if path else 'record'}: expected an object, got {_shown(value)}")
        self.value, self.path = value, path

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, what: str) -> RecordError:
        return RecordError(f"field {self.name(key)}: {what}")

    def has(self, key: str) -> bool:
        return key in self.value

    def get(self, key: str) -> Any:
        if key not in self.value:
            raise self.error(key, "missing")
        return self.value[key]

    def text(self, key: str) -> str:
        """A string (empty allowed) of valid Unicode: a lone surrogate (a `\\ud800` escape) is refused."""
        value = self.get(key)
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_shown(value)}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            bad = ascii(value[err.start])[1:-1]
            raise self.error(key, f"not valid Unicode (lone surrogate {bad} at character {err.start + 1})") from None
        return str(value)

    def integer(self, key: str) -> int:
        """An integer (not a boolean, not 3.0) with 0 <= value < 2**63."""
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise self.error(key, f"expected an integer, got {_shown(value)}")
        number = int(value)  # a numpy integer from a served DataFrame becomes a plain int
        if not 0 <= number < IDX_LIMIT:
            raise self.error(key, f"{_shown(number)} is out of range (0 <= {key} < 2**63)")
        return number

    def label(self, key: str, labels: tuple[Any, ...]) -> int | None:
        """Index of the label in `labels` (type and value must match: `1` is no `true`); None when absent."""
        if key not in self.value:
            return None  # test files are unlabelled
        value = self.value[key]
        for index, option in enumerate(labels):
            if type(value) is type(option) and value == option:
                return index
        raise self.error(key, f"{_shown(value)} is not one of {_shown(list(labels), 80)}")

    def obj(self, key: str) -> Fields:
        return Fields(self.get(key), self.name(key))

    def objects(self, key: str) -> list[Fields]:
        value = self.get(key)
        if not isinstance(value, list):
            raise self.error(key, f"expected a list, got {_shown(value)}")
        return [Fields(item, f"{self.name(key)}[{i}]") for i, item in enumerate(value)]


def _pair_reader(first: str, second: str, labels: tuple[Any, ...]) -> Callable[[dict], list[Example]]:
    def read(record: dict) -> list[Example]:
        fields = Fields(record)
        pair = (fields.text(first), fields.text(second))
        idx = fields.integer("idx")
        return [Example(str(idx), [pair], fields.label("label", labels), meta={"idx": idx})]

    return read


def _marked(fields: Fields, number: int) -> str:
    """sentence<number> with its target word between asterisks, so the model sees which occurrence is meant."""
    sentence = fields.text(f"sentence{number}")
    start, end = fields.integer(f"start{number}"), fields.integer(f"end{number}")
    if not start < end <= len(sentence):
        raise fields.error(
            f"end{number}", f"word span {start}:{end} lies outside sentence{number} ({len(sentence)} characters)"
        )
    return f"{sentence[:start]}*{sentence[start:end]}*{sentence[end:]}"


WIC_LABELS = (False, True)


def read_wic(record: dict) -> list[Example]:
    fields = Fields(record)
    first, second = _marked(fields, 1), _marked(fields, 2)
    idx = fields.integer("idx")
    return [Example(str(idx), [(first, second)], fields.label("label", WIC_LABELS), meta={"idx": idx})]


def read_copa(record: dict) -> list[Example]:
    """Each choice is scored after the premise joined by the connective its question asks for."""
    fields = Fields(record)
    question = fields.text("question")
    if question not in ("cause", "effect"):
        raise fields.error("question", f'{_shown(question)} is not "cause" or "effect"')
    connective = "because" if question == "cause" else "so"
    premise = fields.text("premise")
    pairs: list[tuple[str, str | None]] = []
    for key in ("choice1", "choice2"):
        choice = fields.text(key)
        pairs.append((premise, f"{connective} {choice[:1].lower()}{choice[1:]}"))
    label = fields.label("label", (0, 1))
    golds = () if label is None else (label,)
    idx = fields.integer("idx")
    return [Example(str(idx), pairs, label, golds, meta={"idx": idx})]


def read_multirc(record: dict) -> list[Example]:
    """One binary example per answer option; its question id groups them for EM and submission."""
    fields = Fields(record)
    p_idx = fields.integer("idx")
    passage = fields.obj("passage")
    text = passage.text("text")
    examples = []
    for question in passage.objects("questions"):
        q_idx, asked = question.integer("idx"), question.text("question")
        for answer in question.objects("answers"):
            a_idx = answer.integer("idx")
            pair = (text, f"{asked} {answer.text('text')}")
            meta = {"passage": p_idx, "question": q_idx, "answer": a_idx}
            examples.append(Example(f"{p_idx}-{q_idx}-{a_idx}", [pair], answer.label("label", (0, 1)), meta=meta))
    return examples


def _span(fields: Fields, text: str) -> str:
    """The passage text an entity or answer covers (`end` inclusive), which must lie inside the passage."""
    start, end = fields.integer("start"), fields.integer("end")
    if not start <= end < len(text):
        raise fields.error("end", f"span {start}..{end} lies outside the passage text ({len(text)} characters)")
    return text[start : end + 1]


def read_record(record: dict) -> list[Example]:
    """One example per query; candidates are the passage's distinct entities (end index inclusive)."""
    fields = Fields(record)
    passage = fields.obj("passage")
    text = passage.text("text")
    candidates: list[str] = []
    for entity in passage.objects("entities"):
        name = _span(entity, text)
        if name not in candidates:
            candidates.append(name)
    if not candidates:
        raise passage.error("entities", "no entities to choose from")
    examples = []
    for qa in fields.objects("qas"):
        query = qa.text("query")
        if "@placeholder" not in query:
            raise qa.error("query", "has no @placeholder")
        answers = []
        for answer in qa.objects("answers") if qa.has("answers") else []:
            _span(answer, text)
            answers.append(answer.text("text"))
        golds = tuple(i for i, c in enumerate(candidates) if c in answers)
        pairs: list[tuple[str, str | None]] = [(text, query.replace("@placeholder", c)) for c in candidates]
        label = golds[0] if golds else None
        meta = {"idx": qa.integer("idx"), "candidates": candidates, "answers": answers}
        examples.append(Example(str(meta["idx"]), pairs, label, golds, meta=meta))
    return examples


def _golds(examples: Sequence[Example]) -> list[int]:
    if any(e.label is None for e in examples):
        raise FastformersError("metrics need labels, and this split has unlabelled examples (a test split?)")
    return [e.label for e in examples]  # type: ignore[misc]


def _accuracy(examples: Sequence[Example], preds: Sequence[int]) -> dict:
    return metrics.with_score({"accuracy": metrics.accuracy(_golds(examples), preds)})


def _cb_scores(examples: Sequence[Example], preds: Sequence[int]) -> dict:
    golds = _golds(examples)
    return metrics.with_score({"accuracy": metrics.accuracy(golds, preds), "f1": metrics.macro_f1(golds, preds, 3)})


def _multirc_scores(examples: Sequence[Example], preds: Sequence[int]) -> dict:
    questions = [(e.meta["passage"], e.meta["question"]) for e in examples]
    return metrics.with_score(metrics.multirc_scores(_golds(examples), preds, questions))


def _record_scores(examples: Sequence[Example], preds: Sequence[int]) -> dict:
    """ReCoRD counts every query, also those whose gold answer is no candidate (they score 0)."""
    texts = [e.meta["candidates"][p] for e, p in zip(examples, preds, strict=True)]
    return metrics.with_score(metrics.record_scores(texts, [e.meta["answers"] for e in examples]))


def _submit_labels(labels: tuple[Any, ...]) -> Callable[[Sequence[Example], Sequence[int]], list[dict]]:
    def submit(examples: Sequence[Example], preds: Sequence[int]) -> list[dict]:
        out = []
        for example, pred in zip(examples, preds, strict=True):
            label = labels[pred]
            out.append({"idx": example.meta["idx"], "label": str(label).lower() if isinstance(label, bool) else label})
        return out

    return submit


def _submit_multirc(examples: Sequence[Example], preds: Sequence[int]) -> list[dict]:
    """The leaderboard's nested shape: one line per passage, its questions, their answers."""
    passages: dict[Any, dict[Any, list[dict]]] = {}
    for example, pred in zip(examples, preds, strict=True):
        questions = passages.setdefault(example.meta["passage"], {})
        questions.setdefault(example.meta["question"], []).append({"idx": example.meta["answer"], "label": int(pred)})
    return [
        {"idx": p, "passage": {"questions": [{"idx": q, "answers": answers} for q, answers in questions.items()]}}
        for p, questions in passages.items()
    ]


def _submit_record(examples: Sequence[Example], preds: Sequence[int]) -> list[dict]:
    return [{"idx": e.meta["idx"], "label": e.meta["candidates"][p]} for e, p in zip(examples, preds, strict=True)]


BOOL_LABELS = (False, True)
CB_LABELS = ("entailment", "contradiction", "neutral")
RTE_LABELS = ("entailment", "not_entailment")

TASKS: dict[str, Task] = {
    "boolq": Task(
        "BoolQ", BOOL_LABELS, _pair_reader("question", "passage", BOOL_LABELS), _accuracy, _submit_labels(BOOL_LABELS)
    ),
    "cb": Task(
        "CB", CB_LABELS, _pair_reader("premise", "hypothesis", CB_LABELS), _cb_scores, _submit_labels(CB_LABELS)
    ),
    "copa": Task("COPA", None, read_copa, _accuracy, _submit_labels((0, 1))),
    "multirc": Task("MultiRC", (0, 1), read_multirc, _multirc_scores, _submit_multirc),
    "record": Task("ReCoRD", None, read_record, _record_scores, _submit_record),
    "rte": Task(
        "RTE", RTE_LABELS, _pair_reader("premise", "hypothesis", RTE_LABELS), _accuracy, _submit_labels(RTE_LABELS)
    ),
    "wic": Task("WiC", WIC_LABELS, read_wic, _accuracy, _submit_labels(WIC_LABELS)),
}


def _axb_scores(examples: Sequence[Example], preds: Sequence[int]) -> dict:
    """AX-b, the broad-coverage diagnostic: the leaderboard reports Matthews correlation (R3)."""
    return metrics.with_score({"mcc": metrics.mcc(_golds(examples), preds)})


def _axg_scores(examples: Sequence[Example], preds: Sequence[int]) -> dict:
    """AX-g, Winogender: accuracy, and gender parity (the share of pairs, differing only in the pronoun's gender,
    that get the same prediction)."""
    by_pair: dict[Any, set[int]] = {}
    for example, pred in zip(examples, preds, strict=True):
        by_pair.setdefault(example.meta["pair_id"], set()).add(pred)
    parity = sum(len(predicted) == 1 for predicted in by_pair.values()) / max(len(by_pair), 1)
    return metrics.with_score({"accuracy": metrics.accuracy(_golds(examples), preds), "gender_parity": parity})


def read_axg(record: dict) -> list[Example]:
    (example,) = _pair_reader("premise", "hypothesis", RTE_LABELS)(record)
    example.meta["pair_id"] = Fields(record).integer("pair_id")
    return [example]


# The diagnostics the leaderboard asks of a task's model (<root>/<name>/<name>.jsonl, labelled): RTE's predicts both.
DIAGNOSTICS: dict[str, tuple[Task, ...]] = {
    "RTE": (
        Task("AX-b", RTE_LABELS, _pair_reader("sentence1", "sentence2", RTE_LABELS), _axb_scores,
             _submit_labels(RTE_LABELS)),
        Task("AX-g", RTE_LABELS, read_axg, _axg_scores, _submit_labels(RTE_LABELS)),
    )
}  # fmt: skip
LEADERBOARD_FILES = [*(t.name for t in TASKS.values()), *(d.name for ds in DIAGNOSTICS.values() for d in ds)]


def get_task(name: str) -> Task:
    """A SuperGLUE task by name (a task on your own files comes from its config: `task_config.task_of`)."""
    if name not in TASKS:
        raise FastformersError(
            f"task.name={name!r} is not a SuperGLUE task; choose one of {sorted(TASKS)}, "
            "or task=text_classification for your own files"
        )
    return TASKS[name]
