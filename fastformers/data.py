"""Reading the official SuperGLUE jsonl files and turning them into dynamically padded batches."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
import urllib.request
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from fastformers.errors import FastformersError
from fastformers.tasks import Example, RecordError, Task

log = logging.getLogger(__name__)

OFFICIAL_URL = "https://dl.fbaipublicfiles.com/glue/superglue/data/v2/{name}.zip"
SPLIT_SPEC = re.compile(r"^(train|val|test)(?:\[(\d*)%?:(\d*)%?\])?$")


def parse_split(spec: str) -> tuple[str, float, float]:
    """'val' -> whole file; 'val[:60%]' / 'val[60%:]' -> a seeded share of its records."""
    match = SPLIT_SPEC.match(spec.replace(" ", ""))
    if not match:
        raise FastformersError(f"split {spec!r} is not train, val, test or a share such as 'val[:60%]'")
    name, lo, hi = match.groups()
    lo_frac = int(lo) / 100 if lo else 0.0
    hi_frac = int(hi) / 100 if hi else 1.0
    if not 0 <= lo_frac < hi_frac <= 1:
        raise FastformersError(f"split {spec!r} selects nothing: shares must satisfy 0 <= start < end <= 100")
    return name, lo_frac, hi_frac


def split_label(spec: str) -> str:
    """A metric-name-safe label: 'val' stays 'val', 'val[60%:]' becomes 'val_60-100pct'."""
    name, lo, hi = parse_split(spec)
    return name if (lo, hi) == (0.0, 1.0) else f"{name}_{round(lo * 100)}-{round(hi * 100)}pct"


def task_file(root: str | Path, task: Task, split: str, download: bool = False) -> Path:
    path = Path(root) / task.name / f"{split}.jsonl"
    if not path.exists() and download:
        fetch_official(task, Path(root))
    if path.exists() and not path.is_file():
        what = "a directory" if path.is_dir() else "not a regular file"
        raise FastformersError(f"{path.resolve()} is {what}, not a data file")
    if not path.is_file():
        hint = (
            "" if download else " (set data.download=true to fetch the official archive, or data.root / $SUPERGLUE_DIR)"
        )
        raise FastformersError(f"missing data file {path.resolve()}{hint}")
    return path


def fetch_official(task: Task, root: Path, timeout: float = 30.0) -> None:
    """Downloads and unpacks the official SuperGLUE archive of one task into `root/<Task>/`."""
    url = OFFICIAL_URL.format(name=task.name)
    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            archive = zipfile.ZipFile(io.BytesIO(response.read()))
    except OSError as err:
        raise FastformersError(f"could not download {url} ({err}); put the files under {root.resolve()}") from err
    for member in archive.namelist():
        if member.endswith(".jsonl"):
            target = root / task.name / Path(member).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(member))


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of every non-blank line; a line that is not UTF-8, not JSON or not an object
    is refused as `file:line: what is wrong (where in the line)`."""
    records = []
    try:
        with path.open("rb") as lines:
            for number, raw in enumerate(lines, start=1):
                record = _parse_line(path, number, raw)
                if record is not None:
                    records.append((number, record))
    except OSError as err:
        raise FastformersError(f"cannot read {path}: {err.strerror or err}") from err
    return records


def _parse_line(path: Path, number: int, raw: bytes) -> dict | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        column = len(raw[: err.start].decode("utf-8")) + 1  # in characters, like JSON's columns
        raise FastformersError(
            f"{path}:{number}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {column})"
        ) from None
    line = line.rstrip("\r\n")  # parsed alone, so JSON's own line is 1 and its column is the line's column
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise FastformersError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
    except ValueError:  # json's only other refusal: an integer of more digits than Python converts
        raise FastformersError(f"{path}:{number}: not valid JSON (a number too long to read)") from None
    except RecursionError:
        raise FastformersError(f"{path}:{number}: not valid JSON (nested too deeply)") from None
    if not isinstance(record, dict):
        raise FastformersError(f"{path}:{number}: expected a JSON object, got {_kind(record)}")
    return record


def _kind(value: object) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def load_examples(
    task: Task, root: str | Path, spec: str, split_seed: int = 0, download: bool = False
) -> list[Example]:
    """Examples of a split spec, in file order; a share is taken over records after a seeded shuffle."""
    name, lo, hi = parse_split(spec)
    path = task_file(root, task, name, download)
    numbered = read_jsonl(path)
    if (lo, hi) != (0.0, 1.0):
        order = list(range(len(numbered)))
        random.Random(split_seed).shuffle(order)
        chosen = sorted(order[round(lo * len(order)) : round(hi * len(order))])
        numbered = [numbered[i] for i in chosen]
    examples = []
    for number, record in numbered:
        try:
            examples.extend(task.read(record))
        except RecordError as err:  # the one place a record's fault gets its file and line
            raise FastformersError(f"{path}:{number}: {err}") from err
    if not examples:
        raise FastformersError(f"{path}: split {spec!r} has no examples")
    return examples


def fingerprint(root: str | Path, task: Task) -> str:
    """Content hash of a task's data files, so a changed data file invalidates cached stages.

    Only regular files count: a directory named like a split is no data (a run that reads that split is
    refused by `task_file`), so it neither crashes the hash nor changes it."""
    digest = hashlib.sha256()
    for path in sorted((Path(root) / task.name).glob("*.jsonl")):
        if not path.is_file():
            continue
        digest.update(path.name.encode())
        try:
            with path.open("rb") as stream:
                for chunk in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError as err:
            raise FastformersError(f"cannot read {path}: {err.strerror or err}") from err
    return digest.hexdigest()[:16]


def texts_of(examples: Iterable[Example]) -> Iterable[str]:
    """Every text the model would read, for training a tokenizer on the task's own words."""
    for example in examples:
        for first, second in example.pairs:
            yield first
            if second:
                yield second


class EncodedDataset(torch.utils.data.Dataset):
    """Tokenized rows of each example, kept together so a batch never splits a candidate group."""

    def __init__(self, examples: Sequence[Example], tokenizer, max_length: int):
        self.examples = list(examples)
        firsts = [p[0] for e in self.examples for p in e.pairs]
        seconds = [p[1] for e in self.examples for p in e.pairs]
        pairs_given = all(s is not None for s in seconds)
        encoded = tokenizer(
            firsts, seconds if pairs_given else None, truncation=True, max_length=max_length, padding=False
        )
        rows = [dict(zip(encoded.keys(), values)) for values in zip(*encoded.values())]
        self.rows: list[list[dict]] = []
        start = 0
        for example in self.examples:
            self.rows.append(rows[start : start + len(example.pairs)])
            start += len(example.pairs)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[list[dict], Example]:
        return self.rows[index], self.examples[index]


class Collator:
    """Pads each batch to its own longest row (dynamic padding) and records the candidate groups."""

    def __init__(self, tokenizer, candidate_scoring: bool):
        self.tokenizer = tokenizer
        self.candidate_scoring = candidate_scoring

    def __call__(self, items: list[tuple[list[dict], Example]]) -> dict[str, torch.Tensor]:
        rows = [row for item_rows, _ in items for row in item_rows]
        batch = dict(self.tokenizer.pad(rows, padding="longest", return_tensors="pt"))
        examples = [example for _, example in items]
        batch["group_sizes"] = torch.tensor([len(e.pairs) for e in examples])
        if self.candidate_scoring:
            width = int(batch["group_sizes"].max())
            gold_mask = torch.zeros(len(examples), width, dtype=torch.bool)
            for i, example in enumerate(examples):
                gold_mask[i, list(example.golds)] = True
            batch["gold_mask"] = gold_mask
        else:
            batch["labels"] = torch.tensor([-100 if e.label is None else e.label for e in examples])
        if examples[0].teacher_scores is not None:
            scores = [e.teacher_scores or [] for e in examples]
            width = max(len(s) for s in scores)
            batch["teacher_scores"] = torch.tensor([s + [float("-inf")] * (width - len(s)) for s in scores])
        return batch


def make_loader(
    examples, tokenizer, task: Task, max_length: int, batch_size: int, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    dataset = EncodedDataset(examples, tokenizer, max_length)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=Collator(tokenizer, task.labels is None),
    )


class TaskDataModule(L.LightningDataModule):
    """Train and validation loaders of one task, for Lightning's Trainer."""

    def __init__(
        self,
        task: Task,
        tokenizer,
        train: Sequence[Example],
        val: Sequence[Example],
        max_length: int,
        batch_size: int,
        eval_batch_size: int,
        seed: int,
    ):
        super().__init__()
        self.task, self.tokenizer, self.train, self.val = task, tokenizer, train, val
        self.max_length, self.batch_size, self.eval_batch_size, self.seed = (
            max_length,
            batch_size,
            eval_batch_size,
            seed,
        )

    def train_dataloader(self) -> DataLoader:
        return make_loader(self.train, self.tokenizer, self.task, self.max_length, self.batch_size, True, self.seed)

    def val_dataloader(self) -> DataLoader:
        return make_loader(self.val, self.tokenizer, self.task, self.max_length, self.eval_batch_size)
