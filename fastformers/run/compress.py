"""Compress to a budget (`fastformers experiment=compress task=cb`): an Optuna search over student shapes (depth,
which teacher layers seed it, heads and FFN neurons kept), each trial the existing stages run with the trial's
overrides (the teacher is a cache hit from the second trial on), two objectives (the task score up, multiply-adds
per example down) under the budget as constraints; then the fewest multiply-adds within the budget, confirmed on a
held-out slice of train that no model trained on, saved as a folder plain transformers loads.

The study lives beside MLflow's store (SQLite, or Optuna's journal file on shared disks), so a stopped search
resumes without repeating finished trials; a trial killed mid-run is failed by its stale heartbeat and retried.
"""

from __future__ import annotations

import copy
import fcntl
import functools
import itertools
import json
import logging
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import optuna
from hydra.core.hydra_config import HydraConfig
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, open_dict
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from fastformers.bench import gate
from fastformers.bench.analysis import labelled_sample
from fastformers.bench.paper import NAME as PAPER_ROW
from fastformers.bench.paper import PAPER_MAC_REDUCTION, PAPER_SPEEDUP
from fastformers.bench.roofline import Shape, gmacs_per_example
from fastformers.checks import require_number
from fastformers.data.loading import DataSource, EncodedDataset, holdout_split, split_label
from fastformers.data.task_config import task_of
from fastformers.errors import FastformersError, stop_signal
from fastformers.run import pipeline
from fastformers.tracking import compress_report
from fastformers.tracking import runs as tracking
from fastformers.tracking.report import experiment_runs, pareto

log = logging.getLogger(__name__)

SEEDINGS = ("bottom", "every_other")  # which teacher layers a student of n layers copies
DISTILL_AXIS = "distill."  # a space dimension that sets a distill key (compress.space.distill) is named distill.<key>
DIRECTIONS = {"score": StudyDirection.MAXIMIZE, "gmacs": StudyDirection.MINIMIZE, "latency_ms": StudyDirection.MINIMIZE}
STUDENT_STAGES = ("distill", "prune")  # what a trial adds to the teacher's stages
TIMING_STAGE = "benchmark"
# what a trial's result depends on beside its point: a study resumes only with the values it started with
TRIAL_SETTINGS = ("stages", "seed", "data", "task", "teacher", "finetune", "distill", "pruning", "precision", "export",
                  "evaluate", "engines")  # fmt: skip
MODEL_STAGES = ("prune", "distill", "finetune", "teacher")  # the last of these a run has holds its model
ROLE = "compress"


@dataclass
class Point:
    """What one run of the stages left: its eval score, the model's shape and multiply-adds, where it is."""

    score: float
    gmacs: float
    shape: dict
    folder: Path  # the model folder (config.json, weights, tokenizer)
    run_id: str
    latency_ms: float | None = None
    mb: float | None = None
    results: dict = field(default_factory=dict)
    predictions: list[int] = field(default_factory=list)  # on the eval split, in its file order
    gate: dict = field(default_factory=dict)  # the gate's score test against the teacher (gate_test)


# ---- the config ---------------------------------------------------------------------------------------------


def validate(cfg: DictConfig) -> None:
    """The compress node's checks, before any model is trained."""
    opts = cfg.compress
    require_number(cfg, "compress.max_drop", 0, meaning="points of the task score a student may lose")
    require_number(cfg, "compress.trials", 1, integer=True)
    require_number(cfg, "compress.timeout_minutes", 0, lo_open=True)
    require_number(cfg, "compress.holdout", 0, 1, lo_open=True, hi_open=True, meaning="the share of train held out")
    require_number(cfg, "compress.latency_ms", 0, lo_open=True, null="no latency budget")
    require_number(cfg, "compress.max_mb", 0, lo_open=True, null="no size budget")
    require_number(cfg, "compress.confirm_candidates", 1, integer=True, null="every candidate within the budget")
    require_number(cfg, "compress.max_misses", 1, integer=True)
    for key in ("time_front", "paper_baseline", "gate", "monotone"):
        if not isinstance(opts[key], bool):
            raise FastformersError(f"compress.{key}={opts[key]!r} must be true or false")
    if not all(isinstance(seed, int) for seed in opts.seeds):
        raise FastformersError(f"compress.seeds={list(opts.seeds)}: whole numbers (the chosen point's other seeds)")
    require_number(cfg, "compress.heartbeat_seconds", 1, integer=True)
    objectives = list(opts.objectives)
    if not objectives or objectives[0] != "score" or not set(objectives) <= set(DIRECTIONS):
        raise FastformersError(
            f"compress.objectives={objectives}: 'score' first, then any of {sorted(set(DIRECTIONS) - {'score'})}"
        )
    if opts.holdout_from not in HOLDOUT_FROM:
        raise FastformersError(f"compress.holdout_from={opts.holdout_from!r}: one of {list(HOLDOUT_FROM)}")
    require_number(cfg, "compress.small_train", 0, integer=True)
    if opts.storage not in ("sqlite", "journal"):
        raise FastformersError(f"compress.storage={opts.storage!r}: sqlite (one machine) or journal (shared disks)")
    space = opts.space
    for key in ("layers", "seeding", "heads", "ffn"):
        if not space.get(key):
            raise FastformersError(f"compress.space.{key} is empty: list at least one value")
    if not all(isinstance(n, int) and n >= 1 for n in space.layers):
        raise FastformersError(f"compress.space.layers={list(space.layers)}: whole numbers of layers, at least 1")
    if not set(space.seeding) <= set(SEEDINGS):
        raise FastformersError(f"compress.space.seeding={list(space.seeding)}: choose from {list(SEEDINGS)}")
    for axis in ("heads", "ffn"):
        if not all(isinstance(v, (int, float)) and 0 < v <= 1 for v in space[axis]):
            raise FastformersError(f"compress.space.{axis}={list(space[axis])}: fractions kept, in (0, 1]")
    for key, values in (space.get("distill") or {}).items():
        if key not in cfg.distill:
            raise FastformersError(f"compress.space.distill.{key}: not a distill setting (conf/config.yaml distill:)")
        if not isinstance(values, Sequence) or isinstance(values, str) or not values:
            raise FastformersError(f"compress.space.distill.{key}={values!r}: a list of at least one value")
    missing = [stage for stage in STUDENT_STAGES if stage not in cfg.stages]
    if missing:
        raise FastformersError(f"stages={list(cfg.stages)}: compress needs {missing} (each trial distils and prunes)")


def measures_latency(cfg: DictConfig) -> bool:
    """A latency budget or objective needs the benchmark stage in every trial (it costs time: off otherwise)."""
    return cfg.compress.latency_ms is not None or "latency_ms" in cfg.compress.objectives


HOLDOUT_FROM = ("auto", "train", "eval", "test")


def with_holdout(cfg: DictConfig) -> tuple[DictConfig, str]:
    """A copy of the config that keeps the held-out slice away from every training and every choice made on the
    eval split (for every stage, the teacher's included, so the teacher's key is the same in every trial), and the
    slice's spec: a seeded `compress.holdout` share of train; or, where train is too small to spare it (auto:
    under `compress.small_train` examples; CB has 250), the seeded second half of the eval split, the first half
    then ranking the trials and picking every model's best epoch; or a labelled test split of the user's."""
    source = holdout_source(cfg)
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        if source == "test":
            return cfg, "test"
        if source == "eval":
            ranked, held_out = holdout_split(cfg.task.eval_split, 0.5, "task.eval_split")
            cfg.task.eval_split = ranked
            return cfg, held_out
        kept, held_out = holdout_split(cfg.task.train_split, cfg.compress.holdout, "task.train_split")
        cfg.task.train_split = kept
    return cfg, held_out


def holdout_source(cfg: DictConfig) -> str:
    """compress.holdout_from, with auto decided by the size of train (a small train cannot spare a slice: the
    teacher trained without it is worse, and so is every student)."""
    source = cfg.compress.holdout_from
    if source != "auto":
        return source
    train = DataSource.of(cfg, task_of(cfg)).examples(cfg.task.train_split)
    return "eval" if len(train) < cfg.compress.small_train else "train"


def teacher_cfg(cfg: DictConfig) -> DictConfig:
    """The teacher's run: the stages without the student's and the timing (the teacher given as a folder gets
    its `teacher` stage from the pipeline, as in any run without finetune)."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.stages = [s for s in cfg.stages if s not in (*STUDENT_STAGES, TIMING_STAGE)]
        cfg.student = {"name": "none", "family": None}  # conf/student/none.yaml: the run's name says "teacher alone"
    return cfg


def seeded_layers(layers: int, teacher_depth: int, seeding: str) -> list[int]:
    """The teacher layers (0-based) a student of `layers` copies: the bottom ones, or spread evenly with the top
    one kept (every other layer at half depth: MiniLM-L6 -> [1, 3, 5], conf/student/minilm_l3.yaml)."""
    if layers > teacher_depth:
        raise FastformersError(f"compress.space.layers: {layers} layers but the teacher has {teacher_depth}")
    if seeding == "bottom":
        return list(range(layers))
    return [round((i + 1) * teacher_depth / layers) - 1 for i in range(layers)]


def trial_cfg(cfg: DictConfig, params: dict, teacher_depth: int) -> DictConfig:
    """The run of one point of the space: the student and pruning nodes (and stages) replaced, nothing the
    teacher's cache key reads changed."""
    layers = seeded_layers(params["layers"], teacher_depth, params["seeding"])
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.student = {
            "name": f"l{params['layers']}_{params['seeding']}",
            "family": cfg.teacher.family,
            "init": "teacher_layers",
            "layers": layers,
            "pretrained": None,
            "arch": {},
            "activation": cfg.compress.get("activation", "gelu"),
        }
        cfg.pruning.name = f"h{params['heads']}_f{params['ffn']}"
        cfg.pruning.heads = float(params["heads"])
        cfg.pruning.ffn = float(params["ffn"])
        for name, value in params.items():
            if name.startswith(DISTILL_AXIS):
                cfg.distill[name.removeprefix(DISTILL_AXIS)] = value
        if measures_latency(cfg) and TIMING_STAGE not in cfg.stages:
            cfg.stages = [*cfg.stages, TIMING_STAGE]
    return cfg


def axes(space: DictConfig, teacher_depth: int) -> dict[str, list]:
    """The values of each dimension of the space (depths beyond the teacher's are left out of it)."""
    depths = [n for n in space.layers if n <= teacher_depth]
    if not depths:
        raise FastformersError(
            f"compress.space.layers={list(space.layers)}: none fits the {teacher_depth}-layer teacher"
        )
    return {
        "layers": depths,
        "seeding": list(space.seeding),
        "heads": [float(v) for v in space.heads],
        "ffn": [float(v) for v in space.ffn],
    } | {DISTILL_AXIS + key: list(values) for key, values in (space.get("distill") or {}).items()}


def space_points(space: DictConfig, teacher_depth: int) -> list[dict]:
    """Every point of the space (each dimension's values crossed)."""
    values = axes(space, teacher_depth)
    return [dict(zip(values, point)) for point in itertools.product(*values.values())]


def point_gmacs(teacher: Shape, token_lengths: Sequence[int], params: dict) -> float:
    """A point's multiply-adds per example before it is trained: the teacher's shape at the point's depth with its
    shares of heads and neurons kept (what the search skips points by; a trial's own figure is its model's)."""
    heads = max(1, round(teacher.heads * params["heads"]))
    ffn = max(1, round(teacher.ffn * params["ffn"]))
    shape = Shape(params["layers"], teacher.hidden, heads, teacher.head_size, ffn)
    return gmacs_per_example(shape, token_lengths)


def suggest(trial: optuna.Trial, space: DictConfig, teacher_depth: int) -> dict:
    """A point of the space, drawn by the study's sampler."""
    return {name: trial.suggest_categorical(name, values) for name, values in axes(space, teacher_depth).items()}


# ---- one point: the stages, then what the budget reads --------------------------------------------------------


def run_point(cfg: DictConfig, token_lengths: Sequence[int] | None = None) -> Point:
    """Runs the stages of `cfg` (the pipeline: cached stages are hits) and reads back score, shape and size."""
    results = pipeline.run(cfg)
    run = mlflow.last_active_run()
    if run is None:
        raise FastformersError("compress: the pipeline left no MLflow run to read the trial from")
    stage = next(name for name in (*MODEL_STAGES,) if name in cfg.stages)
    folder = Path(run.data.tags[f"cache.{stage}.path"]) / "model"
    score = pipeline.main_metric(cfg, results)
    if score is None:
        raise FastformersError(f"compress: the run has no score on {cfg.task.eval_split}: keep the evaluate stage")
    shape = shape_of(folder)
    lengths = token_lengths if token_lengths is not None else eval_token_lengths(cfg, folder)
    latency = results.get(f"benchmark/{cfg.compress.latency_row}/latency_p50_ms")
    return Point(
        score=score,
        gmacs=gmacs_per_example(shape, lengths),
        shape=shape.__dict__,
        folder=folder,
        run_id=run.info.run_id,
        latency_ms=latency,
        mb=weights_mb(folder),
        results=results,
        predictions=predictions_of(run, cfg.task.eval_split),
    )


def predictions_of(run, split: str) -> list[int]:
    """A run's predictions on `split`, in the split's file order (the evaluate stage's file in its cache entry)."""
    path = Path(run.data.tags["cache.evaluate.path"]) / f"predictions_{split_label(split)}.jsonl"
    return [json.loads(line)["prediction"] for line in path.read_text().splitlines() if line]


def shape_of(folder: Path) -> Shape:
    """The model's real shape (kept heads and neurons of a pruned one) from its config.json."""
    from transformers import AutoConfig

    return Shape.of(AutoConfig.from_pretrained(str(folder)))


def eval_token_lengths(cfg: DictConfig, folder: Path) -> list[int]:
    """Tokens of each eval example as a batch of its own kind runs it (every student shares the teacher's
    tokenizer, so the teacher's counts hold for all)."""
    from transformers import AutoTokenizer

    examples = DataSource.of(cfg, task_of(cfg)).examples(cfg.task.eval_split)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return EncodedDataset(examples, tokenizer, cfg.task.max_seq_length).lengths()


def gate_test(cfg: DictConfig, sample, student: Sequence[int], teacher: Sequence[int]) -> dict[str, float]:
    """The benchmark gate's score test of a student against its teacher on the eval split (bench/gate.py, with
    benchmark.gate's permutations and seed): the one-sided p of a loss, and the score delta with its paired
    bootstrap interval, in points."""
    opts = cfg.benchmark.gate
    p, differing = gate.randomization_p(sample.score, student, teacher, sample.units, opts.permutations, opts.seed)
    delta, lo, hi = gate.bootstrap_delta(sample.score, student, teacher, sample.units, opts.bootstrap, opts.seed)
    return {
        "gate_p": p,
        "differing_units": float(differing),
        "delta_points": 100 * delta,
        "delta_lo_points": 100 * lo,
        "delta_hi_points": 100 * hi,
    }


def weights_mb(folder: Path) -> float:
    """The model's weights on disk (what a size budget bounds), in MB."""
    files = list(folder.glob("*.safetensors")) or list(folder.glob("*.bin"))
    return sum(path.stat().st_size for path in files) / 1e6


# ---- the budget ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """What a student must keep: at most `max_drop` points of the teacher's score lost on the eval split (the point
    estimate: the gate's paired test alone has little power on a 56-example dev set and would pass students a
    budget should refuse), the gate's score test not finding a loss (`alpha`, with compress.gate), and
    optionally a latency and a size."""

    teacher_score: float
    max_drop: float
    latency_ms: float | None = None
    max_mb: float | None = None
    alpha: float | None = None  # also: the gate's score test must not find a loss with p < alpha

    def constraints(self, attrs: dict) -> dict[str, float]:
        """Optuna's constraint values (feasible when all are <= 0), from a trial's recorded measurements."""
        values = {"score_drop": 100 * (self.teacher_score - attrs["score"]) - self.max_drop}
        if self.latency_ms is not None:
            latency = attrs.get("latency_ms")
            values["latency_ms"] = float("inf") if latency is None else latency - self.latency_ms
        if self.max_mb is not None:
            values["mb"] = attrs["mb"] - self.max_mb
        if self.alpha is not None:
            values["gate"] = self.alpha - attrs.get("gate_p", -float("inf"))
        return values

    def keeps(self, attrs: dict) -> bool:
        """Judged again from the measurements (not the constraints stored with the trial), so a re-run with a
        changed budget judges the earlier trials by the new one."""
        return all(value <= 0 for value in self.constraints(attrs).values())


def choose(trials: Sequence[FrozenTrial], budget: Budget, confirm: Callable[[FrozenTrial], bool], limit: int):
    """The fewest multiply-adds among finished trials within the budget (the better score breaks a tie), confirmed
    on the held-out slice; when it fails there, the next smallest, up to `limit` tries. Returns (trial or None,
    the trials tried)."""
    within = [t for t in trials if t.state == TrialState.COMPLETE and budget.keeps(t.user_attrs)]
    ranked = sorted(within, key=lambda t: (t.user_attrs["gmacs"], -t.user_attrs["score"]))
    tried = []
    for trial in ranked[:limit]:
        tried.append(trial)
        if confirm(trial):
            return trial, tried
    return None, tried


# ---- the study -------------------------------------------------------------------------------------------------


def storage_of(cfg: DictConfig):
    """SQLite beside MLflow's store, with heartbeats (a killed trial goes stale, fails, and is retried); or
    Optuna's journal file where SQLite is unsafe (shared disks: no heartbeats there, see docs/recipes.md)."""
    out = Path(cfg.paths.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.compress.storage == "journal":
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(out / "optuna.journal")))
    interval = int(cfg.compress.heartbeat_seconds)
    with warnings.catch_warnings():  # "experimental since 2.8": the callback Optuna's docs name for exactly this
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=cfg.compress.max_retry)
    return optuna.storages.RDBStorage(
        f"sqlite:///{out / 'optuna.db'}",
        heartbeat_interval=interval,
        grace_period=2 * interval,
        heartbeat_stale_trial_callback=retry,
    )


def open_study(cfg: DictConfig, storage=None) -> optuna.Study:
    """The search's study, created or (same name) resumed; NSGA-II ranks feasible trials (the constraints each
    trial records, `Trial.set_constraint`) before infeasible ones. The sampler's seed is offset by the trials
    the study already holds: a resumed search seeded as the first run would draw the first run's points again."""
    study = optuna.create_study(
        study_name=str(cfg.compress.study_name),
        storage=storage if storage is not None else storage_of(cfg),
        directions=[DIRECTIONS[name] for name in cfg.compress.objectives],
        load_if_exists=True,
    )
    check_settings(study, trial_settings(cfg))
    study.sampler = optuna.samplers.NSGAIISampler(
        population_size=cfg.compress.population_size, seed=cfg.compress.seed + len(study.trials)
    )
    return study


def trial_settings(cfg: DictConfig) -> dict[str, object]:
    """What every trial's result depends on beside its point (dotted keys): a study resumed with other values would
    rank students trained or scored differently against each other."""
    return flatten({key: pipeline.hashed(cfg[key]) for key in TRIAL_SETTINGS if key in cfg})  # as cache keys see them


def flatten(tree: object, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} as {"a.b": 1}: a changed setting is then named by its full key."""
    if isinstance(tree, dict) and tree:
        return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix.removesuffix("."): tree}


def check_settings(study: optuna.Study, settings: dict[str, object]) -> None:
    """Records the settings with a new study; refuses to resume one started with other values (one line, the first
    key that differs). A study from before the record gets this run's."""
    now = json.loads(json.dumps(settings, default=str))  # as the study stores them: JSON, paths as text
    recorded = study.user_attrs.get("settings")
    if recorded is None:
        study.set_user_attr("settings", now)
        return
    changed = sorted(key for key in recorded.keys() | now.keys() if recorded.get(key) != now.get(key))
    if changed:
        key = changed[0]
        raise FastformersError(
            f"{key}={now.get(key)!r}, but study {study.study_name!r} was started with {recorded.get(key)!r}"
            f" ({len(changed)} setting(s) differ): restore it, or start a new study with compress.study_name=..."
        )


def completed(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def search(
    cfg: DictConfig,
    study: optuna.Study,
    evaluate: Callable[[dict, int], Point],
    budget: Budget,
    deadline: float,
    teacher_depth: int,
    cost: Callable[[dict], float],
) -> list[FrozenTrial]:
    """Runs trials until `compress.trials` have finished (counting those of earlier runs of the same study) or the
    wall-clock deadline passes (Optuna starts no trial after it; the running one ends). A point a finished trial
    already settles (the same point, which NSGA-II draws again in a small categorical space, or, with
    compress.monotone, one its verdict implies: `settled_by`, with `cost` a point's multiply-adds) is pruned, not
    counted, and an unsettled point is run in its place: every finished trial is a new shape that could move the
    choice. A trial whose stages refuse its point (FastformersError) is recorded FAILED and the search goes on."""
    remaining = cfg.compress.trials - len(completed(study))
    seconds = deadline - time.monotonic()
    if not study.trials:
        for point in covering_points(cfg.compress.space, teacher_depth, cfg.compress.seed):
            study.enqueue_trial(point)
    if remaining > 0 and seconds > 0:
        points = space_points(cfg.compress.space, teacher_depth)
        implied = cost if cfg.compress.monotone else None  # settled_by: without a cost, repeats only

        def objective(trial: optuna.Trial) -> tuple[float, ...]:
            params = suggest(trial, cfg.compress.space, teacher_depth)
            settled = settled_by(completed(study), params, budget, implied)
            if settled is not None:
                earlier, why = settled
                trial.set_user_attr("settled_by", earlier)
                fresh = unvisited_point(study, points, budget, implied, cfg.compress.seed + trial.number)
                if fresh is not None:
                    study.enqueue_trial(fresh)
                raise optuna.TrialPruned(f"{why}; next: {fresh or 'none left'}")
            point = evaluate(params, trial.number)
            for key in ("score", "gmacs", "latency_ms", "mb", "run_id", "shape"):
                trial.set_user_attr(key, getattr(point, key))
            trial.set_user_attr("folder", str(point.folder))
            for key, value in point.gate.items():
                trial.set_user_attr(key, value)
            for name, value in budget.constraints(trial.user_attrs).items():
                trial.set_constraint(name, value)
            return tuple(_objective_value(point, name) for name in cfg.compress.objectives)

        study.optimize(
            objective,
            timeout=seconds,
            catch=(FastformersError,),
            callbacks=[
                optuna.study.MaxTrialsCallback(cfg.compress.trials, states=(TrialState.COMPLETE,)),
                StopAfterMisses(cfg.compress.max_misses),
            ],
        )
    elif remaining <= 0:
        print(f"compress: the study already has {len(completed(study))} finished trials: none to run", flush=True)
    return completed(study)


def covering_points(space: DictConfig, teacher_depth: int, seed: int) -> list[dict]:
    """A new study's first points: every value of every dimension in at least one of them (a Latin design, as
    many points as the longest dimension has values). NSGA-II's first generation is drawn at random and later ones
    mostly recombine it, so a depth the first draws missed was left out of whole searches (CB, seed 0: no 3-layer
    student in 12 trials)."""
    values = axes(space, teacher_depth)
    size = max(len(v) for v in values.values())
    draw = random.Random(seed)
    columns = {}
    for name, options in values.items():
        column = [options[i % len(options)] for i in range(size)]
        draw.shuffle(column)
        columns[name] = column
    # distinct points: the longest dimension's column holds each of its values once
    return [{name: column[i] for name, column in columns.items()} for i in range(size)]


SIZE_AXES = ("layers", "heads", "ffn")  # the dimensions whose larger values keep more of the teacher


def settled_by(
    trials: Sequence[FrozenTrial], params: dict, budget: Budget, cost: Callable[[dict], float] | None
) -> tuple[int, str] | None:
    """(trial number, why) when a finished trial's verdict already settles `params`: the same point; or, given the
    points' `cost` (compress.monotone), a point of the same seeding and distill settings that keeps no more layers,
    heads and neurons than a trial that lost too much score (it would lose as much: on CB 8 of 12 trials were
    1-2-layer students at the majority score) or no fewer than one over the latency or size budget, or any point
    that costs more multiply-adds than a trial within the budget (it cannot be the smallest). Judged by the budget
    of this run, from each trial's measurements."""
    for trial in trials:
        if trial.params == params:
            return trial.number, f"the point of trial {trial.number} again"
        if cost is None:
            continue
        constraints = budget.constraints(trial.user_attrs)
        loses_score = constraints["score_drop"] > 0 or constraints.get("gate", 0) > 0
        over_cost = constraints.get("latency_ms", 0) > 0 or constraints.get("mb", 0) > 0
        alike = all(trial.params.get(k) == v for k, v in params.items() if k not in SIZE_AXES)
        if alike and loses_score and all(params[k] <= trial.params[k] for k in SIZE_AXES):
            return trial.number, f"no larger than trial {trial.number}, which lost more than the budget allows"
        if alike and over_cost and all(params[k] >= trial.params[k] for k in SIZE_AXES):
            return trial.number, f"no smaller than trial {trial.number}, which is over the latency or size budget"
        if not (loses_score or over_cost) and cost(params) > cost(trial.params):
            return trial.number, f"more multiply-adds than trial {trial.number}, which is within the budget"
    return None


def unvisited_point(
    study: optuna.Study, points: list[dict], budget: Budget, cost: Callable[[dict], float] | None, seed: int
) -> dict | None:
    """One of `points` no trial has run, runs or waits to run, and no finished trial settles (`settled_by` with
    `cost`): what a settled point is replaced with, so a sampler that keeps proposing its parents (NSGA-II on a
    small categorical space) still explores where the choice can move. With a cost (compress.monotone), the one of
    median cost (when it fits the budget, every costlier point is settled; when it loses, the smaller ones of its
    seeding); without, one drawn with `seed`. None when none is left."""
    taken = [t.params or t.system_attrs.get("fixed_params", {}) for t in study.get_trials(deepcopy=False)]
    finished = completed(study)
    fresh = [p for p in points if p not in taken and settled_by(finished, p, budget, cost) is None]
    if not fresh:
        return None
    if cost is None:
        return random.Random(seed).choice(fresh)
    random.Random(seed).shuffle(fresh)  # points of equal cost: the seed picks
    return sorted(fresh, key=cost)[len(fresh) // 2]


class StopAfterMisses:
    """Stops the study after `limit` trials in a row that did not finish (repeats of finished points, refused
    points): a space the sampler has exhausted ends the search instead of spinning until the deadline."""

    def __init__(self, limit: int):
        self.limit = limit
        self.misses = 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.misses = 0 if trial.state == TrialState.COMPLETE else self.misses + 1
        if self.misses >= self.limit:
            print(f"compress: {self.misses} trials in a row repeated or failed: the space is spent", flush=True)
            study.stop()


def _objective_value(point: Point, name: str) -> float:
    value = getattr(point, name)
    if value is None:
        raise FastformersError(f"compress.objectives: {name!r} was not measured (the benchmark stage gives it)")
    return float(value)


# ---- the command -------------------------------------------------------------------------------------------------


def run(cfg: DictConfig) -> dict[str, float]:
    """`experiment=compress`: the teacher, the search, the honest choice, the chosen folder and the speed-up line."""
    validate(cfg)
    started = time.monotonic()
    deadline = started + 60 * cfg.compress.timeout_minutes
    with one_search(cfg):
        cfg, held_out = with_holdout(cfg)
        uri = tracking.tracking_uri(cfg)
        parent = start_parent(cfg, uri)
        status = "FAILED"
        try:
            summary = compress(cfg, held_out, deadline, parent)
            status = "FINISHED"
            return summary
        except BaseException as err:
            status = "KILLED" if stop_signal(err) is not None else "FAILED"
            raise
        finally:
            os.environ.pop(tracking.PARENT_ENV, None)
            tracking.write_end(uri, parent, status)


@contextmanager
def one_search(cfg: DictConfig) -> Iterator[None]:
    """With the SQLite study, one search at a time per output folder (an flock the kernel drops with the process):
    a second one here is a kill that missed, and would race the first for the same trials and timings. Several
    workers share a study on purpose through the journal storage (and an MLflow server), which this does not lock."""
    if cfg.compress.storage != "sqlite":
        yield
        return
    out = Path(cfg.paths.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with (out / "optuna.db.lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FastformersError(
                f"compress: another search is running from {out} (it holds {out / 'optuna.db.lock'}): wait for it "
                "to end, or give this one its own paths.output_dir"
            ) from None
        yield


def compress(cfg: DictConfig, held_out: str, deadline: float, parent: str) -> dict[str, float]:
    """The teacher's run first (its score sets the budget, its depth the space, its predictions the gate's
    reference), then the trials, the held-out checks of the smallest candidates, the timing of the front and the
    chosen student's other training seeds."""
    client = MlflowClient(tracking.tracking_uri(cfg))
    teacher = run_point(teacher_cfg(cfg))
    lengths = eval_token_lengths(cfg, teacher.folder)
    depth = teacher.shape["layers"]
    alpha = cfg.benchmark.gate.alpha if cfg.compress.gate else None
    budget = Budget(teacher.score, cfg.compress.max_drop, cfg.compress.latency_ms, cfg.compress.max_mb, alpha)
    task = task_of(cfg)
    source = DataSource.of(cfg, task)
    sample = labelled_sample(task, source.examples(cfg.task.eval_split))
    study = open_study(cfg)
    cost = functools.partial(point_gmacs, Shape(**teacher.shape), lengths)

    def evaluate(params: dict, number: int) -> Point:
        point = run_point(trial_cfg(cfg, params, depth), lengths)
        point.gate = gate_test(cfg, sample, point.predictions, teacher.predictions)
        log_trial(client, point, params, budget, number)
        return point

    trials = search(cfg, study, evaluate, budget, deadline, depth, cost)
    holdout = HoldOut(
        held_out, labelled_sample(task, source.examples(held_out)), *holdout_point(cfg, held_out, None, depth)
    )
    confirmations: dict[int, Confirmation] = {}

    def confirm(trial: FrozenTrial) -> bool:
        confirmations[trial.number] = confirm_on_holdout(cfg, holdout, trial, depth, budget)
        return confirmations[trial.number].passed

    limit = cfg.compress.confirm_candidates or len(trials)
    chosen, _ = choose(trials, budget, confirm, limit)
    front = pareto_front(trials)
    timings = time_models(cfg, client, front, chosen, depth) if cfg.compress.time_front else {}
    seeds = other_seeds(cfg, chosen, depth, teacher.folder, held_out) if chosen is not None else []
    found = Found(teacher, holdout, trials, front, chosen, confirmations, timings, seeds)
    summary = report(cfg, client, parent, budget, found)
    write_figure(cfg, client, parent)
    return summary


@dataclass(frozen=True)
class HoldOut:
    """The held-out slice: its spec, its labelled sample, and the teacher's score and predictions there."""

    split: str
    sample: gate.Labelled
    teacher_score: float
    teacher_predictions: list[int]


@dataclass(frozen=True)
class Confirmation:
    """A candidate against the teacher on the held-out slice: both the point drop (within max_drop) and the gate's
    paired score test (no loss at p < alpha, with compress.gate) must pass, as on the eval split."""

    score: float
    drop_points: float
    test: dict
    passed: bool


def side_run(cfg: DictConfig, trial: FrozenTrial | None, teacher_depth: int) -> DictConfig:
    """The run of the teacher (trial None) or a trial's student that checks or times it: the same stages (cache
    hits), without the timing stage, serving nothing (the trial's own run serves its model)."""
    run_cfg = teacher_cfg(cfg) if trial is None else trial_cfg(cfg, trial.params, teacher_depth)
    with open_dict(run_cfg):
        run_cfg.stages = [s for s in run_cfg.stages if s != TIMING_STAGE]
        run_cfg.mlflow.serve_model = False
    return run_cfg


def holdout_point(cfg: DictConfig, held_out: str, trial: FrozenTrial | None, teacher_depth: int):
    """(score, predictions) on the held-out slice of the teacher (trial None) or a trial's student: the same
    stages, all cache hits but an evaluate of the slice alone."""
    run_cfg = side_run(cfg, trial, teacher_depth)
    with open_dict(run_cfg):
        run_cfg.evaluate.splits = [held_out]
    results = pipeline.run(run_cfg)
    score = results.get(f"evaluate/{split_label(held_out)}/score")
    run = mlflow.last_active_run()
    if score is None or run is None:
        raise FastformersError(f"compress: no score on the held-out slice {held_out} (is train labelled?)")
    return score, predictions_of(run, held_out)


def confirm_on_holdout(
    cfg: DictConfig, holdout: HoldOut, trial: FrozenTrial, teacher_depth: int, budget: Budget
) -> Confirmation:
    """One candidate's held-out check, printed as it is judged."""
    score, predictions = holdout_point(cfg, holdout.split, trial, teacher_depth)
    test = gate_test(cfg, holdout.sample, predictions, holdout.teacher_predictions)
    drop = 100 * (holdout.teacher_score - score)
    passed = drop <= budget.max_drop and (budget.alpha is None or test["gate_p"] >= budget.alpha)
    print(
        f"compress: trial {trial.number} on the held-out slice {holdout.split} ({len(predictions)} examples): "
        f"{score:.4f} vs teacher {holdout.teacher_score:.4f} (drop {drop:+.2f} points, budget {budget.max_drop}; "
        f"gate p={test['gate_p']:.3g}): {'confirmed' if passed else 'not confirmed'}",
        flush=True,
    )
    return Confirmation(score, drop, test, passed)


def pareto_front(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The finished trials no other beats on both score (up) and multiply-adds (down), fewest multiply-adds first
    (the report's rule, tracking/report.pareto)."""
    rows = [Ranked(t.user_attrs["score"], t.user_attrs["gmacs"], t) for t in trials]
    return [row.trial for row in sorted(pareto(rows, "gmacs"), key=lambda row: row.gmacs)]


@dataclass
class Ranked:
    """A trial as the report's `pareto` reads a row: one task, so every score compares."""

    score: float
    gmacs: float
    trial: FrozenTrial
    task: str = ""


@dataclass(frozen=True)
class Timing:
    """One model's batch-1 p50 with the picked engine row and in PyTorch fp32 (ms), and the paper baseline's."""

    latency_ms: float | None
    torch_ms: float | None
    paper_ms: float | None = None

    @property
    def engine_gain(self) -> float | None:
        return self.torch_ms / self.latency_ms if self.torch_ms and self.latency_ms else None


def time_models(cfg, client, front: Sequence[FrozenTrial], chosen, teacher_depth: int) -> dict[int | None, Timing]:
    """Times the teacher (key None), every front trial and the chosen one (one benchmark run each: their other
    stages are cache hits; the chosen one's run also times the paper's baseline shape), and logs each trial's
    latency on its run."""
    timings: dict[int | None, Timing] = {None: time_model(cfg, None, teacher_depth)}
    for trial in [*front, *([chosen] if chosen is not None and chosen not in front else [])]:
        paper = chosen is not None and trial.number == chosen.number and cfg.compress.paper_baseline
        timings[trial.number] = timing = time_model(cfg, trial, teacher_depth, paper)
        latency = {} if timing.latency_ms is None else {"compress/latency_p50_ms": timing.latency_ms}
        note_on_trial_run(client, trial, latency, {"compress.front": "1" if trial in front else "0"})
    return timings


def note_on_trial_run(client: MlflowClient, trial: FrozenTrial, metrics: dict, tags: dict) -> None:
    """Adds to a finished trial's run; a run the store no longer has (the study outlived its MLflow store: moved,
    rebuilt) is warned about, not fatal: the study, not the store, is the search's record."""
    run_id = trial.user_attrs["run_id"]
    try:
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        for key, text in tags.items():
            client.set_tag(run_id, key, text)
    except mlflow.exceptions.MlflowException as err:
        log.warning("compress: trial %d's run %s is not in this MLflow store (%s): not updated", trial.number,
                    run_id, err.message[:200])  # fmt: skip


def time_model(cfg: DictConfig, trial: FrozenTrial | None, teacher_depth: int, paper: bool = False) -> Timing:
    """One benchmark run of the teacher (trial None) or a trial's student at batch 1 (compress.latency_row and
    compress.torch_row), with the paper's baseline shape beside it when asked."""
    run_cfg = side_run(cfg, trial, teacher_depth)
    with open_dict(run_cfg):
        run_cfg.stages = [*run_cfg.stages, TIMING_STAGE]
        run_cfg.benchmark.paper_baseline.enabled = paper
    results = pipeline.run(run_cfg)
    p50 = "benchmark/{}/latency_p50_ms"
    return Timing(
        results.get(p50.format(cfg.compress.latency_row)),
        results.get(p50.format(cfg.compress.torch_row)),
        paper_ms_per_example(results) if paper else None,
    )


def paper_ms_per_example(results: dict) -> float | None:
    """The paper baseline row's batch-1 time per example (every example padded to the same length: one cost)."""
    wall, examples = (results.get(f"benchmark/{PAPER_ROW}/{key}") for key in ("wall_seconds", "examples"))
    return 1000 * wall / examples if wall and examples else None


def other_seeds(cfg: DictConfig, chosen: FrozenTrial, teacher_depth: int, teacher_folder: Path, held_out: str):
    """The chosen point trained again with each of compress.seeds (the same teacher, given as its folder so that
    its own training seed stays): [(seed, eval score, held-out score)], the spread the chosen score comes with."""
    scores = []
    for seed in cfg.compress.seeds:
        run_cfg = side_run(cfg, chosen, teacher_depth)
        with open_dict(run_cfg):
            run_cfg.seed = int(seed)
            run_cfg.stages = [s for s in run_cfg.stages if s != "finetune"]
            run_cfg.teacher.pretrained = str(teacher_folder)
            run_cfg.evaluate.splits = [cfg.task.eval_split, held_out]
        results = pipeline.run(run_cfg)
        label, held = split_label(cfg.task.eval_split), split_label(held_out)
        scores.append((int(seed), results[f"evaluate/{label}/score"], results[f"evaluate/{held}/score"]))
    return scores


@dataclass(frozen=True)
class Found:
    """Everything the search leaves for its report."""

    teacher: Point
    holdout: HoldOut
    trials: list[FrozenTrial]
    front: list[FrozenTrial]
    chosen: FrozenTrial | None
    confirmations: dict[int, Confirmation]
    timings: dict[int | None, Timing]
    seeds: list[tuple[int, float, float]]


def start_parent(cfg: DictConfig, uri: str) -> str:
    """The search's MLflow parent run; every stage run started while it is open nests under it."""
    experiment = tracking.open_experiment(cfg)
    run = MlflowClient(uri).create_run(
        experiment,
        run_name=f"compress {cfg.task.name}/{cfg.teacher.name} {time.strftime('%Y-%m-%d %H:%M:%S')}",
        tags={tracking.ROLE_TAG: ROLE, "compress.study": str(cfg.compress.study_name)} | tracking.owner_tags(),
    )
    os.environ[tracking.PARENT_ENV] = run.info.run_id
    return run.info.run_id


def log_trial(client: MlflowClient, point: Point, params: dict, budget: Budget, number: int) -> None:
    """The trial's own numbers on its child run: shape, GMAC/ex, latency, size and the budget's verdict."""
    attrs = {"score": point.score, "latency_ms": point.latency_ms, "mb": point.mb} | point.gate
    metrics = {f"compress/{k}": v for k, v in point.gate.items()}
    metrics |= {"compress/gmacs_per_example": point.gmacs, "compress/weights_mb": point.mb or 0.0}
    metrics |= {f"compress/shape_{k}": float(v) for k, v in point.shape.items()}
    if point.latency_ms is not None:
        metrics["compress/latency_p50_ms"] = point.latency_ms
    metrics["compress/within_budget"] = float(budget.keeps(attrs))
    for key, value in metrics.items():
        client.log_metric(point.run_id, key, value)
    client.set_tag(point.run_id, "compress.params", json.dumps(params))
    client.set_tag(point.run_id, "compress.trial", str(number))


def trial_line(t: FrozenTrial, budget: Budget, found: Found) -> str:
    """One trial for the terminal: its point, score, cost, test against the teacher and where it stands."""
    a = t.user_attrs
    timing = found.timings.get(t.number)
    held = found.confirmations.get(t.number)
    return (
        f"  trial {t.number:3d} {t.params}: score {a['score']:.4f}, {a['gmacs']:.4g} GMAC/ex"
        + (f", p50 {timing.latency_ms:.2f} ms" if timing and timing.latency_ms is not None else "")
        + (
            f", vs teacher {a['delta_points']:+.1f} points [{a['delta_lo_points']:+.1f}, "
            f"{a['delta_hi_points']:+.1f}] p={a['gate_p']:.3g}"
            if "gate_p" in a
            else ""
        )
        + (" within budget" if budget.keeps(a) else "")
        + (" front" if t in found.front else "")
        + (f"; held-out {held.score:.4f} ({'confirmed' if held.passed else 'not confirmed'})" if held else "")
    )


def paper_points(cfg: DictConfig) -> dict[str, float]:
    """The paper's own two points on the multiply-add axis: its BERT-base baseline padded to its fixed length
    (conf benchmark.paper_baseline), and that divided by the paper's reduction to its final student."""
    opts = cfg.benchmark.paper_baseline
    shape = Shape(
        opts.shape.layers, opts.shape.hidden, opts.shape.heads, opts.shape.hidden // opts.shape.heads, opts.shape.ffn
    )
    baseline = gmacs_per_example(shape, [int(opts.max_length)])
    return {"paper_baseline_gmacs": baseline, "paper_student_gmacs": baseline / PAPER_MAC_REDUCTION}


def report(cfg: DictConfig, client: MlflowClient, parent: str, budget: Budget, found: Found) -> dict[str, float]:
    """Prints and logs what the search found: every trial, the front, the choice with its held-out check and
    seeds' spread, and the speed-up decomposition."""
    teacher, trials, chosen = found.teacher, found.trials, found.chosen
    within = [t for t in trials if budget.keeps(t.user_attrs)]
    lines = [
        "",
        f"== fastformers compress: {len(trials)} finished trials, {len(within)} within the budget, "
        f"{len(found.front)} on the front (teacher {cfg.task.eval_split} score {teacher.score:.4f}, "
        f"{teacher.gmacs:.4g} GMAC/ex; max_drop {budget.max_drop} points)",
        *(trial_line(t, budget, found) for t in sorted(trials, key=lambda t: t.user_attrs["gmacs"])),
    ]
    summary = {"teacher_score": teacher.score, "teacher_gmacs": teacher.gmacs, "trials": float(len(trials))}
    summary |= {"teacher_holdout_score": found.holdout.teacher_score, "within_budget": float(len(within))}
    summary |= paper_points(cfg)
    teacher_timing = found.timings.get(None)
    if teacher_timing and teacher_timing.latency_ms is not None:
        summary["teacher_latency_p50_ms"] = teacher_timing.latency_ms
    if chosen is None:
        lines.append(
            f"no model chosen: {len(found.confirmations)} candidate(s) within the budget failed the held-out check"
            if found.confirmations
            else "no model chosen: no finished trial is within the budget"
        )
    else:
        lines += chosen_lines(cfg, client, parent, found, summary)
    for key, value in summary.items():
        client.log_metric(parent, f"compress/{key}", value)
    client.set_tag(parent, "compress.max_drop", str(budget.max_drop))
    client.set_tag(parent, "compress.report", "\n".join(lines)[-4900:])
    print("\n".join(lines), flush=True)
    return summary


def chosen_lines(cfg: DictConfig, client: MlflowClient, parent: str, found: Found, summary: dict) -> list[str]:
    """The chosen model: saved, its held-out check, its seeds' spread, the decomposition and the paper's line
    (fills `summary`)."""
    chosen = found.chosen
    assert chosen is not None
    a = chosen.user_attrs
    held = found.confirmations[chosen.number]
    timing = found.timings.get(chosen.number, Timing(None, None))
    folder = save_chosen(cfg, Path(a["folder"]))
    ratio = found.teacher.gmacs / a["gmacs"]
    summary |= {"chosen_trial": float(chosen.number), "chosen_gmacs": a["gmacs"], "chosen_score": a["score"]}
    summary |= {"gmacs_ratio": ratio, "chosen_holdout_score": held.score, "chosen_holdout_drop": held.drop_points}
    summary |= {"chosen_holdout_p": held.test["gate_p"]}
    lines = [
        f"chosen: trial {chosen.number} {chosen.params}, {a['gmacs']:.4g} GMAC/ex, {cfg.task.eval_split} score "
        f"{a['score']:.4f}, held-out {held.score:.4f} (teacher {found.holdout.teacher_score:.4f}, "
        f"{-held.drop_points:+.2f} points, p={held.test['gate_p']:.3g}); saved to {folder}",
    ]
    if found.seeds:
        evals = [a["score"], *(s[1] for s in found.seeds)]
        helds = [held.score, *(s[2] for s in found.seeds)]
        summary |= {"chosen_score_seed_min": min(evals), "chosen_score_seed_max": max(evals)}
        summary |= {"chosen_holdout_seed_min": min(helds), "chosen_holdout_seed_max": max(helds)}
        lines.append(
            f"seeds {[cfg.seed, *(s[0] for s in found.seeds)]}: {cfg.task.eval_split} "
            + ", ".join(f"{v:.4f}" for v in evals)
            + " (spread "
            + f"{100 * (max(evals) - min(evals)):.1f} points); held-out "
            + ", ".join(f"{v:.4f}" for v in helds)
        )
    gain = timing.engine_gain
    lines.append(decomposition(found.teacher.gmacs, a["gmacs"], gain))
    if gain is not None:
        summary |= {"engine_gain": gain, "total_gain": ratio * gain, "chosen_latency_p50_ms": timing.latency_ms}
    if timing.paper_ms and timing.latency_ms:
        summary["vs_paper_batch1"] = timing.paper_ms / timing.latency_ms
        lines.append(
            f"batch-1 p50 speed-up over the paper's baseline shape timed here ({timing.paper_ms:.1f} ms on "
            f"{cfg.task.name}'s inputs, padded to {cfg.benchmark.paper_baseline.max_length}): "
            f"{summary['vs_paper_batch1']:.1f}x; the paper's: {PAPER_SPEEDUP}x on BoolQ (different hardware)"
        )
    client.set_tag(parent, "compress.chosen_folder", str(folder))
    client.set_tag(parent, "compress.chosen_run", a["run_id"])
    lines.append(f"served: runs:/{a['run_id']}/model (the chosen trial's int8 graph, docs/serving.md)")
    return lines


def decomposition(teacher_gmacs: float, chosen_gmacs: float, gain: float | None) -> str:
    """The speed-up as work removed times engine: teacher GMAC / chosen GMAC x engine gain = total."""
    ratio = teacher_gmacs / chosen_gmacs
    if gain is None:
        return (
            f"teacher {teacher_gmacs:.4g} GMAC / chosen {chosen_gmacs:.4g} GMAC = {ratio:.2f}x fewer multiply-adds "
            "(engine gain not measured: compress.time_front=true times it)"
        )
    return (
        f"teacher {teacher_gmacs:.4g} GMAC / chosen {chosen_gmacs:.4g} GMAC x engine gain {gain:.2f} "
        f"(PyTorch fp32 p50 / engine p50, batch 1) = {ratio * gain:.2f}x"
    )


def write_figure(cfg: DictConfig, client: MlflowClient, parent: str) -> None:
    """The study's Pareto figure and trial table in this run's folder, logged to its parent run: what
    `fastformers report --experiment compress` draws for every study of the store, left by the search itself."""
    _, runs = experiment_runs(client, cfg.mlflow.experiment_name)
    out = run_folder(cfg) / "compress"
    files = [path for study in compress_report.studies(runs, cfg.compress.study_name) for path in
             compress_report.write_study(study, out)]  # fmt: skip
    for path in files:
        client.log_artifact(parent, str(path), "report")
    if files:
        print(f"compress: the Pareto figure and the trials' table: {', '.join(map(str, files))}", flush=True)


def run_folder(cfg: DictConfig) -> Path:
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(cfg.paths.output_dir)


def save_chosen(cfg: DictConfig, folder: Path) -> Path:
    """The chosen model as a folder plain transformers loads (a pruned one carries its modeling file and
    `auto_map`: fastformers/models/hub.py), in this run's output folder."""
    target = run_folder(cfg) / "compress" / "chosen_model"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(folder, target)
    return target
