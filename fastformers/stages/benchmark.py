"""Stage `benchmark`: runs the task's examples through each configured setting (PyTorch out of the box,
PyTorch with dynamic length, the ONNX graphs, multi-instance layouts) one after another in this run, scores
every setting's own predictions with the task's official metrics, and reports speed-ups over the first
setting. Never cached: a timing means something only beside the others measured with it."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort
import torch
from omegaconf import DictConfig
from transformers import AutoConfig, AutoTokenizer

from fastformers.data import EncodedDataset, load_examples, parse_split
from fastformers.energy import EnergyMeter, choose_meter
from fastformers.errors import FastformersError
from fastformers.instances import Backend, Batch, Layout, Served, Work, layouts_filling, plan_layout, serve, usable_cores
from fastformers.roofline import Peaks, Shape, bound_seconds, flops, measure_peaks
from fastformers.runtime import CUDA, OnnxClassifier, graph_path, providers_for, require_provider, session_options
from fastformers.tasks import Task, get_task

log = logging.getLogger(__name__)

VERSION = 1  # bump when a code change alters what this stage writes
PROVIDES = None
USES = ("model",)  # plus "onnx" when a setting runs an exported graph, see uses()
CONFIG_KEYS = ("task", "benchmark", "hardware", "precision", "data.split_seed")
CACHED = False  # the pipeline re-measures in every run instead of replaying remembered timings

BACKENDS = {"torch": None, "onnx_fp32": "fp32", "onnx_int8": "int8", "onnx_int8_stock": "int8_stock",
            "onnx_int8_static": "int8_static", "onnx_fp16": "fp16"}  # -> exported graph; int8_stock (always)
# and int8_static (with precision.static) are exported beside int8
GATE_ACTIONS = ("error", "mark")
PADDINGS = ("fixed", "dynamic")
MODELS = ("latest", "teacher")  # which model a torch setting times
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
LAYOUT = re.compile(r"^(\d+)x(\d+)$")


@dataclass(frozen=True)
class Setting:
    """One row of the table: what runs, how batches are padded, and on which instance layout."""

    name: str
    backend: str
    padding: str
    layout: Layout
    model: str = "latest"  # latest: the model the stages before produced; teacher: the fine-tuned teacher
    session: tuple[tuple[str, object], ...] = ()  # onnxruntime session options (runtime.session_options)
    gated: bool = False  # a lever that may change predictions: held to benchmark.gate


def uses(cfg: DictConfig) -> tuple[str, ...]:
    settings = cfg.benchmark.settings
    onnx = ("onnx",) if any(setting.backend != "torch" for setting in settings) else ()
    teacher = ("teacher",) if any(setting.get("model") == "teacher" for setting in settings) else ()
    return USES + onnx + teacher


def validate(cfg: DictConfig) -> None:
    opts, hardware = cfg.benchmark, cfg.hardware
    for key in ("batch_size", "repeats"):
        if not isinstance(opts[key], int) or opts[key] < 1:
            raise FastformersError(f"benchmark.{key}={opts[key]!r} must be a positive integer")
    for key in ("latency_examples", "warmup_batches"):
        if not isinstance(opts[key], int) or opts[key] < 0:
            raise FastformersError(f"benchmark.{key}={opts[key]!r} must be a non-negative integer")
    if opts.max_examples is not None and opts.max_examples < 1:
        raise FastformersError(f"benchmark.max_examples={opts.max_examples!r} must be positive (or null = all)")
    for key in ("usd_per_hour", "tdp_watts"):
        if hardware[key] is not None and hardware[key] <= 0:
            raise FastformersError(f"hardware.{key}={hardware[key]!r} must be positive (or null = not reported)")
    parse_split(opts.split)
    names = {setting.name for setting in plan_settings(cfg)}
    if opts.reference is not None and opts.reference not in names:
        raise FastformersError(f"benchmark.reference={opts.reference!r} is not a setting name (have {sorted(names)})")
    if any(s.get("gated") for s in opts.settings):
        if opts.gate.reference not in names:
            raise FastformersError(f"benchmark.gate.reference={opts.gate.reference!r} is not a setting name "
                                   f"(have {sorted(names)})")
        if opts.gate.on_fail not in GATE_ACTIONS:
            raise FastformersError(f"benchmark.gate.on_fail={opts.gate.on_fail!r} must be one of {list(GATE_ACTIONS)}")


def plan_settings(cfg: DictConfig) -> list[Setting]:
    """The rows in measuring order: each configured setting (a repeat of an identical one is measured
    once), then the last setting again at every extra layout of `benchmark.layouts`."""
    if not cfg.benchmark.settings:
        raise FastformersError("benchmark.settings is empty: name at least one, e.g. {name: baseline, "
                               "backend: torch, padding: fixed}")
    rows: list[Setting] = []
    for i, spec in enumerate(cfg.benchmark.settings):
        setting = _setting(cfg, spec, f"benchmark.settings[{i}]")
        same_name = [row for row in rows if row.name == setting.name]
        if same_name and same_name[0] != setting:
            raise FastformersError(f"benchmark.settings[{i}]: name {setting.name!r} is already used by another setting")
        if not same_name:
            rows.append(setting)
    last = rows[-1]
    for instances, threads in _extra_layouts(cfg):
        layout = plan_layout(instances, threads, cfg.hardware.cores)
        if all(row.layout != layout for row in rows if row.backend == last.backend and row.padding == last.padding):
            rows.append(dataclasses.replace(last, name=f"{last.name}_{layout.label}", layout=layout))
    return rows


def _setting(cfg: DictConfig, spec: DictConfig, field: str) -> Setting:
    for key in ("name", "backend", "padding"):
        if key not in spec:
            raise FastformersError(f"{field}: missing {key!r}")
    if spec.backend not in BACKENDS:
        raise FastformersError(f"{field}.backend={spec.backend!r} must be one of {list(BACKENDS)}")
    if spec.padding not in PADDINGS:
        raise FastformersError(f"{field}.padding={spec.padding!r} must be one of {list(PADDINGS)}")
    variant = BACKENDS[spec.backend]
    model = spec.get("model", "latest")
    if model not in MODELS:
        raise FastformersError(f"{field}.model={model!r} must be one of {list(MODELS)}")
    if model == "teacher" and variant is not None:
        raise FastformersError(f"{field}: model=teacher runs in PyTorch only (the export stage exports the latest "
                               "model)")
    needed = "int8" if variant in ("int8_stock", "int8_static") else variant  # exported beside the int8 graph
    if needed not in (None, "fp32", cfg.precision.name):
        raise FastformersError(f"{field}.backend={spec.backend}: the export stage builds the fp32 graph and "
                               f"precision={cfg.precision.name}'s; run with precision={needed}")
    if variant == "int8_static" and not cfg.precision.get("static"):
        raise FastformersError(f"{field}.backend=onnx_int8_static: the export stage builds the static int8 graph "
                               "only with precision.static=true")
    if variant == "fp16":
        require_provider(CUDA, f"{field}.backend=onnx_fp16")
    session = tuple(sorted((str(k), v) for k, v in (spec.get("session") or {}).items()))
    if session and variant is None:
        raise FastformersError(f"{field}.session: onnxruntime session options need an ONNX backend, not torch")
    try:
        session_options(None, dict(session))  # an unknown option fails here, not in an instance process
    except FastformersError as err:
        raise FastformersError(f"{field}.{err}") from None
    hardware = cfg.hardware
    instances = spec.instances if "instances" in spec else hardware.instances
    threads = spec.threads_per_instance if "threads_per_instance" in spec else hardware.threads_per_instance
    return Setting(spec.name, spec.backend, spec.padding, plan_layout(instances, threads, hardware.cores), model,
                   session, bool(spec.get("gated", False)))


def _extra_layouts(cfg: DictConfig) -> list[tuple[int, int]]:
    layouts = cfg.benchmark.layouts
    if layouts == "auto":
        return layouts_filling(cfg.hardware.cores or len(usable_cores()))
    parsed = []
    for text in layouts or []:
        match = LAYOUT.match(str(text))
        if not match:
            raise FastformersError(f"benchmark.layouts: {text!r} is not <instances>x<threads>, e.g. 2x1 (or auto)")
        parsed.append((int(match[1]), int(match[2])))
    return parsed


def run(cfg: DictConfig, inputs: dict[str, Path], out: Path) -> dict[str, float]:
    task, opts = get_task(cfg.task.name), cfg.benchmark
    examples = load_examples(task, cfg.data.root, opts.split, cfg.data.split_seed, cfg.data.download)
    examples = examples[: opts.max_examples]
    settings = plan_settings(cfg)
    tokenizers, datasets, shapes = {}, {}, {}
    for source in dict.fromkeys(setting.model for setting in settings):  # the latest model, and the teacher
        folder = str(model_folder(source, inputs))
        tokenizers[source] = AutoTokenizer.from_pretrained(folder)
        datasets[source] = EncodedDataset(examples, tokenizers[source], cfg.task.max_seq_length)
        shapes[source] = Shape.of(AutoConfig.from_pretrained(folder))
    meter = choose_meter(cfg.hardware.tdp_watts)
    peaks = measure_peaks(cfg.hardware.cores or len(usable_cores()), opts.roofline_seconds) \
        if opts.roofline_seconds else None
    rows = []
    for setting in settings:
        log.info("benchmark %s: %s, %s padding, %s", setting.name, setting.backend, setting.padding,
                 setting.layout.label)
        work = instance_work(cfg, setting, datasets[setting.model], tokenizers[setting.model])
        served = serve(backend_of(setting, inputs), setting.layout, work, meter_for(meter, setting.layout))
        row = summarize(setting, served, examples, task, cfg, meter)
        row["metrics"] |= end_to_end(examples, tokenizers[setting.model], setting, cfg, row["metrics"]["wall_seconds"])
        if peaks:
            row["metrics"] |= roofline_metrics(shapes[setting.model], datasets[setting.model], peaks,
                                               (BACKENDS[setting.backend] or "").startswith("int8"),
                                               row["metrics"]["wall_seconds"])
        if opts.profile_examples and setting.backend != "torch":
            batches = make_batches(datasets[setting.model], range(min(opts.profile_examples, len(examples))),
                                   opts.batch_size, tokenizers[setting.model], None, opts.sort_by_length)
            row["profile"] = profile(backend_of(setting, inputs), setting.layout.threads, batches, out)
        rows.append(row)
    compare_with_baseline(rows)
    if opts.reference:
        compare_with_reference(rows, opts.reference)
    failed = apply_gate(rows, opts.gate) if any(setting.gated for setting in settings) else []
    best = best_layout(rows)
    report = {"task": task.name, "split": opts.split, "examples": len(examples), "energy_method": meter.method,
              "peaks": dataclasses.asdict(peaks) if peaks else None,
              "energy_estimated": meter.estimated, "best_layout": best["name"] if best else None,
              "machine": machine(), "rows": rows}
    (out / "benchmark.json").write_text(json.dumps(report, indent=2))
    table = format_table(report, cfg)
    (out / "table.txt").write_text(table + "\n")
    log.info("\n%s", table)
    if failed and opts.gate.on_fail == "error":  # the stage's folder is discarded: its table goes to the run
        if mlflow.active_run():
            mlflow.log_text(table + "\n", "benchmark/table.txt")
        raise FastformersError(f"benchmark gate: {'; '.join(failed)} (benchmark.gate.max_drop={opts.gate.max_drop} "
                               "points; the table is logged with the run as benchmark/table.txt)")
    if mlflow.active_run():
        mlflow.set_tags({"benchmark.energy_method": meter.method, "benchmark.best_layout": report["best_layout"] or "",
                         "benchmark.cpu": report["machine"]["cpu"]})
    metrics = {f"{row['name']}/{k}": float(v) for row in rows for k, v in row["metrics"].items()}
    if peaks:
        metrics |= {"roofline/fp32_gflops": peaks.fp32_gflops, "roofline/int8_gops": peaks.int8_gops}
    if best:
        metrics |= {f"best_layout/{k}": best["metrics"][k] for k in ("instances", "threads_per_instance", "speedup")}
    return metrics


def end_to_end(examples, tokenizer, setting: Setting, cfg: DictConfig, wall: float) -> dict:
    """What a caller sees: the timed pass plus tokenizing the same batches from text (timed here, median of 3,
    each instance tokenizing its own share in parallel)."""
    opts, length = cfg.benchmark, cfg.task.max_seq_length
    padding = "max_length" if setting.padding == "fixed" else "longest"
    times = []
    for _ in range(3):
        started = time.perf_counter()
        for start in range(0, len(examples), opts.batch_size):
            pairs = [pair for e in examples[start:start + opts.batch_size] for pair in e.pairs]
            seconds = [b for _, b in pairs]
            tokenizer([a for a, _ in pairs], seconds if all(b is not None for b in seconds) else None,
                      truncation=True, max_length=length, padding=padding, return_tensors="np")
        times.append(time.perf_counter() - started)
    tokenize = sorted(times)[1] / setting.layout.instances
    return {"tokenize_seconds": tokenize, "e2e_throughput": len(examples) / (wall + tokenize)}


def roofline_metrics(shape: Shape, dataset: EncodedDataset, peaks: Peaks, quantized: bool, wall: float) -> dict:
    """Useful FLOPs (real tokens only: padding is waste) per example, and the measured time against the least
    time those FLOPs take at this machine's GEMM rates."""
    lengths = [len(row["input_ids"]) for rows in dataset.rows for row in rows]
    total = sum(sum(flops(shape, tokens)) for tokens in lengths)
    bound = bound_seconds(shape, lengths, peaks, quantized)
    return {"gflops_per_example": total / len(dataset) / 1e9, "bound_seconds": bound, "pct_of_bound": 100 * bound / wall}


def instance_work(cfg: DictConfig, setting: Setting, dataset: EncodedDataset, tokenizer) -> list[Work]:
    """The sample batched and padded as the setting says, then dealt out to the instances; the first
    `latency_examples` are dealt out the same way as batch-size-1 calls. Tokenizing and padding happen here,
    before any timing."""
    opts, instances = cfg.benchmark, setting.layout.instances
    length = cfg.task.max_seq_length if setting.padding == "fixed" else None
    batches = make_batches(dataset, range(len(dataset)), opts.batch_size, tokenizer, length, opts.sort_by_length)
    singles = make_batches(dataset, range(min(opts.latency_examples, len(dataset))), 1, tokenizer, length, False)
    return [Work(share, latency_share, opts.warmup_batches, opts.repeats)
            for share, latency_share in zip(deal(batches, instances), deal(singles, instances))]


def deal(batches: list[Batch], instances: int) -> list[list[Batch]]:
    """Whole batches, round-robin: every example sits in the same batch whatever the layout (dynamic int8
    scales its activations per batch, so a layout must not change predictions), and length-sorted batches
    spread evenly over the instances."""
    return [batches[i::instances] for i in range(instances)]


def make_batches(dataset: EncodedDataset, positions, batch_size: int, tokenizer, fixed_length: int | None,
                 sort_by_length: bool) -> list[Batch]:
    """The examples at `positions` as padded batches: to `fixed_length` (what an out-of-the-box pipeline
    does), or each to its own longest row; sorted by length first, a batch wastes little on padding."""
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
        batches.append(Batch(chunk, inputs, [len(dataset.rows[i]) for i in chunk]))
    return batches


def model_folder(source: str, inputs: dict[str, Path]) -> Path:
    return inputs["teacher" if source == "teacher" else "model"] / "model"


def backend_of(setting: Setting, inputs: dict[str, Path]) -> Backend:
    variant = BACKENDS[setting.backend]
    if variant is None:
        return Backend("torch", str(model_folder(setting.model, inputs)))
    return Backend("onnx", str(graph_path(inputs["onnx"], variant)), tuple(providers_for(variant)), setting.session)


def meter_for(meter: EnergyMeter, layout: Layout) -> EnergyMeter:
    """A TDP estimate counts only the share of the machine's cores the layout keeps busy."""
    used = layout.instances * layout.threads
    return dataclasses.replace(meter, share=min(1.0, used / (os.cpu_count() or used)))


def predictions(served: Served, count: int, candidate_scoring: bool) -> list[int]:
    """Best class per example, or best candidate (first column of each candidate's row)."""
    return [int(np.argmax(served.rows[i][:, 0] if candidate_scoring else served.rows[i][0])) for i in range(count)]


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
        metrics |= {"energy_joules": energy, "joules_per_example": energy / count,
                    "energy_estimated": float(meter.estimated)}
    if cfg.hardware.usd_per_hour:
        metrics["usd_per_100m_queries"] = cfg.hardware.usd_per_hour / 3600 * wall / count * 1e8
    preds = predictions(served, count, task.labels is None)
    scores = task.score(examples, preds) if all(e.label is not None for e in examples) else {}
    return {"name": setting.name, "model": setting.model, "backend": setting.backend, "padding": setting.padding,
            "layout": setting.layout.label, "session": dict(setting.session), "gated": setting.gated,
            "cores": [list(c) for c in setting.layout.cores],
            "instance_cpus": [r.cpus for r in served.results], "task_metrics": list(scores),
            "predictions": preds, "metrics": metrics | scores}


def compare_with_baseline(rows: list[dict]) -> None:
    """Speed-up over the first row, and the share of predictions it agrees with."""
    base = rows[0]
    for row in rows:
        row["metrics"]["speedup"] = base["metrics"]["wall_seconds"] / row["metrics"]["wall_seconds"]
        same = np.equal(row["predictions"], base["predictions"])
        row["metrics"]["agreement_with_baseline"] = float(same.mean())


def compare_with_reference(rows: list[dict], reference: str) -> None:
    """Throughput over a reference row measured in the same run (e.g. the stock int8 pipeline)."""
    base = next(row for row in rows if row["name"] == reference)
    for row in rows:
        row["metrics"]["vs_reference"] = row["metrics"]["throughput"] / base["metrics"]["throughput"]


def apply_gate(rows: list[dict], gate: DictConfig) -> list[str]:
    """Levers that may change predictions (gated settings) must keep the score within `gate.max_drop` points
    of the gate's reference row; those that do not are marked, never chosen best, and listed."""
    reference = next(row for row in rows if row["name"] == gate.reference)
    if "score" not in reference["metrics"]:
        raise FastformersError("benchmark.gate: the benchmark split has no labels to score the gated settings on")
    failed = []
    for row in rows:
        if not row["gated"]:
            continue
        drop = 100 * (reference["metrics"]["score"] - row["metrics"]["score"])
        row["metrics"]["gate_passed"] = float(drop <= gate.max_drop)
        if drop > gate.max_drop:
            failed.append(f"{row['name']} scores {drop:.2f} points below {gate.reference}")
            log.error("benchmark gate: %s", failed[-1])
    return failed


def profile(backend: Backend, threads: int, batches: list[Batch], out: Path) -> dict:
    """Where a graph's time goes, from onnxruntime's own profiler: milliseconds per operator type, and the
    share of the calls' wall time spent outside any kernel (framework overhead, thread hand-offs)."""
    model = OnnxClassifier(backend.path, threads, list(backend.providers),
                           dict(backend.session) | {"enable_profiling": True, "profile_file_prefix": str(out / "ort")})
    started = time.perf_counter()
    for batch in batches:
        model.run(batch.inputs)
    wall_ms = (time.perf_counter() - started) * 1000
    trace = Path(model.session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()  # megabytes of events: the summary is what is kept
    per_op = operator_times(events)
    return {"examples": sum(len(b.indices) for b in batches), "wall_ms": wall_ms, "kernel_ms": per_op,
            "outside_kernels_pct": 100 * max(0.0, 1 - sum(per_op.values()) / wall_ms)}


def operator_times(events: list[dict]) -> dict[str, float]:
    """Kernel milliseconds per operator type, largest first, from a Chrome-trace event list."""
    totals: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event["args"]["op_name"]
            totals[op] = totals.get(op, 0.0) + event["dur"] / 1000
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def best_layout(rows: list[dict]) -> dict | None:
    """The fastest layout of the last setting, when more than one layout of it was measured (and it passed
    its gate)."""
    last = rows[-1]
    candidates = [r for r in rows if r["backend"] == last["backend"] and r["padding"] == last["padding"]
                  and r["metrics"].get("gate_passed", 1.0)]
    layouts = {r["layout"] for r in candidates}
    return max(candidates, key=lambda r: r["metrics"]["throughput"]) if len(layouts) > 1 else None


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_physical_cores": len(usable_cores()),
            "torch": torch.__version__, "onnxruntime": ort.__version__, "python": platform.python_version()}


def format_table(report: dict, cfg: DictConfig) -> str:
    """The ratio table: every row's speed beside its task metrics, all measured in this run."""
    rows, opts = report["rows"], cfg.benchmark
    scored = rows[0]["task_metrics"]  # `score` is the mean of the others: shown only when there are several
    task_keys = [k for k in scored if k != "score"] + (["score"] if len(scored) > 2 else [])
    estimate = " (ESTIMATE: hardware.tdp_watts x time)" if report["energy_estimated"] else ""
    lines = [
        f"{report['task']} {report['split']}: {report['examples']} examples, batch {opts.batch_size}, median of "
        f"{opts.repeats} timed passes; latency at batch 1 over {min(opts.latency_examples, report['examples'])} "
        f"examples; max_seq_length {cfg.task.max_seq_length}",
        f"machine: {report['machine']['cpu']}, {report['machine']['usable_physical_cores']} usable cores; "
        f"energy: {report['energy_method']}{estimate}",
    ]
    if report.get("peaks"):
        lines.append(f"roofline: sustained GEMM {report['peaks']['fp32_gflops']:.0f} GFLOP/s fp32, "
                     f"{report['peaks']['int8_gops']:.0f} GOP/s int8 (onnxruntime, all cores); %bound = least time "
                     "of the useful FLOPs at those rates / measured time")
    reference = f"{'vs ref':>8} " if opts.reference else ""
    header = (f"{'setting':<20} {'model':<7} {'backend':<16} {'padding':<8} {'layout':<6} {'ex/s':>8} {'speed-up':>8} "
              f"{reference}{'e2e ex/s':>8} {'spread':>7} {'%bound':>6} {'p50 ms':>7} {'p99 ms':>7} {'peak MB':>8} {'J/ex':>7} "
              f"{'$/100M':>8} " + " ".join(f"{k:>9}" for k in task_keys) + f" {'agree':>6}")
    lines += [header, "-" * len(header)]
    best = report["best_layout"]
    for row in rows:
        m = row["metrics"]
        spread = (m["wall_seconds_max"] - m["wall_seconds_min"]) / m["wall_seconds"]
        lines.append(
            f"{row['name']:<20} {row['model']:<7} {row['backend']:<16} {row['padding']:<8} {row['layout']:<6} "
            f"{m['throughput']:>8.2f} {m['speedup']:>7.2f}x "
            + (f"{m['vs_reference']:>7.2f}x " if opts.reference else "")
            + f"{_fmt(m.get('e2e_throughput'), 8, 2)} {spread:>6.0%} "
            f"{_fmt(m.get('pct_of_bound'), 6, 1)} {_fmt(m.get('latency_p50_ms'), 7, 1)} "
            f"{_fmt(m.get('latency_p99_ms'), 7, 1)} {m['peak_rss_mb']:>8.0f} {_fmt(m.get('joules_per_example'), 7, 2)} "
            f"{_fmt(m.get('usd_per_100m_queries'), 8, 2)} "
            + " ".join(f"{m[k]:>9.4f}" for k in task_keys)
            + f" {m['agreement_with_baseline']:>6.1%}" + ("  <- best layout" if row["name"] == best else "")
            + ("  GATE FAILED" if m.get("gate_passed") == 0.0 else ""))
    lines.append("speed-up: median wall time of the first row / this row's; e2e: with tokenizing from text; "
                 "spread: (slowest - fastest pass) / median; agree: predictions equal to the first row's")
    if opts.reference:
        lines.append(f"vs ref: throughput / {opts.reference}'s, measured in this run")
    lines += profile_lines(rows)
    return "\n".join(lines)


def profile_lines(rows: list[dict]) -> list[str]:
    """One line per profiled setting: the operator types that take most of its kernel time."""
    profiled = [row for row in rows if "profile" in row]
    if not profiled:
        return []
    lines = [f"profile (onnxruntime profiler, first {profiled[0]['profile']['examples']} examples, one instance): "
             "share of wall time per operator type"]
    for row in profiled:
        prof = row["profile"]
        shares = [f"{op} {100 * ms / prof['wall_ms']:.1f}%" for op, ms in list(prof["kernel_ms"].items())[:6]]
        lines.append(f"  {row['name']:<20} {prof['wall_ms'] / prof['examples']:.2f} ms/ex: " + ", ".join(shares)
                     + f", outside kernels {prof['outside_kernels_pct']:.1f}%")
    return lines


def _fmt(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"
