"""Reading the official SuperGLUE jsonl files and turning them into dynamically padded batches."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
import re
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from fastformers.data.tasks import DIAGNOSTICS, Example, RecordError, Task
from fastformers.errors import FastformersError

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


def holdout_split(spec: str, fraction: float, field: str = "task.train_split") -> tuple[str, str]:
    """(what the search may read, the held-out slice) of a whole split: a seeded share (the `split_seed` shuffle)
    kept out of every training and choice, so a choice made on the eval split can be confirmed on examples no model
    saw. `field`: the config key `spec` came from, for the error."""
    name, lo, hi = parse_split(spec)
    percent = round(fraction * 100)
    if (lo, hi) != (0.0, 1.0):
        raise FastformersError(f"{field}={spec!r}: a held-out slice is taken from a whole split, not a share")
    if not 0 < percent < 100 or abs(percent - fraction * 100) > 1e-9:
        raise FastformersError(f"holdout fraction {fraction!r} must be a whole percent between 0.01 and 0.99")
    return f"{name}[:{100 - percent}%]", f"{name}[{100 - percent}%:]"


def task_file(root: str | Path, task: Task, split: str, download: bool = False) -> Path:
    if task.files is not None:  # a task from config: the user's own files, wherever they are
        if split not in task.files:
            raise FastformersError(f"task.files.{split} is not set: name the {split} split's file")
        path = task.files[split]
        if not path.is_file():
            raise task_file_error(path, f"task.files.{split}")
        return path
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


def task_file_error(path: Path, key: str) -> FastformersError:
    """Why a configured data file cannot be read, naming the config key that points at it."""
    if path.exists():
        what = "a directory" if path.is_dir() else "not a regular file"
        return FastformersError(f"{path.resolve()} ({key}) is {what}, not a data file")
    return FastformersError(f"missing data file {path.resolve()} ({key})")


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


DELIMITERS = {".csv": ",", ".tsv": "\t"}
DELIMITER_NAMES = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}


def read_records(path: Path, delimiter: str | None = None) -> list[tuple[str, dict]]:
    """(where, record) of every row of a .jsonl, .csv/.tsv or .parquet file, `where` being `file:line` (parquet:
    `file:row N`, counted from 1) for the one-line message of a row the task cannot use."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [(f"{path}:{number}", record) for number, record in read_jsonl(path)]
    if suffix in DELIMITERS:
        return read_delimited(path, delimiter or DELIMITERS[suffix])
    if suffix == ".parquet":
        return read_parquet(path)
    raise FastformersError(f"{path}: unknown format {suffix!r}; use .jsonl, .csv, .tsv or .parquet")


def read_delimited(path: Path, delimiter: str) -> list[tuple[str, dict]]:
    """Rows of a delimited text file whose first row names the columns, each as {column: text}. Refused in one
    line: bytes that are not UTF-8, broken quoting, a header of one column that looks separated by another
    character (a .csv that is really tab-separated), a row with more or fewer fields than the header."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise FastformersError(f"cannot read {path}: {err.strerror or err}") from err
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise FastformersError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x})") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    name = DELIMITER_NAMES.get(delimiter, repr(delimiter))
    header: list[str] | None = None
    records: list[tuple[str, dict]] = []
    start = 1
    try:
        for row in reader:
            where, start = f"{path}:{start}", reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue  # a blank line
            if header is None:
                header = [cell.strip() for cell in row]
                _check_header(header, text, where, name, path.suffix)
                continue
            if len(row) != len(header):
                raise FastformersError(
                    f"{where}: {len(row)} fields but the header has {len(header)} ({name}-separated; "
                    f"a text holding a {name} must be quoted)"
                )
            records.append((where, dict(zip(header, row))))
    except csv.Error as err:
        raise FastformersError(f"{path}:{reader.line_num}: not valid {name}-separated text ({err})") from None
    if header is None:
        raise FastformersError(f"{path}:1: empty file: the first row must name the columns")
    return records


def _check_header(header: list[str], text: str, where: str, name: str, suffix: str) -> None:
    if len(header) == 1:
        first = text.splitlines()[0] if text else ""
        other = next((d for d in DELIMITER_NAMES if d in first and DELIMITER_NAMES[d] != name), None)
        if other is not None:
            fix = {"\t": "rename it .tsv", ",": "rename it .csv"}.get(other, f"set task.delimiter='{other}'")
            raise FastformersError(
                f"{where}: one column {_shown_cell(header[0])} in a {name}-separated header, which looks "
                f"{DELIMITER_NAMES[other]}-separated: {fix}"
            )
    seen: set[str] = set()
    for column in header:
        if column in seen:
            raise FastformersError(f"{where}: column {_shown_cell(column)} appears twice in the header")
        seen.add(column)


def _shown_cell(text: str, width: int = 40) -> str:
    shown = json.dumps(text)
    return shown if len(shown) <= width else f'{shown[: width - 4]}..."'


def read_parquet(path: Path) -> list[tuple[str, dict]]:
    """Rows of a Parquet file as {column: value}, `where` being `file:row N` (from 1)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except OSError as err:  # pyarrow's ArrowInvalid (not Parquet, truncated) is an OSError subclass too
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise FastformersError(f"cannot read {path}: not a readable Parquet file ({reason})") from None
    except Exception as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise FastformersError(f"cannot read {path}: not a readable Parquet file ({reason})") from None
    return [(f"{path}:row {number}", record) for number, record in enumerate(table.to_pylist(), start=1)]


def _kind(value: object) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def load_examples(
    task: Task, root: str | Path, spec: str, split_seed: int = 0, download: bool = False
) -> list[Example]:
    """Examples of a split spec, in file order; a share is taken over records after a seeded shuffle."""
    name, lo, hi = parse_split(spec)
    path = task_file(root, task, name, download)
    if task.files is None:
        numbered = [(f"{path}:{number}", record) for number, record in read_jsonl(path)]
    else:  # a task from config: the user's .jsonl, .csv, .tsv or .parquet file
        numbered = read_records(path, (task.spec or {}).get("delimiter"))
    if (lo, hi) != (0.0, 1.0):
        order = list(range(len(numbered)))
        random.Random(split_seed).shuffle(order)
        chosen = sorted(order[round(lo * len(order)) : round(hi * len(order))])
        numbered = [numbered[i] for i in chosen]
    examples = []
    for where, record in numbered:
        try:
            read = task.read(record)
        except RecordError as err:  # the one place a record's fault gets its file and line
            raise FastformersError(f"{where}: {err}") from err
        for example in read:
            if not example.uid:  # a task from config without an id field: the row's line in its file
                example.meta["line"] = int(where.rpartition(":")[2].removeprefix("row "))
                example.uid = f"{name}:{example.meta['line']}"
        examples.extend(read)
    if not examples:
        raise FastformersError(f"{path}: split {spec!r} has no examples")
    return examples


@dataclass(frozen=True)
class DataSource:
    """One task's data as a run reads it (where its files are, how a share of a split is drawn, whether the
    official archive may be fetched, how many tokens a row keeps), so a stage names a split, not five settings."""

    task: Task
    root: str | Path
    max_length: int
    split_seed: int = 0
    download: bool = False

    @classmethod
    def of(cls, cfg: DictConfig, task: Task) -> DataSource:
        return cls(task, cfg.data.root, cfg.task.max_seq_length, cfg.data.split_seed, cfg.data.download)

    def examples(self, spec: str, download: bool | None = None) -> list[Example]:
        """A split spec's examples (`download=False`: an optional split is never fetched)."""
        fetch = self.download if download is None else download
        return load_examples(self.task, self.root, spec, self.split_seed, fetch)

    def loader(self, examples, tokenizer, batch_size: int) -> DataLoader:
        """An inference loader over `examples` (`make_loader`), at the run's row length."""
        return make_loader(examples, tokenizer, self.task, self.max_length, batch_size)

    def encoded(self, examples, tokenizer) -> EncodedDataset:
        return EncodedDataset(examples, tokenizer, self.max_length)


def fingerprint(root: str | Path, task: Task) -> str:
    """Content hash of a task's data files, so a changed data file invalidates cached stages.

    Only regular files count: a directory named like a split is no data (a run that reads that split is
    refused by `task_file`), so it neither crashes the hash nor changes it."""
    digest = hashlib.sha256()
    if task.files is not None:  # a task from config: the user's files, each under its split's name
        for split, path in sorted(task.files.items()):
            digest.update(f"{split}{path.suffix.lower()}".encode())
            if path.is_file():
                hash_file(digest, path)
            else:
                digest.update(b"missing")
        return digest.hexdigest()[:16]
    diagnostics = [Path(root) / d.name / f"{d.name}.jsonl" for d in DIAGNOSTICS.get(task.name, ())]
    for path in sorted((Path(root) / task.name).glob("*.jsonl")) + diagnostics:  # RTE's model answers AX-b, AX-g
        if not path.is_file():
            continue
        digest.update(path.name.encode())
        hash_file(digest, path)
    return digest.hexdigest()[:16]


def hash_file(digest, path: Path) -> None:
    """Feeds a file's bytes to a hashlib digest, 1 MiB at a time."""
    try:
        with path.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as err:
        raise FastformersError(f"cannot read {path}: {err.strerror or err}") from err


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

    def __getitem__(self, index: int) -> tuple[list[dict], Example, int]:
        return self.rows[index], self.examples[index], index

    def lengths(self) -> list[int]:
        """Tokens each example pads to in a batch of its own kind: its rows times its longest row."""
        return [len(rows) * max(len(row["input_ids"]) for row in rows) for rows in self.rows]


BUCKET = 16  # tokens: the length steps TrainOrder groups by


class TrainOrder(torch.utils.data.Sampler[list[int]]):
    """The training batches: shuffled every epoch, then (grouped) sorted by length within windows of 50 batches,
    so a batch pads to rows of similar length (BoolQ's long tail made random batches pad ~2x more) while batches
    still come in random order. Under DDP each of `world` ranks takes every world-th example of each global batch
    (the short last one padded with repeats), so together they train on the batch one process would. An epoch's
    batches depend on seed + epoch alone, so a resumed run trains epoch e on the batches an uninterrupted one does."""

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int, grouped: bool, rank: int = 0, world: int = 1
    ):
        self.lengths, self.batch_size, self.seed, self.grouped = list(lengths), batch_size, seed, grouped
        self.rank, self.world, self.epoch, self.window = rank, world, 0, 50 * batch_size

    def bucket(self, index: int) -> int:
        """Lengths sorted in steps of BUCKET tokens, shuffled within a step: where length follows the label (short
        texts of one class), an exact sort would make batches of one class; padding grows by < BUCKET tokens."""
        return self.lengths[index] // BUCKET

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # training.EpochSeed calls this before every epoch (Lightning's set_epoch calls miss a
        # batch sampler), and __iter__ draws lazily, at the epoch's first batch: each epoch gets its own order

    def global_batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        if self.grouped:
            windows = [order[i : i + self.window] for i in range(0, len(order), self.window)]
            order = [i for window in windows for i in sorted(window, key=self.bucket, reverse=True)]
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.grouped:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            padded = batch + batch[: -len(batch) % self.world]  # every rank gets as many rows of every batch
            yield padded[self.rank :: self.world]

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size


class Collator:
    """Pads each batch to its own longest row (dynamic padding) and records the candidate groups."""

    def __init__(self, tokenizer, candidate_scoring: bool):
        self.tokenizer = tokenizer
        self.candidate_scoring = candidate_scoring

    def __call__(self, items: list[tuple[list[dict], Example, int]]) -> dict[str, torch.Tensor]:
        rows = [row for item_rows, _, _ in items for row in item_rows]
        batch = dict(self.tokenizer.pad(rows, padding="longest", return_tensors="pt"))
        examples = [example for _, example, _ in items]
        batch["index"] = torch.tensor([index for _, _, index in items])  # loaders may reorder: results say whose
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


def make_loader(examples, tokenizer, task: Task, max_length: int, batch_size: int) -> DataLoader:
    """An inference loader: examples taken shortest first, so each batch pads to rows of similar length
    (results carry `index`, and `models.score_examples` puts them back in the examples' order)."""
    dataset = EncodedDataset(examples, tokenizer, max_length)
    lengths = dataset.lengths()
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sorted(range(len(dataset)), key=lengths.__getitem__),
        collate_fn=Collator(tokenizer, task.labels is None),
    )


def train_loader(
    examples, tokenizer, task: Task, max_length: int, batch_size: int, seed: int, grouped: bool, rank: int, world: int
) -> DataLoader:
    """The training loader: `batch_size` is the global batch, split evenly over `world` ranks (DDP)."""
    dataset = EncodedDataset(examples, tokenizer, max_length)
    order = TrainOrder(dataset.lengths(), batch_size, seed, grouped, rank, world)
    return DataLoader(dataset, batch_sampler=order, collate_fn=Collator(tokenizer, task.labels is None))


class TaskDataModule(L.LightningDataModule):
    """Train and validation loaders of one task, for Lightning's Trainer (which must not swap in its own
    distributed sampler: `TrainOrder` splits the training batches, and every rank validates on all of val)."""

    def __init__(
        self,
        task: Task,
        tokenizer,
        train: Sequence[Example],
        val: Sequence[Example],
        max_length: int,
        opts: DictConfig,
        seed: int,
    ):
        super().__init__()
        self.task, self.tokenizer, self.train, self.val = task, tokenizer, train, val
        self.max_length, self.opts, self.seed = max_length, opts, seed

    def train_dataloader(self) -> DataLoader:
        opts, trainer = self.opts, self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        return train_loader(
            self.train, self.tokenizer, self.task, self.max_length, opts.batch_size, self.seed,
            opts.group_by_length, rank, world,
        )  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return make_loader(self.val, self.tokenizer, self.task, self.max_length, self.opts.eval_batch_size)
