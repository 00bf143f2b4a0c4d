"""A classification task defined by config on the user's own files (conf/task/text_classification.yaml).

Each row of a .jsonl, .csv, .tsv or .parquet file holds one text (or a text pair) and, in labelled files, a
label; `task.labels` lists the label set in output order, or it is the train file's labels, sorted. The task is
a `tasks.Task` like the SuperGLUE ones, so every stage, the benchmark and serving run it unchanged; its score is
`task.main_metric`, one of accuracy, macro_f1 and mcc. A row the reader cannot use raises a `RecordError` naming
the field, and the data loader adds the file and line (`train.csv:17: field label: ...`).
"""

from __future__ import annotations

import functools
import math
import numbers
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fastformers.data import metrics
from fastformers.data.loading import parse_split, read_records, task_file_error
from fastformers.data.tasks import TASKS, Example, Fields, RecordError, Task, _golds, _shown
from fastformers.errors import FastformersError

METRICS: dict[str, Callable[[Sequence[int], Sequence[int], int], float]] = {
    "accuracy": lambda golds, preds, n: metrics.accuracy(golds, preds),
    "macro_f1": metrics.macro_f1,
    "mcc": lambda golds, preds, n: metrics.mcc(golds, preds),
}
SPLITS = ("train", "val", "test")
SUFFIXES = (".jsonl", ".csv", ".tsv", ".parquet")
SPEC_KEYS = (  # what Task.spec keeps: the task without its files (the served model rebuilds it from these)
    "name",
    "text_field",
    "text_pair_field",
    "label_field",
    "id_field",
    "labels",
    "metrics",
    "main_metric",
    "delimiter",
)


def check(task_cfg: Any) -> dict:
    """The `task` config as a plain dict, every key checked without reading a file."""
    spec = OmegaConf.to_container(task_cfg, resolve=True) if OmegaConf.is_config(task_cfg) else dict(task_cfg)
    assert isinstance(spec, dict)
    name = spec.get("name")
    if not isinstance(name, str) or not name.strip():
        raise FastformersError(f"task.name={name!r} must name your task (run names and prediction files use it)")
    if name in TASKS or name.lower() in {t.name.lower() for t in TASKS.values()}:
        raise FastformersError(f"task.name={name!r} is a SuperGLUE task's name: give your own task another name")
    for key in ("text_field", "label_field"):
        _require_name(spec, key)
    for key in ("text_pair_field", "id_field"):
        if spec.get(key) is not None:
            _require_name(spec, key)
    used = [spec[k] for k in ("text_field", "text_pair_field", "label_field", "id_field") if spec.get(k) is not None]
    if len(set(used)) < len(used):
        raise FastformersError(
            f"task.text_field, text_pair_field, label_field and id_field must name different fields (have {used})"
        )
    chosen = spec.get("metrics")
    if not isinstance(chosen, list) or not chosen or any(m not in METRICS for m in chosen):
        raise FastformersError(f"task.metrics={chosen!r} must list some of {list(METRICS)}")
    if len(set(chosen)) < len(chosen):
        raise FastformersError(f"task.metrics={chosen!r} lists a metric twice")
    if spec.get("main_metric") not in chosen:
        raise FastformersError(
            f"task.main_metric={spec.get('main_metric')!r} must be one of task.metrics {chosen} (it is the `score`)"
        )
    if spec.get("labels") is not None:
        labels = spec["labels"]
        if not isinstance(labels, list) or len(labels) < 2:
            raise FastformersError(
                f"task.labels={labels!r} must list at least two labels (or be null: the train file's)"
            )
        try:
            names = [label_name(label) for label in labels]
        except ValueError as err:
            raise FastformersError(f"task.labels: {err}") from None
        if len(set(names)) < len(names):
            raise FastformersError(f"task.labels={labels!r} lists a label twice")
        spec["labels"] = names
    delimiter = spec.get("delimiter")
    if delimiter is not None and (not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in '"\r\n'):
        raise FastformersError(f"task.delimiter={delimiter!r} must be one character, e.g. ';' (or null: by suffix)")
    files = spec.get("files")
    if not isinstance(files, dict) or set(files) - set(SPLITS):
        raise FastformersError(f"task.files={files!r} must map splits ({', '.join(SPLITS)}) to file names")
    for split, file in files.items():
        if file is None:
            continue
        if not isinstance(file, str) or Path(file).suffix.lower() not in SUFFIXES:
            raise FastformersError(f"task.files.{split}={file!r}: name a file ending in {', '.join(SUFFIXES)}")
    return spec


def _require_name(spec: dict, key: str) -> None:
    value = spec.get(key)
    if not isinstance(value, str) or not value:
        raise FastformersError(f"task.{key}={value!r} must name a column (jsonl: a key) of your files")


def split_files(spec: dict) -> dict[str, Path]:
    """Each configured split's file: `task.files` relative to `task.dir` (absolute names as they are)."""
    folder = Path(spec.get("dir") or ".")
    return {split: folder / file for split, file in spec["files"].items() if file is not None}


def build(spec: dict, with_files: bool = True) -> Task:
    """The task a checked spec defines; the label set is read from the train file when the spec lists none."""
    files = split_files(spec) if with_files else None
    labels, origin = spec.get("labels"), "task.labels"
    if labels is None:
        if files is None:
            raise FastformersError("task.labels is null and there are no files to take them from")
        train_split = parse_split(str(spec.get("train_split", "train")))[0]
        if train_split not in files:
            raise FastformersError(
                f"task.files.{train_split} is not set: the labels come from the train file (or list task.labels)"
            )
        path = files[train_split]
        found = train_labels(path, spec["label_field"], spec.get("delimiter"), f"task.files.{train_split}")
        labels, origin = list(found), f"the train file {path}"
    served = {key: spec.get(key) for key in SPEC_KEYS} | {"labels": list(labels)}
    return Task(
        spec["name"],
        tuple(labels),
        reader(served, origin, id_required=with_files),
        scorer(served),
        submitter(tuple(labels)),
        files=files,
        spec=served,
    )


def label_name(value: Any) -> str:
    """A label as the task names it: text as it is, integers (also 2.0 from a float column) and booleans spelled
    as JSON spells them (1, true); a ValueError for anything else."""
    if (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or (isinstance(value, str) and not value.strip())
    ):
        raise ValueError("empty (every row of a labelled file needs a label; an unlabelled file has no label column)")
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real) and math.isfinite(float(value)) and float(value).is_integer():
        return str(int(float(value)))
    raise ValueError(f"expected a text or integer label, got {_shown(value)}")


def _natural(name: str) -> tuple:
    """Sort key: integer labels by value (2 before 10), others as text."""
    return (0, int(name), "") if re.fullmatch(r"-?\d+", name) else (1, 0, name)


def train_labels(path: Path, field: str, delimiter: str | None, key: str) -> tuple[str, ...]:
    """The distinct labels of a train file, sorted (integers by value); the file is read once per version."""
    if not path.is_file():
        raise task_file_error(path, key)
    stat = path.stat()
    return _train_labels(str(path), stat.st_size, stat.st_mtime_ns, field, delimiter)


@functools.lru_cache(maxsize=16)
def _train_labels(path: str, size: int, mtime: int, field: str, delimiter: str | None) -> tuple[str, ...]:
    found: set[str] = set()
    for where, record in read_records(Path(path), delimiter):
        if field not in record:
            raise FastformersError(
                f"{where}: field {field}: missing (the train file needs a label on every row; "
                f"the row has {_fields(record)})"
            )
        try:
            found.add(label_name(record[field]))
        except ValueError as err:
            raise FastformersError(f"{where}: field {field}: {err}") from None
    if not found:
        raise FastformersError(f"{path}: the train file has no rows")
    if len(found) < 2:
        raise FastformersError(
            f"{path}: the train file has one label ({_shown(next(iter(found)))}): a classifier needs at least two"
        )
    return tuple(sorted(found, key=_natural))


def _fields(record: dict) -> str:
    names = ", ".join(str(key) for key in record)
    return f"fields {names}" if record else "no fields"


def reader(spec: dict, origin: str, id_required: bool = True) -> Callable[[dict], list[Example]]:
    """One row -> one example: its text (pair), its label's index (None when the file has no label column); a
    served request may leave out the id field (`id_required=False`)."""
    labels: tuple[str, ...] = tuple(spec["labels"])
    index = {name: i for i, name in enumerate(labels)}
    text_field, pair_field, label_field, id_field = (
        spec["text_field"],
        spec.get("text_pair_field"),
        spec["label_field"],
        spec.get("id_field"),
    )

    def text(record: dict, key: str) -> str:
        if key not in record:
            raise RecordError(f"field {key}: missing (the row has {_fields(record)})")
        return Fields(record).text(key)

    def read(record: dict) -> list[Example]:
        if not isinstance(record, dict):
            raise RecordError(f"record: expected an object, got {_shown(record)}")
        pair = (text(record, text_field), text(record, pair_field) if pair_field else None)
        label = None
        if label_field in record:
            try:
                name = label_name(record[label_field])
            except ValueError as err:
                raise RecordError(f"field {label_field}: {err}") from None
            if name not in index:
                raise RecordError(
                    f"field {label_field}: {_shown(name)} is not a label of {origin} {_shown(list(labels), 80)}"
                    + ("; list every label in task.labels" if origin != "task.labels" else "")
                )
            label = index[name]
        meta: dict[str, Any] = {}
        uid = ""  # the data loader numbers rows by their line when the task names no id field
        if id_field and (id_required or id_field in record):
            if id_field not in record:
                raise RecordError(f"field {id_field}: missing (the row has {_fields(record)})")
            value = record[id_field]
            if isinstance(value, bool) or not isinstance(value, (str, numbers.Integral)):
                raise RecordError(f"field {id_field}: expected a text or integer id, got {_shown(value)}")
            meta["idx"] = value if isinstance(value, str) else int(value)
            uid = str(value)
        return [Example(uid, [pair], label, meta=meta)]

    return read


def scorer(spec: dict) -> Callable[[Sequence[Example], Sequence[int]], dict]:
    chosen, main, count = list(spec["metrics"]), spec["main_metric"], len(spec["labels"])

    def score(examples: Sequence[Example], preds: Sequence[int]) -> dict:
        golds = _golds(examples)
        values = {name: METRICS[name](golds, list(preds), count) for name in chosen}
        return values | {"score": values[main]}

    return score


def submitter(labels: tuple[str, ...]) -> Callable[[Sequence[Example], Sequence[int]], list[dict]]:
    """Prediction rows: the row's id (`task.id_field`) or its line in the file, and the predicted label's name."""

    def submit(examples: Sequence[Example], preds: Sequence[int]) -> list[dict]:
        rows = []
        for example, pred in zip(examples, preds, strict=True):
            where = {k: example.meta[k] for k in ("idx", "line") if k in example.meta}
            rows.append(where | {"label": labels[pred]})
        return rows

    return submit
