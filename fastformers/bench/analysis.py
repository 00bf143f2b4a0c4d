"""From passes to a result: speed, latency, memory, energy, cost and the task's metrics of each row; ratios
over the baseline and the like-for-like reference; the accuracy gate; the memory budget; and the pick, the
fastest candidate that keeps accuracy within budget."""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import numpy as np
from omegaconf import DictConfig

from fastformers.bench.settings import Setting
from fastformers.data import EncodedDataset
from fastformers.energy import EnergyMeter
from fastformers.errors import FastformersError
from fastformers.instances import Layout, Served
from fastformers.roofline import Peaks, Shape, bound_seconds, flops
from fastformers.tasks import Task

log = logging.getLogger(__name__)


def meter_for(meter: EnergyMeter, layout: Layout) -> EnergyMeter:
    """A TDP estimate counts only the share of the machine's cores the layout keeps busy."""
    used = layout.instances * layout.threads
    return dataclasses.replace(meter, share=min(1.0, used / (os.cpu_count() or used)))


def predictions(served: Served, count: int, candidate_scoring: bool) -> list[int]:
    """Best class per example, or best candidate (first column of each candidate's row)."""
    return [int(np.argmax(served.rows[i][:, 0] if candidate_scoring else served.rows[i][0])) for i in range(count)]


def describe(setting: Setting) -> dict:
    return {
        "name": setting.name,
        "model": setting.model,
        "engine": setting.engine,
        "precision": setting.precision,
        "padding": setting.padding,
        "bucket": setting.bucket,
        "layout": setting.layout.label,
        "options": dict(setting.options),
        "gated": setting.gated,
        "candidate": setting.candidate,
        "cores": [list(c) for c in setting.layout.cores],
    }


def skipped_row(setting: Setting) -> dict:
    """A candidate this machine cannot run: in the table with its reason, never timed nor picked."""
    return describe(setting) | {"skipped": setting.skipped, "metrics": {}, "predictions": [], "task_metrics": []}


def summarize(setting: Setting, served: Served, examples, task: Task, cfg: DictConfig, meter: EnergyMeter) -> dict:
    """One flat numeric record of a setting: speed, latency, memory, energy, cost, and task metrics."""
    seconds = served.pass_seconds
    median = int(np.argsort(seconds)[len(seconds) // 2])
    wall, count = seconds[median], len(examples)
    metrics = {
        "examples": count,
        "wall_seconds": wall,
        "wall_seconds_min": min(seconds),
        "wall_seconds_max": max(seconds),
        "throughput": count / wall,
        "peak_rss_mb": served.peak_rss_mb,
        "instances": setting.layout.instances,
        "threads_per_instance": setting.layout.threads,
        "fixed_padding": float(setting.padding == "fixed"),
    }
    if served.latencies:
        p50, p90, p99 = np.percentile(served.latencies, [50, 90, 99]) * 1000
        metrics |= {"latency_p50_ms": p50, "latency_p90_ms": p90, "latency_p99_ms": p99}
    energy = served.energy_joules[median]
    if energy is not None:
        metrics |= {
            "energy_joules": energy,
            "joules_per_example": energy / count,
            "energy_estimated": float(meter.estimated),
        }
    if cfg.hardware.usd_per_hour:
        metrics["usd_per_100m_queries"] = cfg.hardware.usd_per_hour / 3600 * wall / count * 1e8
    preds = predictions(served, count, task.labels is None)
    scores = task.score(examples, preds) if all(e.label is not None for e in examples) else {}
    return describe(setting) | {
        "skipped": None,
        "instance_cpus": [r.cpus for r in served.results],
        "task_metrics": list(scores),
        "predictions": preds,
        "metrics": metrics | scores,
    }


def row_named(rows: list[dict], name: str | None) -> dict | None:
    """The row called `name` (None when there is none, e.g. no pick)."""
    return next((row for row in rows if row["name"] == name), None)


def timed(rows: list[dict]) -> list[dict]:
    return [row for row in rows if not row["skipped"]]


def compare_with_baseline(rows: list[dict], agreement_reference: str | None) -> None:
    """Speed-up over the first row; agreement of predictions with `agreement_reference` (the float graph of
    the same model, when the run has one) or else with the first row."""
    base = rows[0]
    agree_with = next((row for row in rows if row["name"] == agreement_reference), base)
    for row in timed(rows):
        row["metrics"]["speedup"] = base["metrics"]["wall_seconds"] / row["metrics"]["wall_seconds"]
        row["metrics"]["agreement"] = float(np.equal(row["predictions"], agree_with["predictions"]).mean())
        row["metrics"]["agreement_with_baseline"] = float(np.equal(row["predictions"], base["predictions"]).mean())


def compare_with_reference(rows: list[dict], reference: str) -> dict:
    """Throughput over the reference at its own best layout among those tried (rows named `<reference>` or
    `<reference>_<layout>`), so `vs ref` never sets our best layout against its worst. Returns that row."""
    family = [
        row
        for row in timed(rows)
        if row["name"] == reference
        or (row["name"].startswith(f"{reference}_") and row["name"][len(reference) + 1 :] == row["layout"])
    ]
    best = max(family, key=lambda row: row["metrics"]["throughput"])
    for row in timed(rows):
        row["metrics"]["vs_reference"] = row["metrics"]["throughput"] / best["metrics"]["throughput"]
    return best


def apply_gate(rows: list[dict], gate: DictConfig) -> list[str]:
    """Rows that may change predictions (gated) must keep the score within `gate.max_drop` points of the
    gate's reference row; those that do not are marked, never picked, and listed."""
    reference = next((row for row in timed(rows) if row["name"] == gate.reference), None)
    if reference is None:
        raise FastformersError(f"benchmark.gate.reference={gate.reference!r} was not timed in this run")
    if "score" not in reference["metrics"]:
        raise FastformersError("benchmark.gate: the benchmark split has no labels to score the gated settings on")
    failed = []
    for row in timed(rows):
        if not row["gated"]:
            continue
        drop = 100 * (reference["metrics"]["score"] - row["metrics"]["score"])
        row["metrics"]["score_drop_points"] = drop
        row["metrics"]["gate_passed"] = float(drop <= gate.max_drop)
        if drop > gate.max_drop:
            failed.append(f"{row['name']} scores {drop:.2f} points below {gate.reference}")
            log.warning("benchmark gate: %s", failed[-1])
    return failed


def apply_memory_budget(rows: list[dict], budget_mb: float) -> None:
    """Marks every row whose peak memory (all its instances together) exceeds the budget."""
    for row in timed(rows):
        row["metrics"]["within_memory"] = float(row["metrics"]["peak_rss_mb"] <= budget_mb)


def pick(rows: list[dict]) -> dict | None:
    """The fastest candidate row that passed its gate and fits the memory budget."""
    eligible = [
        row
        for row in timed(rows)
        if row["candidate"] and row["metrics"].get("gate_passed", 1.0) and row["metrics"].get("within_memory", 1.0)
    ]
    return max(eligible, key=lambda row: row["metrics"]["throughput"]) if eligible else None


def end_to_end(examples, tokenizer, setting: Setting, cfg: DictConfig, wall: float) -> dict:
    """What a caller sees: the timed pass plus tokenizing the same batches from text (timed here, median of 3,
    each instance tokenizing its own share in parallel)."""
    opts, length = cfg.benchmark, cfg.task.max_seq_length
    padding = "max_length" if setting.padding == "fixed" else "longest"
    times = []
    for _ in range(3):
        started = time.perf_counter()
        for start in range(0, len(examples), opts.batch_size):
            pairs = [pair for e in examples[start : start + opts.batch_size] for pair in e.pairs]
            seconds = [b for _, b in pairs]
            tokenizer(
                [a for a, _ in pairs],
                seconds if all(b is not None for b in seconds) else None,
                truncation=True,
                max_length=length,
                padding=padding,
                return_tensors="np",
            )
        times.append(time.perf_counter() - started)
    tokenize = sorted(times)[1] / setting.layout.instances
    return {"tokenize_seconds": tokenize, "e2e_throughput": len(examples) / (wall + tokenize)}


def roofline_metrics(shape: Shape, dataset: EncodedDataset, peaks: Peaks, quantized: bool, wall: float) -> dict:
    """Useful FLOPs (real tokens only: padding is waste) per example, and the measured time against the least
    time those FLOPs take at this machine's GEMM rates."""
    lengths = [len(row["input_ids"]) for rows in dataset.rows for row in rows]
    total = sum(sum(flops(shape, tokens)) for tokens in lengths)
    bound = bound_seconds(shape, lengths, peaks, quantized)
    return {
        "gflops_per_example": total / len(dataset) / 1e9,
        "bound_seconds": bound,
        "pct_of_bound": 100 * bound / wall,
    }
