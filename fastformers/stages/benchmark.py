"""Stage `benchmark`: times the task's examples through each setting (an engine x precision x padding x
layout; `benchmark.search` adds every candidate this machine offers), with the settings' passes interleaved
round-robin, scores every row's own predictions with the task's metrics, gates the rows that may change them
against the float graph, and picks the fastest candidate that keeps accuracy within the memory budget. Never
cached: a timing means something only beside the others measured with it."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import tempfile
from pathlib import Path

import mlflow
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoTokenizer

from fastformers.bench import analysis, paper, table
from fastformers.bench import settings as plan
from fastformers.bench.energy import choose_meter
from fastformers.bench.instances import Backend, Instances, Work, usable_cores
from fastformers.bench.options import BenchOptions, GateOptions
from fastformers.bench.roofline import Shape, family_of, measure_peaks, this_cpu
from fastformers.bench.timing import measure_interleaved
from fastformers.bench.workload import deal, instance_work, make_batches
from fastformers.checks import require_number
from fastformers.context import StageContext
from fastformers.data.loading import EncodedDataset, parse_split
from fastformers.engines import PICK, artifact_path, get_engine
from fastformers.engines.target import Target
from fastformers.errors import FastformersError

log = logging.getLogger(__name__)

VERSION = 2  # a manual override: the code itself is part of the cache key (pipeline.stage_modules)
PROVIDES = "pick"  # pick.json: the engine, precision, bucket and layout chosen (evaluate.engine=pick reads it)
CONFIG_KEYS = ("task", "benchmark", "hardware", "precision", "engines", "data.split_seed")
CACHED = False  # the pipeline re-measures in every run instead of replaying remembered timings
DISTRIBUTED = False
GATE_ACTIONS = ("error", "mark")
HEADLINE = ("pick/throughput", "pick/speedup", "pick/score")


def uses(cfg: DictConfig) -> tuple[str, ...]:
    specs = list(cfg.benchmark.settings)
    artifacts = any(not get_engine(spec.engine, cfg.engines).runs_model_folder for spec in specs)
    exported = ("onnx",) if cfg.benchmark.search or artifacts else ()
    teacher = ("teacher",) if any(spec.get("model") == "teacher" for spec in specs) else ()
    return ("model",) + exported + teacher  # "teacher": the first model of the run, for the baseline


def validate(cfg: DictConfig) -> None:
    opts = cfg.benchmark
    for key in ("batch_size", "repeats"):
        require_number(cfg, f"benchmark.{key}", 1, integer=True)
    for key in ("latency_examples", "warmup_batches", "profile_examples"):
        require_number(cfg, f"benchmark.{key}", 0, integer=True)
    require_number(cfg, "benchmark.max_examples", 1, integer=True, null="all")
    require_number(cfg, "benchmark.max_memory_mb", 0, lo_open=True, null="twice the reference row's peak")
    require_number(cfg, "benchmark.roofline_seconds", 0, meaning="0 = skip")
    validate_gate(cfg)
    paper.validate(cfg)
    for key in ("usd_per_hour", "tdp_watts"):
        require_number(cfg, f"hardware.{key}", 0, lo_open=True, null="not reported")
    parse_split(opts.split)
    rows = plan.plan_settings(cfg)
    names = {row.name for row in rows}
    if opts.reference is not None and opts.reference not in names:
        raise FastformersError(f"benchmark.reference={opts.reference!r} is not a setting name (have {sorted(names)})")
    if any(row.gated for row in rows):
        if opts.gate.reference not in names:
            raise FastformersError(
                f"benchmark.gate.reference={opts.gate.reference!r} is not a setting name (have {sorted(names)})"
            )
        if opts.gate.on_fail not in GATE_ACTIONS:
            raise FastformersError(f"benchmark.gate.on_fail={opts.gate.on_fail!r} must be one of {list(GATE_ACTIONS)}")


def run(ctx: StageContext, inputs: dict[str, Path], out: Path) -> dict[str, float]:
    cfg, task, opts = ctx.cfg, ctx.task, BenchOptions.of(ctx.cfg)
    examples = ctx.data.examples(opts.split)[: opts.max_examples]
    settings = plan.plan_settings(cfg)
    timed = [setting for setting in settings if not setting.skipped]
    tokenizers, datasets, shapes = {}, {}, {}
    for source in dict.fromkeys(setting.model for setting in timed):  # the latest model, and the teacher
        folder = str(model_folder(source, inputs))
        tokenizers[source] = AutoTokenizer.from_pretrained(folder)
        datasets[source] = ctx.data.encoded(examples, tokenizers[source])
        shapes[source] = Shape.of(AutoConfig.from_pretrained(folder))
    meter = choose_meter(opts.tdp_watts)
    peaks = measure_peaks(opts.cores or len(usable_cores()), opts.roofline_seconds) if opts.roofline_seconds else None
    order_log: list[list[str]] = []
    executed: dict[str, list[int]] = {}  # every row's token counts per sequence, padding included

    def starter(setting: plan.Setting):
        def start() -> Instances:
            log.info(
                "benchmark: loading %s (%s, %s, %s)",
                setting.name,
                setting.target.label,
                setting.padding,
                setting.layout.label,
            )
            folder = str(model_folder(setting.model, inputs))  # the tokenizer travels to the instances
            work = instance_work(opts, setting, datasets[setting.model], tokenizers[setting.model], folder)
            executed[setting.name] = analysis.executed_lengths(work)
            return Instances(
                backend_of(ctx, setting, inputs), setting.layout, work, analysis.meter_for(meter, setting.layout)
            )

        return start

    starters, names = [starter(setting) for setting in timed], [setting.name for setting in timed]
    with tempfile.TemporaryDirectory(prefix="fastformers-paper-") as scratch:  # the paper row's random weights
        paper_sample, paper_start = paper_starter(ctx, opts, examples, inputs, Path(scratch), meter)
        if paper_start:
            starters, names = [*starters, paper_start], [*names, paper.NAME]
        served = measure_interleaved(
            starters, opts.repeats, lambda order: order_log.append([names[i] for i in order]), opts.gate.seed
        )
    measured = dict(zip([setting.name for setting in timed], served))
    family = family_of(this_cpu())
    rows = []
    for setting in settings:
        if setting.skipped:
            rows.append(analysis.skipped_row(setting))
            continue
        row = analysis.summarize(setting, measured[setting.name], examples, task, opts, meter)
        wall = row["metrics"]["wall_seconds"]
        row["metrics"] |= analysis.work_metrics(
            shapes[setting.model],
            executed[setting.name],
            len(examples),
            setting.precision,
            setting.layout.instances * setting.layout.threads,
            None if on_gpu(ctx, setting) else family,
            wall,
        )
        if peaks:
            quantized = ctx.engine(setting.engine).spec(setting.precision).quantized
            row["metrics"] |= analysis.roofline_metrics(
                shapes[setting.model], datasets[setting.model], peaks, quantized, wall
            )
        rows.append(row)
    pools = gate_pool_predictions(ctx, opts, rows, settings, tokenizers, inputs, meter)
    report = analyse(opts, rows, analysis.labelled_sample(task, examples), pools)
    if paper_start:
        rows.append(paper_result(opts, task, paper_sample, served[-1], family, meter))
        paper.finish_row(rows[-1], rows[:-1], report["reference"])
    report |= {
        "task": task.name,
        "split": opts.split,
        "examples": len(examples),
        "energy_method": meter.method,
        "energy_estimated": meter.estimated,
        "peaks": dataclasses.asdict(peaks) if peaks else None,
        "machine": table.machine(),
        "interleaving": order_log,
        "rows": rows,
    }
    text = write_report(report, out, opts)  # the timings first: a profiler crash must not lose them
    if opts.profile_examples:
        profile_rows(ctx, opts, report, settings, datasets, tokenizers, inputs, out, len(examples))
        text = write_report(report, out, opts)
    print(text, flush=True)  # the result itself, once, whatever the logging setup
    if report["gate_failures"] and opts.gate.on_fail == "error":  # the stage's folder is discarded
        if mlflow.active_run():
            mlflow.log_text(text + "\n", "benchmark/table.txt")
        raise FastformersError(
            f"benchmark gate: {'; '.join(report['gate_failures'])} (benchmark.gate; the table is logged with "
            "the run as benchmark/table.txt)"
        )
    log_pick(report)
    return metrics_of(report)


def on_gpu(ctx: StageContext, setting: plan.Setting) -> bool:
    """A row that runs on a CUDA GPU (its engine says: fp16, torch's bf16, device: cuda): no CPU peak applies."""
    return ctx.engine(setting.engine).runs_on_gpu(setting.precision, dict(setting.options))


def paper_starter(ctx: StageContext, options: BenchOptions, examples, inputs: dict[str, Path], scratch: Path, meter):
    """With `benchmark.paper_baseline.enabled`: the paper-shape baseline's model (random weights, saved under
    `scratch`), its first examples encoded at its fixed length with the run's tokenizer, and a starter for its
    instance, as (those examples, starter); else ([], None)."""
    opts = options.paper
    if not opts.enabled:
        return [], None
    tokenizer = AutoTokenizer.from_pretrained(str(model_folder("latest", inputs)))
    folder = paper.save_model(opts, tokenizer, ctx.task.num_labels, scratch)
    sample = examples[: opts.examples]
    dataset = EncodedDataset(sample, tokenizer, opts.max_length)
    setting = paper.setting(options)
    backend = Backend(setting.target, engine_conf(ctx.cfg, setting.engine), str(folder))

    def start() -> Instances:
        log.info("benchmark: loading %s (%s)", setting.name, paper.LABEL)
        return Instances(
            backend, setting.layout, paper.work(options, dataset, tokenizer), analysis.meter_for(meter, setting.layout)
        )

    return sample, start


def paper_result(opts: BenchOptions, task, sample, served, family, meter) -> dict:
    """The paper row's record: speed, memory and latency like any row, and its multiply-adds at its fixed length."""
    setting = paper.setting(opts)
    row = analysis.summarize(setting, served, sample, task, opts, meter)
    row["metrics"] |= analysis.work_metrics(
        opts.paper.shape,
        [opts.paper.max_length] * sum(len(e.pairs) for e in sample),
        len(sample),
        "fp32",
        setting.layout.instances * setting.layout.threads,
        family,
        row["metrics"]["wall_seconds"],
    )
    return row


def analyse(opts: BenchOptions, rows: list[dict], sample=None, pools: dict[str, list[int]] | None = None) -> dict:
    """Ratios, the gate, the memory budget and the pick, in that order (each reads the one before). `sample`
    (the labelled units) and `pools` (the judged rows' pool predictions) feed the gate."""
    names = {row["name"] for row in rows}
    gate_reference = opts.gate.reference if opts.gate.reference in names else None
    analysis.compare_with_baseline(rows, gate_reference)
    reference = analysis.compare_with_reference(rows, opts.reference) if opts.reference else None
    failed = analysis.apply_gate(rows, opts.gate, sample, pools or {}) if any(row["gated"] for row in rows) else []
    budget = opts.max_memory_mb
    if budget is None and reference:
        budget = 2 * reference["metrics"]["peak_pss_mb"]
    if budget is not None:
        analysis.apply_memory_budget(rows, budget)
    candidates = mark_candidates(rows, gate_reference)
    chosen = analysis.pick(rows)
    return {
        "reference": reference["name"] if reference else None,
        "agreement_reference": gate_reference,
        "gate_failures": failed,
        "gate_rows": [row["name"] for row in rows if row.get("gate")],
        "memory_budget_mb": budget,
        "candidates": candidates,
        "pick": chosen.row["name"] if chosen.row else None,
        "pick_note": chosen.note,  # why a stock int8 row is the pick
    }


def validate_gate(cfg: DictConfig) -> None:
    gate = cfg.benchmark.gate
    if "max_drop" in gate:
        raise FastformersError(
            "benchmark.gate.max_drop is gone: a fixed drop on a small split is decided by one or two examples; "
            "set benchmark.gate.max_disagreement and benchmark.gate.alpha instead (docs/speed.md)"
        )
    require_number(cfg, "benchmark.gate.max_disagreement", 0, 1, meaning="share of pool predictions")
    require_number(cfg, "benchmark.gate.alpha", 0, 1, lo_open=True, meaning="the score test's significance")
    require_number(cfg, "benchmark.gate.pool_examples", 1, integer=True, null="the whole pool")
    for key in ("permutations", "bootstrap"):
        require_number(cfg, f"benchmark.gate.{key}", 1, integer=True)
    require_number(cfg, "benchmark.gate.seed", 0, integer=True)


def gate_pool(ctx: StageContext, gate: GateOptions) -> list:
    """The gate's pool: the eval split and every other split not used for training or calibration (the test
    split, labelled or not), shuffled with the gate's seed and capped at `gate.pool_examples`."""
    cfg = ctx.cfg
    train, evaluated = parse_split(cfg.task.train_split)[0], parse_split(cfg.task.eval_split)[0]
    examples = ctx.data.examples(cfg.task.eval_split)
    for split in ("val", "test"):
        if split in (train, evaluated):
            continue
        try:
            examples += ctx.data.examples(split, download=False)
        except FastformersError as err:  # an absent optional split: the pool is the rest
            log.info("benchmark gate: no %s split in the pool (%s)", split, err)
    random.Random(gate.seed).shuffle(examples)
    return examples[: gate.pool_examples]


def gate_pool_predictions(ctx, opts: BenchOptions, rows, settings, tokenizers, inputs, meter) -> dict[str, list[int]]:
    """Predictions on the pool of every row the gate judges and of its reference, untimed, through the same
    processes, batching and padding as the timed passes; rows that differ only in layout predict alike (whole
    batches are dealt out), so each such group runs once."""
    judged = {row["name"] for row in rows if analysis.shown_in_gate(row, opts.gate.reference)}
    if not any(row["gated"] for row in rows) or not judged:
        return {}
    judged.add(opts.gate.reference)
    pool = gate_pool(ctx, opts.gate)
    datasets = {model: ctx.data.encoded(pool, tokenizer) for model, tokenizer in tokenizers.items()}
    predicted: dict[tuple, list[int]] = {}
    out = {}
    for setting in settings:
        if setting.name not in judged:
            continue
        key = dataclasses.astuple(dataclasses.replace(setting, name="", layout=settings[0].layout))
        if key not in predicted:
            log.info("benchmark gate: %s predicts %d pool examples", setting.name, len(pool))
            batches = make_batches(
                datasets[setting.model],
                range(len(pool)),
                opts.batch_size,
                tokenizers[setting.model],
                None if setting.padding == "dynamic" else opts.max_length,
                opts.sort_by_length,
                setting.bucket,
            )
            work = [Work(share, [], 0, 1) for share in deal(batches, setting.layout.instances)]
            meter_of = analysis.meter_for(meter, setting.layout)
            instances = Instances(backend_of(ctx, setting, inputs), setting.layout, work, meter_of)
            instances.timed_pass()
            predicted[key] = analysis.predictions(instances.close(), len(pool), ctx.task.labels is None)
        out[setting.name] = predicted[key]
    return out


def mark_candidates(rows: list[dict], gate_reference: str | None) -> list[str]:
    """With a search, its candidates and the gate's float reference (it keeps accuracy by definition, so the pick
    always exists); without, the last setting's layouts (the pick is then its best layout)."""
    if any(row["candidate"] for row in rows):
        for row in rows:
            row["candidate"] = row["candidate"] or row["name"] == gate_reference
    else:
        last = rows[-1]
        for row in rows:
            row["candidate"] = all(
                row[k] == last[k] for k in ("engine", "precision", "padding", "bucket", "model", "options")
            )
    return [row["name"] for row in rows if row["candidate"]]


def profile_rows(
    ctx: StageContext, opts: BenchOptions, report: dict, settings, datasets, tokenizers, inputs, out: Path, count: int
) -> None:
    """The engine's own profiler on the pick and the reference: where the remaining time goes. A profiler that
    fails is logged in one line and named in `report["profile_errors"]`; the stage still succeeds."""
    wanted = {report.get("pick"), report.get("reference")} - {None}
    for setting in settings:
        engine = ctx.engine(setting.engine)
        if setting.name not in wanted or engine.runs_model_folder:  # no artifact, no engine profiler
            continue
        batches = make_batches(
            datasets[setting.model],
            range(min(opts.profile_examples, count)),
            opts.batch_size,
            tokenizers[setting.model],
            None,
            opts.sort_by_length,
            setting.bucket,
        )
        row = analysis.row_named(report["rows"], setting.name)
        try:
            profile = engine.profile(
                artifact_path(inputs["onnx"], engine, setting.precision),
                setting.precision,
                setting.layout.threads,
                dict(setting.options),
                [b.inputs for b in batches],
                out,
                setting.bucket,
            )
        except Exception as err:  # an optional look inside: the timings and the pick stand without it
            log.warning("benchmark: the %s profiler failed on %s (%s); the timings are kept", setting.engine,
                        setting.name, describe(err))  # fmt: skip
            report.setdefault("profile_errors", {})[setting.name] = describe(err)
            continue
        if profile and row:
            row["profile"] = profile | {"examples": sum(len(b.indices) for b in batches)}


def describe(err: Exception) -> str:
    """An exception in one line: its type and the first line of its message."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def write_report(report: dict, out: Path, opts: BenchOptions) -> str:
    """benchmark.json, pick.json and table.txt: written as soon as the timings are in, and again once the
    profiles are added (a profile that failed is named under the table); returns the table."""
    (out / "benchmark.json").write_text(json.dumps(report, indent=2))
    write_pick(report, out)
    text = table.format_table(report, opts)
    for name, error in report.get("profile_errors", {}).items():
        text += f"\nprofile of {name} failed ({error}): its timings above are unaffected"
    (out / "table.txt").write_text(text + "\n")
    return text


def write_pick(report: dict, out: Path) -> None:
    """What `evaluate.engine=pick` and serving run: the pick's engine, precision, bucket and layout."""
    row = analysis.row_named(report["rows"], report["pick"])
    pick = None
    if row:
        target = Target.from_dict(row, f"benchmark row {row['name']}")
        pick = {"name": row["name"]} | target.to_dict() | {"layout": row["layout"], "model": row["model"]}
    (out / PICK).write_text(json.dumps(pick, indent=2))


def log_pick(report: dict) -> None:
    """The pick as MLflow tags (engine, precision, padding, layout) beside the machine it was made on."""
    if not mlflow.active_run():
        return
    tags = cpu_tags(report["machine"]) | {
        "benchmark.energy_method": report["energy_method"],
        "benchmark.cpu": report["machine"]["cpu"],
        "benchmark.pick": report["pick"] or "",
        "benchmark.reference": report["reference"] or "",
    }
    row = analysis.row_named(report["rows"], report["pick"])
    if row:
        tags |= {
            "pick.engine": row["engine"],
            "pick.precision": row["precision"],
            "pick.layout": row["layout"],
            "pick.padding": table.padding_label(row),
        }
    mlflow.set_tags(tags)


def cpu_tags(machine: dict) -> dict[str, str]:
    """`cpu.model` and one `cpu.<feature>` tag per feature that decides which kernels run (true/false), so runs
    can be filtered by what their machine offers."""
    return {"cpu.model": machine["cpu"]} | {
        f"cpu.{name}": str(has).lower() for name, has in machine["cpu_features"].items()
    }


def metrics_of(report: dict) -> dict[str, float]:
    rows = [row for row in report["rows"] if not row["skipped"]]
    metrics = {f"{row['name']}/{k}": float(v) for row in rows for k, v in row["metrics"].items()}
    if report["peaks"]:
        metrics |= {
            "roofline/fp32_gflops": report["peaks"]["fp32_gflops"],
            "roofline/int8_gops": report["peaks"]["int8_gops"],
        }
    if report["memory_budget_mb"] is not None:
        metrics["memory_budget_mb"] = report["memory_budget_mb"]
    row = analysis.row_named(rows, report["pick"])
    if row:
        keys = (
            "throughput",
            "speedup",
            "vs_reference",
            "score",
            "agreement",
            "peak_rss_mb",
            "peak_pss_mb",
            "latency_p50_ms",
            "instances",
            "threads_per_instance",
        )
        metrics |= {f"pick/{k}": float(row["metrics"][k]) for k in keys if k in row["metrics"]}
    return metrics


def summary(metrics: dict[str, float]) -> list[str]:
    """The pick's speed, for the run's closing summary."""
    if "pick/throughput" not in metrics:
        return []
    speedup = metrics.get("pick/speedup", float("nan"))
    return [f"benchmark pick: {metrics['pick/throughput']:.1f} ex/s, {speedup:.2f}x the baseline"]


def model_folder(source: str, inputs: dict[str, Path]) -> Path:
    return inputs["teacher" if source == "teacher" else "model"] / "model"


def backend_of(ctx: StageContext, setting: plan.Setting, inputs: dict[str, Path]) -> Backend:
    """What an instance process loads, in plain picklable values."""
    engine = ctx.engine(setting.engine)
    path = (
        model_folder(setting.model, inputs)
        if engine.runs_model_folder
        else artifact_path(inputs["onnx"], engine, setting.precision)
    )
    return Backend(setting.target, engine_conf(ctx.cfg, setting.engine), str(path))


def engine_conf(cfg: DictConfig, name: str) -> tuple[tuple[str, object], ...]:
    """`engines.<name>` as plain pairs: what an instance process builds its engine from."""
    return tuple(dict(OmegaConf.to_container(cfg.engines[name], resolve=True)).items())  # type: ignore[arg-type]
