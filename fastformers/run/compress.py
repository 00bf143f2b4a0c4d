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
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
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
from fastformers.bench.roofline import Shape, gmacs_per_example
from fastformers.checks import require_number
from fastformers.data.loading import DataSource, EncodedDataset, holdout_split, split_label
from fastformers.data.task_config import task_of
from fastformers.errors import FastformersError, stop_signal
from fastformers.run import pipeline
from fastformers.tracking import runs as tracking

log = logging.getLogger(__name__)

SEEDINGS = ("bottom", "every_other")  # which teacher layers a student of n layers copies
DIRECTIONS = {"score": StudyDirection.MAXIMIZE, "gmacs": StudyDirection.MINIMIZE, "latency_ms": StudyDirection.MINIMIZE}
STUDENT_STAGES = ("distill", "prune")  # what a trial adds to the teacher's stages
TIMING_STAGE = "benchmark"
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
    require_number(cfg, "compress.confirm_candidates", 1, integer=True)
    require_number(cfg, "compress.heartbeat_seconds", 1, integer=True)
    objectives = list(opts.objectives)
    if not objectives or objectives[0] != "score" or not set(objectives) <= set(DIRECTIONS):
        raise FastformersError(
            f"compress.objectives={objectives}: 'score' first, then any of {sorted(set(DIRECTIONS) - {'score'})}"
        )
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
    missing = [stage for stage in STUDENT_STAGES if stage not in cfg.stages]
    if missing:
        raise FastformersError(f"stages={list(cfg.stages)}: compress needs {missing} (each trial distils and prunes)")


def measures_latency(cfg: DictConfig) -> bool:
    """A latency budget or objective needs the benchmark stage in every trial (it costs time: off otherwise)."""
    return cfg.compress.latency_ms is not None or "latency_ms" in cfg.compress.objectives


def with_holdout(cfg: DictConfig) -> tuple[DictConfig, str]:
    """A copy of the config whose training split leaves the held-out slice out (for every stage, the teacher's
    included, so the teacher's key is the same in every trial), and the held-out slice's spec."""
    kept, held_out = holdout_split(cfg.task.train_split, cfg.compress.holdout)
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.task.train_split = kept
    return cfg, held_out


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
        if measures_latency(cfg) and TIMING_STAGE not in cfg.stages:
            cfg.stages = [*cfg.stages, TIMING_STAGE]
    return cfg


def suggest(trial: optuna.Trial, space: DictConfig, teacher_depth: int) -> dict:
    """A point of the space (depths beyond the teacher's are left out of it)."""
    depths = [n for n in space.layers if n <= teacher_depth]
    if not depths:
        raise FastformersError(
            f"compress.space.layers={list(space.layers)}: none fits the {teacher_depth}-layer teacher"
        )
    return {
        "layers": trial.suggest_categorical("layers", depths),
        "seeding": trial.suggest_categorical("seeding", list(space.seeding)),
        "heads": trial.suggest_categorical("heads", [float(v) for v in space.heads]),
        "ffn": trial.suggest_categorical("ffn", [float(v) for v in space.ffn]),
    }


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
    predictions = Path(run.data.tags["cache.evaluate.path"]) / f"predictions_{split_label(cfg.task.eval_split)}.jsonl"
    return Point(
        score=score,
        gmacs=gmacs_per_example(shape, lengths),
        shape=shape.__dict__,
        folder=folder,
        run_id=run.info.run_id,
        latency_ms=latency,
        mb=weights_mb(folder),
        results=results,
        predictions=[json.loads(line)["prediction"] for line in predictions.read_text().splitlines() if line],
    )


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
    study.sampler = optuna.samplers.NSGAIISampler(
        population_size=cfg.compress.population_size, seed=cfg.compress.seed + len(study.trials)
    )
    return study


def completed(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def search(
    cfg: DictConfig,
    study: optuna.Study,
    evaluate: Callable[[dict], Point],
    budget: Budget,
    deadline: float,
    teacher_depth: int,
) -> list[FrozenTrial]:
    """Runs trials until `compress.trials` have finished (counting those of earlier runs of the same study) or the
    wall-clock deadline passes (Optuna starts no trial after it; the running one ends). A trial whose stages
    refuse its point (FastformersError) is recorded FAILED and the search goes on."""
    remaining = cfg.compress.trials - len(completed(study))
    seconds = deadline - time.monotonic()
    if remaining > 0 and seconds > 0:

        def objective(trial: optuna.Trial) -> tuple[float, ...]:
            point = evaluate(suggest(trial, cfg.compress.space, teacher_depth))
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
            n_trials=remaining,
            timeout=seconds,
            catch=(FastformersError,),
            callbacks=[optuna.study.MaxTrialsCallback(cfg.compress.trials, states=(TrialState.COMPLETE,))],
        )
    elif remaining <= 0:
        print(f"compress: the study already has {len(completed(study))} finished trials: none to run", flush=True)
    return completed(study)


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


def compress(cfg: DictConfig, held_out: str, deadline: float, parent: str) -> dict[str, float]:
    """The teacher's run first (its score sets the budget, its depth the space, its predictions the gate's
    reference), then the trials, then the held-out checks of the smallest candidates."""
    client = MlflowClient(tracking.tracking_uri(cfg))
    teacher = run_point(teacher_cfg(cfg))
    lengths = eval_token_lengths(cfg, teacher.folder)
    depth = teacher.shape["layers"]
    alpha = cfg.benchmark.gate.alpha if cfg.compress.gate else None
    budget = Budget(teacher.score, cfg.compress.max_drop, cfg.compress.latency_ms, cfg.compress.max_mb, alpha)
    task = task_of(cfg)
    sample = labelled_sample(task, DataSource.of(cfg, task).examples(cfg.task.eval_split))
    study = open_study(cfg)

    def evaluate(params: dict) -> Point:
        point = run_point(trial_cfg(cfg, params, depth), lengths)
        point.gate = gate_test(cfg, sample, point.predictions, teacher.predictions)
        log_trial(client, point, params, budget)
        return point

    trials = search(cfg, study, evaluate, budget, deadline, depth)
    teacher_holdout = holdout_score(cfg, held_out, None, depth)

    def confirm(trial: FrozenTrial) -> bool:
        score = holdout_score(cfg, held_out, trial, depth)
        drop = 100 * (teacher_holdout - score)
        print(
            f"compress: trial {trial.number} on the held-out slice {held_out}: {score:.4f} "
            f"(teacher {teacher_holdout:.4f}, drop {drop:+.2f} points, budget {budget.max_drop})",
            flush=True,
        )
        return drop <= budget.max_drop

    chosen, tried = choose(trials, budget, confirm, cfg.compress.confirm_candidates)
    gain = engine_gain(cfg, chosen, depth) if chosen is not None else None
    return report(cfg, client, parent, teacher, teacher_holdout, trials, budget, chosen, tried, gain)


def holdout_score(cfg: DictConfig, held_out: str, trial: FrozenTrial | None, teacher_depth: int) -> float:
    """The score on the held-out slice of the teacher (trial None) or a trial's student: the same stages, all
    cache hits but an evaluate of the slice alone."""
    run_cfg = teacher_cfg(cfg) if trial is None else trial_cfg(cfg, trial.params, teacher_depth)
    with open_dict(run_cfg):
        run_cfg.evaluate.splits = [held_out]
        run_cfg.stages = [s for s in run_cfg.stages if s != TIMING_STAGE]
    results = pipeline.run(run_cfg)
    score = results.get(f"evaluate/{split_label(held_out)}/score")
    if score is None:
        raise FastformersError(f"compress: no score on the held-out slice {held_out} (is train labelled?)")
    return score


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


def log_trial(client: MlflowClient, point: Point, params: dict, budget: Budget) -> None:
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


def report(cfg, client, parent, teacher, teacher_holdout, trials, budget, chosen, tried, gain) -> dict[str, float]:
    """Prints and logs what the search found: every trial, the choice and the speed-up decomposition."""
    within = [t for t in trials if budget.keeps(t.user_attrs)]
    lines = [
        "",
        f"== fastformers compress: {len(trials)} finished trials, {len(within)} within the budget "
        f"(teacher {cfg.task.eval_split} score {teacher.score:.4f}, max_drop {budget.max_drop} points)",
    ]
    for t in sorted(trials, key=lambda t: t.user_attrs["gmacs"]):
        a = t.user_attrs
        lines.append(
            f"  trial {t.number:3d} {t.params}: score {a['score']:.4f}, {a['gmacs']:.4g} GMAC/ex"
            + (f", p50 {a['latency_ms']:.2f} ms" if a.get("latency_ms") is not None else "")
            + (
                f", vs teacher {a['delta_points']:+.1f} points [{a['delta_lo_points']:+.1f}, "
                f"{a['delta_hi_points']:+.1f}] p={a['gate_p']:.3g}"
                if "gate_p" in a
                else ""
            )
            + (" within budget" if budget.keeps(a) else "")
        )
    summary = {"teacher_score": teacher.score, "teacher_gmacs": teacher.gmacs, "trials": float(len(trials))}
    summary["teacher_holdout_score"] = teacher_holdout
    if chosen is None:
        lines.append(
            f"no model chosen: {len(tried)} candidate(s) within the budget failed the held-out check"
            if tried
            else "no model chosen: no finished trial is within the budget"
        )
    else:
        folder = save_chosen(cfg, Path(chosen.user_attrs["folder"]))
        ratio = teacher.gmacs / chosen.user_attrs["gmacs"]
        lines += [
            f"chosen: trial {chosen.number} {chosen.params}, score {chosen.user_attrs['score']:.4f}, saved to {folder}",
            decomposition(teacher.gmacs, chosen.user_attrs["gmacs"], gain),
        ]
        summary |= {"chosen_trial": float(chosen.number), "chosen_gmacs": chosen.user_attrs["gmacs"]}
        summary |= {"chosen_score": chosen.user_attrs["score"], "gmacs_ratio": ratio}
        if gain is not None:
            summary |= {"engine_gain": gain, "total_gain": ratio * gain}
        client.set_tag(parent, "compress.chosen_folder", str(folder))
    for key, value in summary.items():
        client.log_metric(parent, f"compress/{key}", value)
    client.set_tag(parent, "compress.report", "\n".join(lines)[-4900:])
    print("\n".join(lines), flush=True)
    return summary


def decomposition(teacher_gmacs: float, chosen_gmacs: float, gain: float | None) -> str:
    """The speed-up as work removed times engine: teacher GMAC / chosen GMAC x engine gain = total."""
    ratio = teacher_gmacs / chosen_gmacs
    if gain is None:
        return (
            f"teacher {teacher_gmacs:.4g} GMAC / chosen {chosen_gmacs:.4g} GMAC = {ratio:.2f}x fewer multiply-adds "
            "(engine gain not measured: compress.engine_gain=true times it)"
        )
    return (
        f"teacher {teacher_gmacs:.4g} GMAC / chosen {chosen_gmacs:.4g} GMAC x engine gain {gain:.2f} = "
        f"{ratio * gain:.2f}x"
    )


def engine_gain(cfg: DictConfig, chosen: FrozenTrial, teacher_depth: int) -> float | None:
    """The chosen model's batch-1 p50 in PyTorch fp32 over the same with the picked engine row (one benchmark
    run of the chosen model: its other stages are cache hits)."""
    if not cfg.compress.engine_gain:
        return None
    run_cfg = trial_cfg(cfg, chosen.params, teacher_depth)
    with open_dict(run_cfg):
        if TIMING_STAGE not in run_cfg.stages:
            run_cfg.stages = [*run_cfg.stages, TIMING_STAGE]
    results = pipeline.run(run_cfg)
    torch_p50 = results.get(f"benchmark/{cfg.compress.torch_row}/latency_p50_ms")
    engine_p50 = results.get(f"benchmark/{cfg.compress.latency_row}/latency_p50_ms")
    return None if not torch_p50 or not engine_p50 else torch_p50 / engine_p50


def save_chosen(cfg: DictConfig, folder: Path) -> Path:
    """The chosen model as a folder plain transformers loads (a pruned one carries its modeling file and
    `auto_map`: fastformers/models/hub.py), in this run's output folder."""
    base = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(cfg.paths.output_dir)
    target = base / "compress" / "chosen_model"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(folder, target)
    return target
