"""The paper's baseline, measurable here: its shape (BERT-base by default), randomly initialised since timing does
not depend on weights, padded to a fixed 512 tokens, in PyTorch fp32 at batch 1, timed on the first few examples
beside the other rows, so "speed-up over the paper's baseline" is a measurement on this machine rather than a
quote. Its predictions mean nothing: it is never scored, gated, picked nor compared for agreement."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from fastformers.bench.instances import Work, plan_layout
from fastformers.bench.options import BenchOptions, PaperOptions
from fastformers.bench.settings import Setting
from fastformers.checks import require_number
from fastformers.data.loading import EncodedDataset
from fastformers.engines.target import Target
from fastformers.errors import FastformersError

NAME = "paper_baseline"
LABEL = "the paper's baseline shape, randomly initialised"
PAPER_SPEEDUP = 233.9  # the paper's best CPU speed-up over its BERT-base baseline, on BoolQ, on its hardware
PAPER_MAC_REDUCTION = 48.3 / 0.39  # BERT-base padded to 512 over its final 4-layer 312-wide pruned student, GMAC/ex
SHAPE_KEYS = ("layers", "hidden", "heads", "ffn")


def validate(cfg: DictConfig) -> None:
    opts = cfg.benchmark.paper_baseline
    if not isinstance(opts.enabled, bool):
        raise FastformersError(f"benchmark.paper_baseline.enabled={opts.enabled!r} must be true or false")
    require_number(cfg, "benchmark.paper_baseline.examples", 1, integer=True)
    require_number(cfg, "benchmark.paper_baseline.max_length", 1, integer=True)
    unknown = sorted(set(opts.shape) - set(SHAPE_KEYS))
    if unknown:
        raise FastformersError(f"benchmark.paper_baseline.shape: unknown key {unknown[0]!r}; it takes {SHAPE_KEYS}")
    for key in SHAPE_KEYS:
        require_number(cfg, f"benchmark.paper_baseline.shape.{key}", 1, integer=True)
    if opts.shape.hidden % opts.shape.heads:
        raise FastformersError(
            f"benchmark.paper_baseline.shape: hidden={opts.shape.hidden} is not a multiple of heads={opts.shape.heads}"
        )


def setting(opts: BenchOptions) -> Setting:
    """One instance on all the cores, fixed padding, fp32 on `benchmark.baseline`'s engine (PyTorch out of the
    box): the paper's baseline."""
    target = Target(opts.paper.engine, "fp32")
    return Setting(NAME, target, "fixed", plan_layout(1, None, opts.cores), model="paper")


def save_model(opts: PaperOptions, tokenizer, num_labels: int, folder: Path) -> Path:
    """A BERT of the configured shape with random weights (seeded), saved with `tokenizer` (the run's, so it
    reads the task's inputs as the other rows do) where the torch engine loads models from."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    shape, length = opts.shape, opts.max_length
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.ffn,
        max_position_embeddings=max(512, length),
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    config.num_labels = num_labels
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def work(opts: BenchOptions, dataset: EncodedDataset, tokenizer) -> list[Work]:
    """The first `examples` examples one per call, padded to `max_length`, one warm-up call, every round."""
    from fastformers.bench.workload import make_batches

    batches = make_batches(dataset, range(len(dataset)), 1, tokenizer, opts.paper.max_length, False)
    return [Work(batches, [], 1, opts.repeats)]


def finish_row(row: dict, rows: list[dict], reference: str | None) -> None:
    """Drops its meaningless scores, sets its ratios against the others by throughput (it timed fewer
    examples, so wall times do not compare), and gives every row its speed-up over it (`vs_paper`)."""
    metrics = row["metrics"]
    for key in row["task_metrics"]:
        metrics.pop(key, None)
    row |= {"task_metrics": [], "predictions": [], "label": LABEL}
    timed = [other for other in rows if not other["skipped"]]
    metrics["speedup"] = metrics["throughput"] / timed[0]["metrics"]["throughput"]
    ref = next((other for other in timed if other["name"] == reference), None)
    if ref is not None:
        metrics["vs_reference"] = metrics["throughput"] / ref["metrics"]["throughput"]
    for other in [*timed, row]:
        other["metrics"]["vs_paper"] = other["metrics"]["throughput"] / metrics["throughput"]


def summary_lines(report: dict, opts: PaperOptions) -> list[str]:
    """The paper row's shape and cost, and the speed-up over it of the pick (or the fastest row) beside the
    paper's own 233.9x, labelled as what it is."""
    row = next((r for r in report["rows"] if r["name"] == NAME), None)
    if row is None:
        return []
    m = row["metrics"]
    shape = opts.shape
    others = [r for r in report["rows"] if not r["skipped"] and r["name"] != NAME]
    best = next((r for r in others if r["name"] == report.get("pick")), None) or max(
        others, key=lambda r: r["metrics"]["throughput"]
    )
    return [
        f"{NAME}: {LABEL} ({shape.layers} layers, hidden {shape.hidden}, {shape.heads} heads, FFN {shape.ffn}; "
        f"timing does not depend on weights), torch fp32, batch 1, fixed {opts.max_length}-token padding, on the "
        f"first {m['examples']} {report['task']} examples: {m['wall_seconds'] / m['examples']:.2f} s/example",
        f"speed-up over the paper's baseline shape, measured here: {best['name']} "
        f"{best['metrics']['vs_paper']:.1f}x; the paper's: {PAPER_SPEEDUP}x on BoolQ (different hardware, "
        "different teacher)",
    ]
