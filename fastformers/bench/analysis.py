"""From passes to a result: speed, latency, memory, energy, cost and the task's metrics of each row; ratios
over the baseline and the like-for-like reference; the accuracy gate; the memory budget; and the pick, the
fastest candidate that keeps accuracy within budget."""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fastformers.bench import gate
from fastformers.bench.energy import EnergyMeter
from fastformers.bench.instances import Layout, Served, Work
from fastformers.bench.options import BenchOptions, GateOptions
from fastformers.bench.roofline import Family, Peaks, Shape, bound_seconds, flops, gmacs_per_example, peak_seconds
from fastformers.bench.settings import Setting
from fastformers.data.loading import EncodedDataset
from fastformers.data.tasks import Task
from fastformers.errors import FastformersError

log = logging.getLogger(__name__)


def meter_for(meter: EnergyMeter, layout: Layout) -> EnergyMeter:
    """A TDP estimate counts only the share of the machine's cores the layout keeps busy."""
    used = layout.instances * layout.threads
    return dataclasses.replace(meter, share=min(1.0, used / (os.cpu_count() or used)))


def predictions(served: Served, count: int, candidate_scoring: bool) -> list[int]:
    """Best class per example, or best candidate (first column of each candidate's row)."""
    return argmax_rows(served.rows, count, candidate_scoring)


def argmax_rows(rows: dict[int, np.ndarray], count: int, candidate_scoring: bool) -> list[int]:
    """`predictions` of any pass's logits rows by example index."""
    return [int(np.argmax(rows[i][:, 0] if candidate_scoring else rows[i][0])) for i in range(count)]


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
        "stock": setting.stock,
        "cores": [list(c) for c in setting.layout.cores],
    }


def skipped_row(setting: Setting) -> dict:
    """A candidate this machine cannot run: in the table with its reason, never timed nor picked."""
    return describe(setting) | {"skipped": setting.skipped, "metrics": {}, "predictions": [], "task_metrics": []}


def summarize(setting: Setting, served: Served, examples, task: Task, opts: BenchOptions, meter: EnergyMeter) -> dict:
    """One flat numeric record of a setting: speed, latency, memory, energy, cost, and task metrics."""
    seconds = served.pass_seconds
    wall, count = statistics.median(seconds), len(examples)
    metrics = {
        "examples": count,
        "wall_seconds": wall,
        "wall_seconds_min": min(seconds),
        "wall_seconds_max": max(seconds),
        "throughput": count / wall,
        "throughput_lo": count / max(seconds),  # the slowest and fastest pass: two rows whose ranges overlap
        "throughput_hi": count / min(seconds),  # are not measurably different
        "peak_rss_mb": served.peak_rss_mb,  # each instance's VmHWM, summed: shared pages once per instance
        "peak_pss_mb": served.peak_pss_mb,  # the layout's memory: shared pages counted once
        "instances": setting.layout.instances,
        "threads_per_instance": setting.layout.threads,
        "fixed_padding": float(setting.padding == "fixed"),
    }
    if served.latencies:
        p50, p90, p99 = np.percentile(served.latencies, [50, 90, 99]) * 1000
        metrics |= {"latency_p50_ms": p50, "latency_p90_ms": p90, "latency_p99_ms": p99}
    readings = [e for e in served.energy_joules if e is not None]
    if readings:
        energy = statistics.median(readings)
        metrics |= {
            "energy_joules": energy,
            "joules_per_example": energy / count,
            "energy_estimated": float(meter.estimated),
        }
    if opts.usd_per_hour:
        metrics["usd_per_100m_queries"] = opts.usd_per_hour / 3600 * wall / count * 1e8
    preds = predictions(served, count, task.labels is None)
    metrics |= end_to_end(served, count, preds, task.labels is None)
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


def labelled_sample(task: Task, examples: Sequence) -> gate.Labelled:
    """What the score test needs of the timed examples: golds, the choices of each, the units the task's metric
    counts (a MultiRC question; else each example) and the task's score on any of them."""
    units: dict = {}
    for i, example in enumerate(examples):
        key = (example.meta["passage"], example.meta["question"]) if task.name == "MultiRC" else i
        units.setdefault(key, []).append(i)

    def score(positions: Sequence[int], preds: Sequence[int]) -> float:
        return task.score([examples[i] for i in positions], [preds[i] for i in positions])["score"]

    choices = [len(task.labels) if task.labels else len(e.pairs) for e in examples]
    return gate.Labelled([e.label for e in examples], choices, list(units.values()), score)


def gate_limits(opts: GateOptions) -> gate.GateLimits:
    return gate.GateLimits(opts.max_disagreement, opts.alpha, opts.permutations, opts.bootstrap, opts.seed)


def shown_in_gate(row: dict, reference: str) -> bool:
    """Rows the gate judges: the gated ones (held to it) and any other low-precision row (the stock int8
    reference among them), shown beside them for comparison but never failed."""
    return not row["skipped"] and row["name"] != reference and (row["gated"] or row["precision"] != "fp32")


def apply_gate(rows: list[dict], opts: GateOptions, sample: gate.Labelled, pools: dict[str, list[int]]) -> list[str]:
    """Rows that may change predictions (gated) must agree with the gate's float reference on the pool and not
    lose score against it on the labelled units (fastformers/bench/gate.py); those that fail are marked, never
    picked, and listed. `pools`: each judged row's predictions on the pool, by row name."""
    reference = next((row for row in timed(rows) if row["name"] == opts.reference), None)
    if reference is None:
        raise FastformersError(f"benchmark.gate.reference={opts.reference!r} was not timed in this run")
    if "score" not in reference["metrics"]:
        raise FastformersError("benchmark.gate: the benchmark split has no labels to score the gated settings on")
    failed = []
    for row in rows:
        if not shown_in_gate(row, opts.reference):
            continue
        verdict = gate.judge(
            pools[row["name"]],
            pools[opts.reference],
            row["predictions"],
            reference["predictions"],
            sample,
            gate_limits(opts),
        )
        row["gate"] = verdict
        row["metrics"] |= {f"gate_{k}" if not k.startswith("gate_") else k: v for k, v in verdict.items()}
        if not row["gated"]:
            del row["metrics"]["gate_passed"]  # shown for comparison, never held
        elif not verdict["gate_passed"]:
            failed.append(f"{row['name']}: {gate_reason(verdict, opts)}")
            log.warning("benchmark gate: %s", failed[-1])
    return failed


def gate_reason(verdict: dict, opts: GateOptions) -> str:
    """Why a row failed, in one clause per failed test."""
    reasons = []
    if not verdict["agreement_passed"]:
        reasons.append(
            f"disagrees with {opts.reference} on {verdict['disagreement']:.1%} of {verdict['pool_examples']} pool "
            f"examples (95% lower bound {verdict['disagreement_lower_one_sided']:.1%} > "
            f"max_disagreement {opts.max_disagreement:.1%})"
        )
    if not verdict["score_passed"]:
        reasons.append(
            f"scores {verdict['score_delta_points']:+.2f} points vs {opts.reference} over "
            f"{verdict['differing_units']} differing units (p={verdict['score_p']:.3g} < alpha {opts.alpha})"
        )
    return "; ".join(reasons)


def apply_memory_budget(rows: list[dict], budget_mb: float) -> None:
    """Marks every row whose peak memory (the PSS of all its instances together) exceeds the budget."""
    for row in timed(rows):
        row["metrics"]["within_memory"] = float(row["metrics"]["peak_pss_mb"] <= budget_mb)


@dataclass(frozen=True)
class Pick:
    """The pick, and why: the fastest eligible row, unless it is not measurably faster than the best eligible
    stock int8 row (its slowest pass no faster than that row's fastest), which is then picked instead."""

    row: dict | None
    fastest: dict | None = None  # the fastest eligible row, when the stock row was picked over it
    stock: bool = False  # the pick is a stock int8 row

    @property
    def note(self) -> str | None:
        """The table's word on a stock pick."""
        if not (self.row and self.stock):
            return None
        if self.fastest is None:
            return f"{self.recipe}, itself the fastest that passed"
        fast, base = self.fastest["metrics"], self.row["metrics"]
        return (
            f"{self.recipe}, kept because the fastest that passed, {self.fastest['name']} "
            f"({fast['throughput_lo']:.2f}-{fast['throughput_hi']:.2f} ex/s), is not measurably faster than it "
            f"({base['throughput_lo']:.2f}-{base['throughput_hi']:.2f} ex/s)"
        )

    @property
    def recipe(self) -> str:
        """Which stock recipe the picked row runs: the engine's `stock: true` int8 variant."""
        assert self.row is not None
        return f"a stock int8 row ({self.row['engine']}'s stock int8 recipe, {self.row['precision']})"


def eligible(rows: list[dict]) -> list[dict]:
    """Candidates that passed their gate and fit the memory budget."""
    return [
        row
        for row in timed(rows)
        if row["candidate"] and row["metrics"].get("gate_passed", 1.0) and row["metrics"].get("within_memory", 1.0)
    ]


def pick(rows: list[dict]) -> Pick:
    """The fastest eligible candidate, never measurably slower than an eligible stock int8 row: unless its
    throughput range lies wholly above the best such row's, that stock row is the pick."""
    passing = eligible(rows)
    if not passing:
        return Pick(None)
    throughput = lambda row: row["metrics"]["throughput"]  # noqa: E731
    fastest = max(passing, key=throughput)
    stock = [row for row in passing if row.get("stock")]
    if fastest.get("stock"):
        return Pick(fastest, stock=True)
    if not stock:
        return Pick(fastest)
    best_stock = max(stock, key=throughput)
    if fastest["metrics"]["throughput_lo"] > best_stock["metrics"]["throughput_hi"]:
        return Pick(fastest)
    return Pick(best_stock, fastest, stock=True)


def end_to_end(served: Served, count: int, model_only: list[int], candidate_scoring: bool) -> dict:
    """What a caller sees, measured inside the instances: each tokenized its own share of the texts and ran it
    between the same barriers as the model-only pass (median and range over the end-to-end passes), and the
    share of those predictions equal to the model-only pass's `model_only` (1.0 unless the instances tokenize
    differently from the stage). Empty when the instances had no texts (the paper row)."""
    seconds = served.e2e_seconds
    if not seconds:
        return {}
    predicted = argmax_rows(served.e2e_rows, count, candidate_scoring)
    agreement = float(np.equal(predicted, model_only).mean())
    if agreement < 1:
        log.warning("benchmark: the end-to-end pass predicts %.1f%% of examples as the pass", 100 * agreement)
    return {
        "e2e_wall_seconds": statistics.median(seconds),
        "e2e_throughput": count / statistics.median(seconds),
        "e2e_throughput_lo": count / max(seconds),
        "e2e_throughput_hi": count / min(seconds),
        "e2e_agreement": agreement,
    }


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


def executed_lengths(work: list[Work]) -> list[int]:
    """The token count of every sequence a timed pass runs, padding included (what the engine multiplies)."""
    lengths = []
    for share in work:
        for batch in share.batches:
            rows, tokens = np.shape(batch.inputs["input_ids"])
            lengths += [int(tokens)] * int(rows)
    return lengths


def work_metrics(
    shape: Shape, executed: list[int], examples: int, precision: str, cores: int, family: Family | None, wall: float
) -> dict:
    """Multiply-adds per example the row ran, and `%peak`: their least time at the nominal peak of the row's
    cores over the measured time (absent for a CPU family the peak table does not know). A speed-up over the
    baseline is then the work removed (baseline's GMAC/ex / row's) times the efficiency gained (their MAC/s)."""
    metrics = {"gmacs_per_example": gmacs_per_example(shape, executed, examples)}
    if family is not None:
        metrics["pct_of_peak"] = 100 * peak_seconds(shape, executed, family, precision, cores) / wall
    return metrics
