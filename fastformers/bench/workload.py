"""What each instance of a setting runs: the sample tokenized once, padded as the setting says (to
max_seq_length, to each batch's longest row, or to a multiple of a bucket), dealt out whole batches at a
time. Tokenizing and padding happen here, before any timing; the same batches' raw texts travel with them,
for the end-to-end pass the instance tokenizes itself."""

from __future__ import annotations

import numpy as np

from fastformers.bench.instances import Batch, Texts, Work
from fastformers.bench.options import BenchOptions
from fastformers.bench.settings import Setting
from fastformers.data.loading import EncodedDataset
from fastformers.engines import MODEL_INPUTS, pad_to_bucket


def instance_work(
    opts: BenchOptions, setting: Setting, dataset: EncodedDataset, tokenizer, tokenizer_folder: str | None = None
) -> list[Work]:
    """The sample batched and padded as the setting says, dealt out to its instances; the first
    `latency_examples` are dealt out the same way as batch-size-1 calls. Every setting is warmed on every input
    shape it will see (bucketed or dynamic), so no row pays a cold first call of a shape inside the clock. With
    `tokenizer_folder`, each share carries its batches' raw texts for the end-to-end pass."""
    instances = setting.layout.instances
    length = opts.max_length if setting.padding == "fixed" else None
    batches = make_batches(
        dataset, range(len(dataset)), opts.batch_size, tokenizer, length, opts.sort_by_length, setting.bucket
    )
    singles = make_batches(
        dataset, range(min(opts.latency_examples, len(dataset))), 1, tokenizer, length, False, setting.bucket
    )
    return [
        Work(
            share,
            latency_share,
            opts.warmup_batches,
            opts.repeats,
            every_shape=True,
            texts=texts_of(share, dataset, tokenizer, tokenizer_folder, opts.max_length, length is not None)
            if tokenizer_folder
            else None,
        )
        for share, latency_share in zip(deal(batches, instances), deal(singles, instances))
    ]


def texts_of(
    share: list[Batch], dataset: EncodedDataset, tokenizer, folder: str, max_length: int, fixed: bool
) -> Texts:
    """The raw (text, pair) rows of each batch of `share`, in the batch's order (what the instance tokenizes),
    with the padding the stage's `tokenizer` applies (its pad token and side, the feeds it returns)."""
    rows = [[pair for i in batch.indices for pair in dataset.examples[i].pairs] for batch in share]
    inputs = tuple(k for k in tokenizer.model_input_names if k in MODEL_INPUTS)
    return Texts(
        folder, rows, max_length, fixed, tokenizer.pad_token_id, tokenizer.pad_token, tokenizer.padding_side, inputs
    )


def deal(batches: list[Batch], instances: int) -> list[list[Batch]]:
    """Whole batches, round-robin: every example sits in the same batch whatever the layout (dynamic int8
    scales its activations per batch, so a layout must not change predictions), and length-sorted batches
    spread evenly over the instances."""
    return [batches[i::instances] for i in range(instances)]


def make_batches(
    dataset: EncodedDataset,
    positions,
    batch_size: int,
    tokenizer,
    fixed_length: int | None,
    sort_by_length: bool,
    bucket: int | None = None,
) -> list[Batch]:
    """The examples at `positions` as padded batches: to `fixed_length` (what an out-of-the-box pipeline
    does), or each to its own longest row (rounded up to a multiple of `bucket`); sorted by length first, a
    batch wastes little on padding."""
    positions = [int(p) for p in positions]
    if sort_by_length and fixed_length is None:
        positions.sort(key=lambda i: max(len(row["input_ids"]) for row in dataset.rows[i]))
    padding = {"padding": "max_length", "max_length": fixed_length} if fixed_length else {"padding": "longest"}
    batches = []
    for start in range(0, len(positions), batch_size):
        chunk = positions[start : start + batch_size]
        rows = [row for i in chunk for row in dataset.rows[i]]
        padded = tokenizer.pad(rows, return_tensors="np", **padding)
        inputs = {k: np.asarray(v, dtype=np.int64) for k, v in padded.items() if k in MODEL_INPUTS}
        if bucket:
            inputs = pad_to_bucket(inputs, bucket)
        batches.append(Batch(chunk, inputs, [len(dataset.rows[i]) for i in chunk]))
    return batches
