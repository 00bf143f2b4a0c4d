"""The seven SuperGLUE tasks in one registry: how a jsonl record becomes model inputs, and how
predictions become official metrics and leaderboard submission lines.

Two shapes cover all seven tasks:
- classification: one text pair per example, one of `labels` predicted (BoolQ, CB, RTE, WiC, and
  MultiRC, whose every answer option is one binary example grouped by question);
- candidate scoring (`labels is None`): one text pair per candidate, the model gives each a score and
  the highest wins (COPA's two choices, ReCoRD's entities filling `@placeholder`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastformers import metrics
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
    """A record the reader cannot use; the data loader adds the file and line."""


@dataclass(frozen=True)
class Task:
    name: str  # official name: folder and submission file name
    labels: tuple[Any, ...] | None  # label values as written in the jsonl; None for candidate scoring
    read: Callable[[dict], list[Example]]  # one jsonl record -> its examples
    score: Callable[[Sequence[Example], Sequence[int]], dict]  # official metrics + `score`
    submit: Callable[[Sequence[Example], Sequence[int]], list[dict]]  # leaderboard jsonl lines

    @property
    def num_labels(self) -> int:
        """Outputs of the classification head: one per class, or one score per candidate."""
        return len(self.labels) if self.labels else 1


def _field(record: dict, name: str) -> Any:
    if name not in record:
        raise RecordError(f"missing field {name!r}")
    return record[name]


def _label_index(record: dict, labels: tuple[Any, ...]) -> int | None:
    if "label" not in record:
        return None  # test files are unlabelled
    value = record["label"]
    if value not in labels:
        raise RecordError(f"label {value!r} is not one of {list(labels)}")
    return labels.index(value)


def _pair_reader(first: str, second: str, labels: tuple[Any, ...]) -> Callable[[dict], list[Example]]:
    def read(record: dict) -> list[Example]:
        pair = (str(_field(record, first)), str(_field(record, second)))
        idx = _field(record, "idx")
        return [Example(str(idx), [pair], _label_index(record, labels), meta={"idx": idx})]

    return read


def _mark_span(sentence: str, start: int, end: int) -> str:
    """Puts the target word between asterisks so the model sees which occurrence is meant."""
    if not 0 <= start < end <= len(sentence):
        raise RecordError(f"word span {start}:{end} lies outside its sentence")
    return f"{sentence[:start]}*{sentence[start:end]}*{sentence[end:]}"


WIC_LABELS = (False, True)


def read_wic(record: dict) -> list[Example]:
    first = _mark_span(_field(record, "sentence1"), _field(record, "start1"), _field(record, "end1"))
    second = _mark_span(_field(record, "sentence2"), _field(record, "start2"), _field(record, "end2"))
    idx = _field(record, "idx")
    return [Example(str(idx), [(first, second)], _label_index(record, WIC_LABELS), meta={"idx": idx})]


def read_copa(record: dict) -> list[Example]:
    """Each choice is scored after the premise joined by the connective its question asks for."""
    question = _field(record, "question")
    if question not in ("cause", "effect"):
        raise RecordError(f"question {question!r} is not 'cause' or 'effect'")
    connective = "because" if question == "cause" else "so"
    premise = _field(record, "premise")
    pairs = []
    for key in ("choice1", "choice2"):
        choice = _field(record, key)
        pairs.append((premise, f"{connective} {choice[:1].lower()}{choice[1:]}"))
    label = _label_index(record, (0, 1))
    golds = () if label is None else (label,)
    idx = _field(record, "idx")
    return [Example(str(idx), pairs, label, golds, meta={"idx": idx})]


def read_multirc(record: dict) -> list[Example]:
    """One binary example per answer option; its question id groups them for EM and submission."""
    passage = _field(record, "passage")
    text = _field(passage, "text")
    p_idx = _field(record, "idx")
    examples = []
    for question in _field(passage, "questions"):
        q_idx = _field(question, "idx")
        for answer in _field(question, "answers"):
            a_idx = _field(answer, "idx")
            pair = (text, f"{_field(question, 'question')} {_field(answer, 'text')}")
            meta = {"passage": p_idx, "question": q_idx, "answer": a_idx}
            examples.append(Example(f"{p_idx}-{q_idx}-{a_idx}", [pair], _label_index(answer, (0, 1)), meta=meta))
    return examples


def read_record(record: dict) -> list[Example]:
    """One example per query; candidates are the passage's distinct entities (end index inclusive)."""
    passage = _field(record, "passage")
    text = _field(passage, "text")
    candidates: list[str] = []
    for entity in _field(passage, "entities"):
        name = text[_field(entity, "start") : _field(entity, "end") + 1]
        if name not in candidates:
            candidates.append(name)
    if not candidates:
        raise RecordError("passage has no entities to choose from")
    examples = []
    for qa in _field(record, "qas"):
        query = _field(qa, "query")
        if "@placeholder" not in query:
            raise RecordError("query has no @placeholder")
        answers = [a["text"] for a in qa.get("answers", [])]
        golds = tuple(i for i, c in enumerate(candidates) if c in answers)
        pairs = [(text, query.replace("@placeholder", c)) for c in candidates]
        label = golds[0] if golds else None
        meta = {"idx": _field(qa, "idx"), "candidates": candidates, "answers": answers}
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
    "boolq": Task("BoolQ", BOOL_LABELS, _pair_reader("question", "passage", BOOL_LABELS), _accuracy,
                  _submit_labels(BOOL_LABELS)),
    "cb": Task("CB", CB_LABELS, _pair_reader("premise", "hypothesis", CB_LABELS), _cb_scores,
               _submit_labels(CB_LABELS)),
    "copa": Task("COPA", None, read_copa, _accuracy, _submit_labels((0, 1))),
    "multirc": Task("MultiRC", (0, 1), read_multirc, _multirc_scores, _submit_multirc),
    "record": Task("ReCoRD", None, read_record, _record_scores, _submit_record),
    "rte": Task("RTE", RTE_LABELS, _pair_reader("premise", "hypothesis", RTE_LABELS), _accuracy,
                _submit_labels(RTE_LABELS)),
    "wic": Task("WiC", WIC_LABELS, read_wic, _accuracy, _submit_labels(WIC_LABELS)),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise FastformersError(f"task.name={name!r} is not a SuperGLUE task; choose one of {sorted(TASKS)}")
    return TASKS[name]
