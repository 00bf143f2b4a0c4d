"""A run: its stages in order, each taken from the cache when the config that defines it is unchanged."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import mlflow
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fastformers import stages
from fastformers.checks import check_config
from fastformers.context import StageContext
from fastformers.data.loading import DataSource, fingerprint, parse_split, split_label, task_file
from fastformers.data.task_config import task_of
from fastformers.data.tasks import Task
from fastformers.engines import get_engine
from fastformers.engines.libraries import library_versions
from fastformers.errors import FastformersError, check_stopped
from fastformers.run.cache import StageCache, cache_key, code_fingerprint
from fastformers.stages import Stage, get_stage
from fastformers.tracking import runs as tracking
from fastformers.tracking import serving
from fastformers.training import distributed

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
# Training settings that change what is printed, not what a stage writes: hashed at one fixed value, so
# changing them reuses the cache (and entries made before they could change keep their keys).
OUTPUT_NEUTRAL = {"progress_bar": False, "log_every_n_steps": 10}
TEACHER = "teacher"  # the first model of a run (the fine-tuned teacher), for stages that compare against it
MODEL = "model"  # what a training stage provides; the run's first one is also its TEACHER


def validate(cfg: DictConfig) -> list[Stage]:
    """Every check that needs no data or model, so a bad config fails before minutes of work."""
    return validated(cfg)[0]


def validated(cfg: DictConfig) -> tuple[list[Stage], Task]:
    """`validate`'s checks; returns the run's stages and its task (built here, once per run)."""
    check_config(cfg)  # the checks that need no heavy import (the CLI runs them first, too)
    task = task_of(cfg)  # a SuperGLUE task, or a valid one on your own files (checked without reading them)
    stages.check_chain(cfg)
    serving.validate(cfg)
    stages.start_from_given_teacher(cfg, (MODEL, TEACHER))
    chain: list[Stage] = []
    provided: set[str] = set()
    for name in cfg.stages:
        stage = get_stage(name)
        stage.validate(cfg)  # first: a bad setting of the stage says more than what it would read
        missing = [need for need in stage.uses(cfg) if need not in provided]
        if missing:
            raise FastformersError(
                f"stages: {name!r} needs the {missing[0]!r} output of an earlier stage "
                f"(e.g. stages=[finetune,{name}], or your own fine-tuned model: teacher.pretrained=/path/to/folder); "
                f"these run before it: {sorted(provided)}"
            )
        chain.append(stage)
        if stage.PROVIDES == MODEL:
            provided.add(TEACHER)
        if stage.PROVIDES:
            provided.add(stage.PROVIDES)
    return chain, task


def context_of(cfg: DictConfig, task: Task | None = None, logger=None) -> StageContext:
    """What every stage reads besides its inputs, made once per run (`task`: the run's, when already built)."""
    task = task or task_of(cfg)
    return StageContext(cfg, task, DataSource.of(cfg, task), lambda name: get_engine(name, cfg.engines), logger)


def run(cfg: DictConfig) -> dict[str, float]:
    """Runs the stages; returns every metric logged, keyed `<stage>/<metric>`."""
    chain, task = validated(cfg)
    ctx = context_of(cfg, task)
    try:
        for spec in dict.fromkeys([cfg.task.train_split, cfg.task.eval_split]):  # fail before any MLflow run
            task_file(cfg.data.root, task, parse_split(spec)[0], cfg.data.download)
    except FastformersError as missing:
        if not cfg.data.skip_missing:
            raise
        log.warning("skipping %s: %s", task.name, missing)
        with tracking.start_run(cfg):  # a row in the experiment that says why it has no numbers
            mlflow.set_tags({tracking.SKIPPED_TAG: str(missing)})
        return {}
    data_print = fingerprint(cfg.data.root, task)
    cache = StageCache(Path(cfg.paths.cache_dir).resolve())
    if distributed.is_worker(cfg.hardware):
        return run_worker(ctx, chain, cache, data_print)
    provided: dict[str, tuple[Path, str]] = {}
    results: dict[str, dict[str, float]] = {}
    with tracking.start_run(cfg) as active, distributed.leading(cache.root, cfg.hardware) as decisions:
        ctx = replace(ctx, logger=tracking.lightning_logger(cfg))  # training logs into this run
        for name, stage in zip(cfg.stages, chain):
            inputs = {need: provided[need] for need in stage.uses(cfg)}
            payload = stage_payload(cfg, name, stage, data_print, inputs)
            if not stage.CACHED:  # a measurement (timings): taken afresh in every run
                payload["run"] = active.info.run_id
            key = cache_key(payload)
            log.info("stage %s: started", name)
            started = time.perf_counter()
            folder, hit = run_cached(cache, name, key, stage, ctx, inputs, payload, active.info.run_id, decisions)
            check_stopped()  # a stop signal the stage's libraries swallowed: the run must not end FINISHED
            metrics = json.loads((folder / METRICS_FILE).read_text())
            print(
                f"stage {name}: {'from the cache' if hit else 'ran'} in {minutes(time.perf_counter() - started)}"
                f"{headline(stage, metrics)}",
                flush=True,
            )
            mlflow.log_metrics({f"{name}/{k}": float(v) for k, v in metrics.items()})
            mlflow.set_tags({f"cache.{name}": "hit" if hit else "miss", f"cache.{name}.path": str(folder)})
            log_stage_artifacts(folder, name, cfg.mlflow.log_models)
            results[name] = {k: float(v) for k, v in metrics.items()}
            log.debug("stage %s metrics: %s", name, metrics)
            record_output(provided, stage, folder, key)
        if cfg.mlflow.serve_model and "onnx" in provided:
            serving.log_served_model(provided["onnx"][0], cfg, provided.get("pick", (None,))[0])
        check_stopped()
        print(summary(cfg, results, active.info.run_id), flush=True)
    return {f"{name}/{k}": v for name, metrics in results.items() for k, v in metrics.items()}


def stage_payload(cfg: DictConfig, name: str, stage, data_print: str, inputs: dict[str, tuple[Path, str]]) -> dict:
    """What a stage's cache key hashes: its code, the libraries, its config, the data, its inputs' keys and, for a
    stage whose output depends on the CPU (`machine_facts`), those facts."""
    facts = stage.machine_facts(cfg) if hasattr(stage, "machine_facts") else {}
    return ({"machine": facts} if facts else {}) | {
        "stage": name,
        "version": stage.VERSION,
        "code": code_fingerprint(*stage_modules(name, stage, cfg)),
        "libraries": library_versions(),
        "config": {key: hashed(OmegaConf.select(cfg, key)) for key in stage.CONFIG_KEYS},
        "data": data_print,
        "inputs": {need: key for need, (_, key) in inputs.items()},
    }


WORKER_WAIT = 1800.0  # seconds a DDP worker waits for rank 0 to start an entry (torch's own collective timeout)


def run_worker(ctx: StageContext, chain: list[Stage], cache: StageCache, data_print: str) -> dict[str, float]:
    """A DDP rank other than 0: for each stage up to the last training stage it waits for rank 0's decision,
    joins the fit of each training stage rank 0 builds (its own copy of the output is thrown away) and reads
    the entries rank 0 writes or reads; never its own cache lookup, which may differ from rank 0's (another job
    may be building the entry). The stages after the last training stage run on rank 0 alone. It writes no cache
    entry and no MLflow run."""
    cfg = ctx.cfg
    decisions = distributed.following(cache.root, cfg.hardware)
    trains = [i for i, stage in enumerate(chain) if stage.DISTRIBUTED]
    provided: dict[str, tuple[Path, str]] = {}
    for name, stage in list(zip(cfg.stages, chain))[: trains[-1] + 1 if trains else 0]:
        inputs = {need: provided[need] for need in stage.uses(cfg)}
        own = cache_key(stage_payload(cfg, name, stage, data_print, inputs)) if stage.CACHED else None
        action, key = decisions.wait(name, own)  # a measurement's key holds rank 0's run id: take rank 0's
        if action == distributed.BUILD and stage.DISTRIBUTED:
            with tempfile.TemporaryDirectory(prefix=f"fastformers-rank-{name}-") as scratch:
                stage.run(ctx, {need: folder for need, (folder, _) in inputs.items()}, Path(scratch))
        record_output(provided, stage, cache.wait_for(name, key, WORKER_WAIT), key)
    return {}


def record_output(provided: dict[str, tuple[Path, str]], stage, folder: Path, key: str) -> None:
    """What later stages may read: the stage's output by name, and the run's first model as its teacher."""
    if stage.PROVIDES == MODEL:
        provided.setdefault(TEACHER, (folder, key))
    if stage.PROVIDES:
        provided[stage.PROVIDES] = (folder, key)


def headline(stage: Stage, metrics: dict) -> str:
    """The few numbers of a stage worth a line on the terminal (those it names: its scores); the rest go to
    MLflow."""
    keys = [k for k in metrics if any(matches(k, pattern) for pattern in stage.HEADLINE)]
    return (": " + ", ".join(f"{k} {metrics[k]:.4g}" for k in keys)) if keys else ""


def matches(key: str, pattern: str) -> bool:
    """Whether a metric name fits a HEADLINE pattern, name by name (`*` fits any one name between slashes)."""
    names, wanted = key.split("/"), pattern.split("/")
    return len(names) == len(wanted) and all(w in ("*", n) for n, w in zip(names, wanted))


def summary(cfg: DictConfig, results: dict[str, dict[str, float]], run_id: str) -> str:
    """What the user reads last: what the stages show of their metrics (the scores, the benchmark's pick),
    where the run is in MLflow, how to open it, where the files are."""
    uri = tracking.tracking_uri(cfg)
    lines = ["", "== fastformers: done"]
    for name in stages.in_chain_order(results):
        lines += get_stage(name).summary(results[name])
    lines += [
        f"MLflow run {run_id} in experiment '{cfg.mlflow.experiment_name}' ({uri})",
        f"look at it: mlflow ui --backend-store-uri {uri}   (then http://127.0.0.1:5000)"
        if uri.startswith("sqlite:")
        else f"look at it: {uri}",
        f"outputs: {Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else cfg.paths.output_dir}"
        f" (this run), {Path(cfg.paths.cache_dir).resolve()} (stage cache)",
    ]
    return "\n".join(lines)


def stage_modules(name: str, stage, cfg: DictConfig) -> list[str]:
    """The modules whose code makes a stage's output: its own (with what it imports) and, for stages keyed by
    `engines`, the engine classes the config names (loaded by name, so no import leads to them)."""
    modules = [f"fastformers.stages.{name}"]
    if "engines" in stage.CONFIG_KEYS:
        modules += [str(spec["_target_"]).rsplit(".", 1)[0] for spec in cfg.engines.values() if "_target_" in spec]
    return modules


def minutes(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def hashed(node):
    """A config node as its cache key sees it: resolved, with output-neutral training settings fixed."""
    value = plain(node)
    if isinstance(value, dict) and "progress_bar" in value:
        value = value | OUTPUT_NEUTRAL
    return value


def plain(node):
    """A resolved plain value of a config node, for hashing."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def main_metric(cfg: DictConfig, results: dict[str, float]) -> float | None:
    """The task's official score on its eval split, the number sweepers optimise."""
    return results.get(f"evaluate/{split_label(cfg.task.eval_split)}/score")


def objectives(cfg: DictConfig, results: dict[str, float]) -> float | tuple[float, ...] | None:
    """What the job returns to its sweeper: `sweep_objectives`, one value or a tuple (multi-objective);
    None for a run without an evaluate score when only `score` is asked (the basic sweeper ignores it)."""
    if list(cfg.sweep_objectives) == ["score"]:
        return main_metric(cfg, results)
    values = []
    for name in cfg.sweep_objectives:
        value = main_metric(cfg, results) if name == "score" else results.get(name)
        if value is None:
            raise FastformersError(
                f"sweep_objectives: {name!r} was not measured by this run's stages (have e.g. {sorted(results)[:6]})"
            )
        values.append(value)
    return values[0] if len(values) == 1 else tuple(values)


def run_cached(
    cache: StageCache,
    name: str,
    key: str,
    stage: Stage,
    ctx: StageContext,
    inputs,
    payload,
    run_id: str,
    decisions: distributed.Decisions | None = None,
):
    """The stage's cache entry, built now unless an intact one exists or another job is building it (then it
    waits and reads theirs); returns (folder, was_cached). Under DDP, `decisions` tells the other ranks which it
    is before anything is done, so that they join exactly the fits rank 0 runs."""
    with cache.claimed(name, key) as mine:
        if decisions is not None:
            decisions.publish(name, key, distributed.BUILD if mine else distributed.READ)
        if not mine:
            return cache.entry(name, key), True
        with cache.build(name, key, {"payload": payload, "built_by_run": run_id}) as scratch:
            metrics = stage.run(ctx, {need: folder for need, (folder, _) in inputs.items()}, scratch)
            (scratch / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return cache.entry(name, key), False


def log_stage_artifacts(folder: Path, stage: str, log_models: bool) -> None:
    """Small outputs (metrics, predictions, submissions) always; model weights only when asked."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and (log_models or "model" not in path.relative_to(folder).parts[:1]):
            parent = path.relative_to(folder).parent
            mlflow.log_artifact(str(path), f"{stage}/{parent}" if str(parent) != "." else stage)
