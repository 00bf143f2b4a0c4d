"""The compress searches of an MLflow experiment (`experiment=compress`, fastformers/run/compress.py) read back:
each study's trials with their front and choice, as a Pareto figure and a CSV table for `fastformers report`, and
as the runs `fastformers cache gc` keeps or frees. A study re-run (resumed) has several parent runs: its trials
are the children of all of them; its teacher, budget and choice are its latest finished parent's."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastformers.tracking.report import SCORE, pareto
from fastformers.tracking.runs import ROLE_TAG

ROLE = "compress"  # the parent's fastformers.role (fastformers/run/compress.py's ROLE)
PARENT_TAG = "mlflow.parentRunId"
STUDY_TAG = "compress.study"
PARAMS_TAG = "compress.params"  # on the child run of each trial (its point, JSON)
TRIAL_TAG = "compress.trial"  # its Optuna trial number
FRONT_TAG = "compress.front"  # "1" on the trials of the study's Pareto front
CSV_FIELDS = ["trial", "params", "gmacs", "score", "delta", "p", "within_budget", "front", "latency", "chosen"]
UNTIMED = "no latency points: no trial was timed\n(compress.latency_ms or objectives latency_ms time them)"
PAPER_LINES = {
    "paper_baseline_gmacs": "paper's BERT-base baseline (padded to 512)",
    "paper_student_gmacs": "paper's final student (124x fewer)",
}


@dataclass
class Trial:
    """One trial's child run as the plot and the gc read it (None: the run did not log that figure)."""

    number: int | None
    run_id: str
    params: str
    gmacs: float
    score: float
    delta: float | None
    p: float | None
    within_budget: bool | None
    latency: float | None
    shape: dict[str, float]
    task: str = ""  # one study, one task: what report.pareto compares within
    front: bool = False
    chosen: bool = False


@dataclass
class Study:
    """A search: its trials and what its latest finished parent run says about them."""

    name: str
    parents: list  # its parent runs, oldest first
    children: list  # every child run of every parent (trials, the teacher's, held-out checks, timing)
    trials: list[Trial]
    metrics: dict[str, float] = field(default_factory=dict)  # the latest finished parent's compress/* metrics
    max_drop: float | None = None

    @property
    def running(self) -> bool:
        """A parent still RUNNING: its trials and their cache entries are in use, its front not final."""
        return any(parent.info.status == "RUNNING" for parent in self.parents)

    def get(self, name: str) -> float | None:
        return self.metrics.get(f"compress/{name}")


def studies(runs: list, study: str | None = None) -> list[Study]:
    """The compress searches among `runs` (oldest first), one per study name (only `study` when named)."""
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == ROLE and study in (None, r.data.tags.get(STUDY_TAG))]
    names = list(dict.fromkeys(p.data.tags.get(STUDY_TAG, p.info.run_id) for p in parents))
    return [study_of(name, [p for p in parents if p.data.tags.get(STUDY_TAG, p.info.run_id) == name], runs)
            for name in names]  # fmt: skip


def study_of(name: str, parents: list, runs: list) -> Study:
    ids = {p.info.run_id for p in parents}
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) in ids]
    finished = [p for p in parents if p.info.status == "FINISHED"] or parents
    latest = finished[-1]
    metrics = {k: v for k, v in latest.data.metrics.items() if k.startswith("compress/")}
    drop = latest.data.tags.get("compress.max_drop")
    found = Study(name, parents, children, trials_of(children, name), metrics, float(drop) if drop else None)
    mark_front(found.trials)
    mark_chosen(found)
    return found


def trials_of(children: list, task: str) -> list[Trial]:
    """The finished trial runs (those that logged their point and its multiply-adds), a re-run trial number's latest
    run only."""
    found: dict[object, Trial] = {}
    for run in children:
        trial = trial_of(run, task)
        if trial is not None and run.info.status == "FINISHED":
            found[trial.number if trial.number is not None else run.info.run_id] = trial
    return list(found.values())


def trial_of(run, task: str) -> Trial | None:
    tags, metrics = run.data.tags, run.data.metrics
    score = next((v for k, v in sorted(metrics.items()) if SCORE.match(k)), None)
    gmacs = metrics.get("compress/gmacs_per_example")
    if PARAMS_TAG not in tags or score is None or gmacs is None:
        return None
    within = metrics.get("compress/within_budget")
    return Trial(
        number=int(tags[TRIAL_TAG]) if tags.get(TRIAL_TAG, "").isdigit() else None,
        run_id=run.info.run_id,
        params=tags[PARAMS_TAG],
        gmacs=gmacs,
        score=score,
        delta=metrics.get("compress/delta_points"),
        p=metrics.get("compress/gate_p"),
        within_budget=None if within is None else within == 1.0,
        latency=metrics.get("compress/latency_p50_ms"),
        shape={k.removeprefix("compress/shape_"): v for k, v in metrics.items() if k.startswith("compress/shape_")},
        task=task,
        front=tags.get(FRONT_TAG) == "1",
    )


def mark_front(trials: list[Trial]) -> None:
    """The study's front as the search tagged it; a store from before that tag gets it computed the way Optuna's
    constrained NSGA-II ranks it: score (max) vs multiply-adds (min) among the trials within the budget."""
    if any(t.front for t in trials):
        return
    for trial in unconstrained_front(trials, within_budget_only=True):
        trial.front = True


def unconstrained_front(trials: list[Trial], within_budget_only: bool = False) -> list[Trial]:
    """Score vs multiply-adds, the budget ignored (or only the trials within it)."""
    pool = [t for t in trials if t.within_budget is not False] if within_budget_only else trials
    return pareto(pool, "gmacs")


def mark_chosen(study: Study) -> None:
    """The chosen trial: by its number where the runs carry it, else the one with the chosen figures."""
    number, gmacs, score = (study.get(k) for k in ("chosen_trial", "chosen_gmacs", "chosen_score"))
    for trial in study.trials:
        if trial.number is not None and number is not None:
            trial.chosen = trial.number == int(number)
        else:
            trial.chosen = gmacs is not None and (trial.gmacs, trial.score) == (gmacs, score)


def slug(study: Study) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", study.name).strip("_") or "study"


def write_csv(study: Study, path: Path) -> Path:
    """Every trial of the study, fewest multiply-adds first."""
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=[*CSV_FIELDS, "run_id"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(asdict(t) | {"trial": t.number} for t in sorted(study.trials, key=lambda t: t.gmacs))
    return path


def shape_label(trial: Trial) -> str:
    """The chosen model's shape as its label says it: layers x heads x FFN neurons."""
    s = trial.shape
    if {"layers", "heads", "ffn"} <= set(s):
        return f"trial {trial.number}: L{s['layers']:.0f} H{s['heads']:.0f} FFN{s['ffn']:.0f}"
    return f"trial {trial.number}: {json.loads(trial.params)}"


def plot_pareto(study: Study, out: Path) -> Path:
    """Score vs GMAC/example (log x) and vs batch-1 p50 latency: every trial, those within the budget, the front
    as a step line, the choice ringed, the teacher a star, the budget and the paper's two figures as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (work, speed) = plt.subplots(1, 2, figsize=(14, 5.5), dpi=100)
    draw_panel(work, study, "gmacs", study.get("teacher_gmacs"))
    work.set(xscale="log", xlabel="multiply-adds per example (GMAC, log scale)")
    for key, (label, style) in zip(PAPER_LINES, zip(PAPER_LINES.values(), ("-.", ":"))):
        if (x := study.get(key)) is not None:
            work.axvline(x, color="tab:purple", linestyle=style, label=label)
            work.annotate(label, (x, 1), xycoords=("data", "axes fraction"), rotation=90, fontsize=7, va="top",
                          ha="right", xytext=(-2, -4), textcoords="offset points")  # fmt: skip
    if any(t.latency is not None for t in study.trials):
        draw_panel(speed, study, "latency", study.get("teacher_latency_p50_ms"))
        speed.set(xlabel="latency at batch size 1, p50 (ms)")
    else:
        speed.set_title(UNTIMED, fontsize=10)
        speed.axis("off")
    for ax in (work, speed):
        if ax.has_data():
            ax.set(ylabel="task score (official metric)")
            ax.grid(alpha=0.3, which="both")
            ax.legend(loc="lower right", fontsize=7)
    fig.suptitle(f"compress search {study.name}: {len(study.trials)} trials")
    fig.tight_layout()
    path = out / f"compress_pareto_{slug(study)}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def draw_panel(ax, study: Study, key: str, teacher_x: float | None) -> None:
    """One panel: the trials that have `key`, against the score."""
    trials = [t for t in study.trials if getattr(t, key) is not None]
    x = lambda ts: [getattr(t, key) for t in ts]  # noqa: E731
    ax.scatter(x(trials), [t.score for t in trials], color="tab:gray", label="trials", zorder=2)
    within = [t for t in trials if t.within_budget]
    ax.scatter(x(within), [t.score for t in within], color="tab:green", label="within the budget", zorder=3)
    front = sorted(pareto(trials, key), key=lambda t: getattr(t, key))  # this panel's own front (of what it shows)
    if front:
        ax.step(x(front), [t.score for t in front], where="post", color="tab:red", marker="o", label="Pareto front")
    for trial in (t for t in trials if t.chosen):
        ax.scatter([getattr(trial, key)], [trial.score], s=250, facecolors="none", edgecolors="black", linewidths=2,
                   label="chosen", zorder=4)  # fmt: skip
        ax.annotate(shape_label(trial), (getattr(trial, key), trial.score), fontsize=8, xytext=(8, -12),
                    textcoords="offset points")  # fmt: skip
    teacher = study.get("teacher_score")
    if teacher is not None and teacher_x is not None:
        ax.scatter([teacher_x], [teacher], marker="*", s=250, color="tab:orange", label="teacher", zorder=4)
        ax.annotate("teacher", (teacher_x, teacher), fontsize=8, xytext=(-6, 6), textcoords="offset points", ha="right")
    if teacher is not None and study.max_drop is not None:
        ax.axhline(teacher - study.max_drop / 100, color="tab:blue", linestyle="--",
                   label=f"budget (teacher - {study.max_drop:g} points)")  # fmt: skip


def write_study(study: Study, out: Path) -> list[Path]:
    """The figure and the table of one search (nothing for a search with no finished trial yet)."""
    if not study.trials:
        return []
    out.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(study, out / f"compress_trials_{slug(study)}.csv")
    return [plot_pareto(study, out), csv_path]
