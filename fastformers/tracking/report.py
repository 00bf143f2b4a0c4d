"""`fastformers report`: an MLflow experiment as the paper shows it: a table (Markdown and CSV) and the
accuracy vs inference time (Figure 2) and accuracy vs queries/s (Figure 3) plots with the Pareto front marked.
Everything is read back from the runs' metrics and params (per run name, its latest finished run); nothing is
typed in. The files are logged to the experiment's latest sweep parent run (or, without one, to a run of their own).
A compress search (`experiment=compress`) gets its Pareto figure and trial table (tracking/compress_report.py)."""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from mlflow.tracking import MlflowClient

from fastformers.data.tasks import LEADERBOARD_FILES, TASKS
from fastformers.errors import FastformersError
from fastformers.tracking.runs import ROLE_TAG, SKIPPED_TAG, absolute_uri, sqlite_path, sqlite_problem

SCORE = re.compile(r"^evaluate/(.+)/score$")
BENCHMARK = re.compile(r"^benchmark/(.+)/latency_p50_ms$")
ROWS_PLOT = "rows_{run}.png"  # every row of one benchmark run
TASKS_PLOT = "tasks_vs_teacher.png"  # a multi-task experiment: each task against its own teacher
PLOTS = {
    "accuracy_vs_latency.png": ("latency_p50_ms", "latency at batch size 1, p50 (ms)", True),
    "accuracy_vs_throughput.png": ("throughput", "throughput (examples/s)", False),
}  # key, label, lower is better


@dataclass
class Row:
    run: str
    run_id: str
    task: str
    student: str
    heads: str
    ffn: str
    precision: str
    setting: str
    score: float
    latency_p50_ms: float
    throughput: float
    speedup: float | None
    usd_per_100m_queries: float | None
    parameters: float | None
    pareto: bool = False


def timed_settings(metrics: dict[str, float]) -> list[str]:
    """The benchmark settings a run timed (those with a batch-size-1 latency)."""
    return [m.group(1) for k in metrics if (m := BENCHMARK.match(k))]


def fastest(settings: list[str], metrics: dict[str, float]) -> str | None:
    return max(settings, key=lambda s: metrics.get(f"benchmark/{s}/throughput", 0.0), default=None)


def picked(run) -> str | None:
    """The benchmark's pick (`benchmark.pick`; runs before engines had a pick: `benchmark.best_layout`)."""
    return run.data.tags.get("benchmark.pick") or run.data.tags.get("benchmark.best_layout") or None


def row_of(run, setting: str | None) -> Row | None:
    """A finished run's point: its eval score, and the named benchmark setting (default: its fastest)."""
    metrics, params = run.data.metrics, run.data.params
    score = next((v for k, v in sorted(metrics.items()) if SCORE.match(k)), None)
    settings = timed_settings(metrics)
    if score is None or not settings:
        return None
    if setting is None:
        setting = picked(run) if picked(run) in settings else fastest(settings, metrics)
    elif setting not in settings:
        return None
    get = lambda key: metrics.get(f"benchmark/{setting}/{key}")  # noqa: E731
    parameters = next(
        (metrics[k] for k in ("prune/parameters", "distill/student_parameters", "finetune/parameters") if k in metrics),
        None,
    )
    return Row(
        run=run.info.run_name,
        run_id=run.info.run_id,
        task=params.get("task.name", ""),
        student=params.get("student.name", ""),
        heads=params.get("pruning.heads", ""),
        ffn=params.get("pruning.ffn", ""),
        precision=params.get("precision.name", ""),
        setting=setting or "",
        score=score,
        latency_p50_ms=get("latency_p50_ms"),
        throughput=get("throughput"),
        speedup=get("speedup"),
        usd_per_100m_queries=get("usd_per_100m_queries"),
        parameters=parameters,
    )


class Scored(Protocol):
    score: float
    task: str


S = TypeVar("S", bound=Scored)


def pareto(rows: list[S], key: str = "latency_p50_ms", lower_is_better: bool = True) -> list[S]:
    """The rows no other row of the same task beats on both the score and `key` (scores of different tasks do not
    compare): a report's runs, or a compress search's trials (fastformers/tracking/compress_report.py)."""

    def at_least(o: S, r: S) -> bool:
        x, y = getattr(o, key), getattr(r, key)
        return (x <= y if lower_is_better else x >= y) and o.score >= r.score

    return [
        r
        for r in rows
        if not any(
            at_least(o, r) and (getattr(o, key) != getattr(r, key) or o.score != r.score)
            for o in rows
            if o is not r and o.task == r.task
        )
    ]


def mark_pareto(rows: list[Row]) -> None:
    """The table's `pareto` column: the front of score vs latency."""
    front = pareto(rows)
    for row in rows:
        row.pareto = any(row is f for f in front)


def experiment_runs(client: MlflowClient, experiment: str) -> tuple[str, list]:
    """The experiment's id and every run of it, oldest first: read once, for the tables and the plots."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise FastformersError(f"report: no MLflow experiment {experiment!r} in this store")
    return found.experiment_id, client.search_runs(
        [found.experiment_id], order_by=["attributes.start_time ASC"], max_results=5000
    )


def collect(runs: list, experiment: str, setting: str | None, all_runs: bool = False) -> tuple[list[Row], str | None]:
    """(a row per run name: its latest finished job run, or every finished job run with `all_runs`; the latest
    sweep parent's run id or None). A re-run point replaces its older run; one task re-run in a table experiment
    keeps the other tasks' rows."""
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"]
    finished = [r for r in runs if r.info.status == "FINISHED" and ROLE_TAG not in r.data.tags]
    if not all_runs:
        finished = list({r.info.run_name: r for r in finished}.values())  # oldest first, so the latest wins
    rows = [row for r in finished if (row := row_of(r, setting)) is not None]
    if not rows:
        raise FastformersError(
            f"report: experiment {experiment!r} has no finished run with an evaluate score and "
            "benchmark timings (stages [..., evaluate, benchmark])"
        )
    mark_pareto(rows)
    return rows, parents[-1].info.run_id if parents else None


def write_tables(rows: list[Row], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    fields = list(asdict(rows[0]))
    with (out / "report.csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields)
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    shown = [
        "run",
        "setting",
        "score",
        "latency_p50_ms",
        "throughput",
        "speedup",
        "usd_per_100m_queries",
        "parameters",
        "pareto",
    ]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in sorted(rows, key=lambda r: r.latency_p50_ms):
        values = asdict(row)
        lines.append("| " + " | ".join(_cell(values[k]) for k in shown) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return [out / "report.csv", out / "report.md"]


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e5 else f"{value:.4g}"
    return "" if value is None else str(value)


def plot(rows: list[Row], out: Path, title: str) -> list[Path]:
    """Score against each speed measure, every run labelled, the Pareto front drawn through its points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, (key, label, lower_is_better) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
        xs, ys = [getattr(r, key) for r in rows], [r.score for r in rows]
        ax.scatter(xs, ys, color="tab:blue", label="runs")
        front = sorted(pareto(rows, key, lower_is_better), key=lambda r: getattr(r, key))
        for i, task in enumerate(sorted({r.task for r in front})):  # one front per task
            points = [r for r in front if r.task == task]
            ax.plot(
                [getattr(r, key) for r in points],
                [r.score for r in points],
                color="tab:red",
                marker="o",
                label=None if i else "Pareto front",
            )
        several = len({r.task for r in rows}) > 1
        for row in rows:
            ax.annotate(
                f"{row.task + ' ' if several else ''}h{row.heads} f{row.ffn} {row.setting}",
                (getattr(row, key), row.score),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set(xlabel=label, ylabel="task score (official metric)", title=title)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        written.append(out / name)
    return written


@dataclass
class Point:
    """One benchmark row as the per-row plot draws it: score with its interval against each speed measure."""

    name: str
    score: float
    score_lo: float  # the score's 95% interval: the gate's paired bootstrap of the delta, added to its reference's
    score_hi: float
    throughput: float
    throughput_lo: float  # the slowest and fastest timed pass
    throughput_hi: float
    latency_p50_ms: float | None
    gmacs: float | None  # multiply-adds per example (GFLOPs / 2 where the run has only FLOPs)
    gated_out: bool
    label: str  # "" or "reference" / "pick" / "reference, pick"


def benchmark_json(client: MlflowClient, run) -> dict | None:
    """A run's benchmark.json (every row it timed), read back from its MLflow artifacts; None without one."""
    if not any(a.path == "benchmark/benchmark.json" for a in client.list_artifacts(run.info.run_id, "benchmark")):
        return None
    return json.loads(Path(client.download_artifacts(run.info.run_id, "benchmark/benchmark.json")).read_text())


def row_points(bench: dict) -> list[Point]:
    """Every timed, scored row of a benchmark report; the score interval from the gate where it judged the row."""
    rows = [row for row in bench["rows"] if not row["skipped"] and "score" in row["metrics"]]
    by_name = {row["name"]: row for row in rows}
    points = []
    for row in rows:
        m, gate = row["metrics"], row.get("gate") or {}
        reference = by_name.get(bench.get("agreement_reference") or "")
        base = reference["metrics"]["score"] if reference and gate else m["score"]
        lo, hi = (gate.get(f"score_delta_{k}_points") for k in ("lo", "hi"))
        macs = m.get("gmacs_per_example", m["gflops_per_example"] / 2 if "gflops_per_example" in m else None)
        labels = [word for word, name in (("reference", bench.get("reference")), ("pick", bench.get("pick")))
                  if name == row["name"]]  # fmt: skip
        points.append(
            Point(
                row["name"],
                m["score"],
                base + lo / 100 if lo is not None else m["score"],
                base + hi / 100 if hi is not None else m["score"],
                m["throughput"],
                m.get("throughput_lo", m["throughput"]),
                m.get("throughput_hi", m["throughput"]),
                m.get("latency_p50_ms"),
                macs,
                m.get("gate_passed") == 0.0,
                ", ".join(labels),
            )
        )
    return points


def plot_rows(points: list[Point], out: Path, title: str) -> Path:
    """Every row of one benchmark run: score (with its interval) against throughput (with its range), p50
    latency and multiply-adds; gated-out rows drawn as crosses, the reference and the pick labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    views = [("throughput", "throughput (examples/s)"), ("latency_p50_ms", "latency at batch size 1, p50 (ms)")]
    if any(p.gmacs is not None for p in points):
        views.append(("gmacs", "multiply-adds per example (G)"))
    fig, axes = plt.subplots(1, len(views), figsize=(6 * len(views) + 3, 5), dpi=100, squeeze=False)
    for ax, (key, label) in zip(axes[0], views):
        for number, p in enumerate(points, 1):
            x = getattr(p, key)
            if x is None:
                continue
            xerr = [[p.throughput - p.throughput_lo], [p.throughput_hi - p.throughput]] if key == "throughput" else None
            ax.errorbar(
                x,
                p.score,
                yerr=[[p.score - p.score_lo], [p.score_hi - p.score]],
                xerr=xerr,
                fmt="x" if p.gated_out else "o",
                color="tab:red" if p.gated_out else ("tab:green" if p.label else "tab:blue"),
                capsize=2,
            )
            named = p.label or p.gated_out  # the pick, the reference and rows the gate failed are named in place
            text = f"{number} {row_caption(p)}" if named else str(number)
            ax.annotate(text, (x, p.score), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel=label, ylabel="task score (official metric)", title=title)
        ax.grid(alpha=0.3)
    key_text = "\n".join(f"{number} {row_caption(p)}" for number, p in enumerate(points, 1))
    plots_end = 1 - 3 / (6 * len(views) + 3)  # the last 3 inches hold the key of the numbered rows
    fig.text(plots_end + 0.005, 0.5, key_text, fontsize=7, va="center", ha="left", family="monospace")
    fig.tight_layout(rect=(0, 0, plots_end, 1))
    path = out / ROWS_PLOT.format(run=re.sub(r"[^A-Za-z0-9_.-]+", "_", title))
    fig.savefig(path)
    plt.close(fig)
    return path


def row_caption(point: Point) -> str:
    """A row as its plot's key names it: its name, its role (pick, reference), a failed gate."""
    return point.name + (f" ({point.label})" if point.label else "") + (" gate failed" if point.gated_out else "")


def plot_tasks(rows: list[Row], teachers: dict[str, float | None], out: Path) -> Path:
    """A multi-task experiment: one panel per task, its teacher's score beside the system's, the speed-up in
    the title (scores of different tasks never share an axis or a front)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(3 * len(rows), 4), dpi=100, squeeze=False)
    for ax, row in zip(axes[0], sorted(rows, key=lambda r: r.task)):
        teacher = teachers.get(row.run_id)
        ax.bar(["teacher", "system"], [teacher or 0.0, row.score], color=["tab:gray", "tab:blue"])
        speedup = f"{row.speedup:.1f}x" if row.speedup else "?"
        ax.set(title=f"{row.task}: {speedup} ({row.setting})", ylim=(0, 1), ylabel="score")
    fig.tight_layout()
    fig.savefig(out / TASKS_PLOT)
    plt.close(fig)
    return out / TASKS_PLOT


def ablation_table(runs) -> list[str]:
    """The paper's Table 3 layout for runs that carry `row.order` (conf/ablation/): each row's own setting (the
    benchmark's pick where it searched engines and layouts), its speed-up over the baseline timed in the same run
    (cumulative), over the row before (per step), its score and cost."""
    rows = sorted((r for r in runs if "row.order" in r.data.params), key=lambda r: int(r.data.params["row.order"]))
    lines = [
        "| row | setting | time (s) | speed-up (step) | speed-up (cumulative) | score | USD / 100M queries |",
        "|---|---|---|---|---|---|---|",
    ]
    previous = None
    for run in rows:
        metrics = run.data.metrics
        setting = picked(run) or run.data.params["row.setting"]
        cumulative = metrics.get(f"benchmark/{setting}/speedup")
        step = cumulative / previous if cumulative and previous else cumulative
        score = next((v for k, v in sorted(metrics.items()) if SCORE.match(k)), None)
        lines.append(
            "| "
            + " | ".join(
                _cell(v)
                for v in (
                    run.data.params["row.name"],
                    setting,
                    metrics.get(f"benchmark/{setting}/wall_seconds"),
                    step,
                    cumulative,
                    score,
                    metrics.get(f"benchmark/{setting}/usd_per_100m_queries"),
                )
            )
            + " |"
        )
        previous = cumulative
    return lines if rows else []


def task_table(client: MlflowClient, runs, out: Path) -> list[Path]:
    """The paper's Table 4 layout when an experiment spans tasks: per task its teacher's score, the system's official
    metrics, the speed-up and energy saving of its fastest setting over the baseline of the same run, or why it has
    no numbers; the leaderboard files of every task are gathered into one archive."""
    latest = {}
    for run in runs:  # oldest first: a task's last finished (or skipped) run is its row
        if run.info.status == "FINISHED" and ROLE_TAG not in run.data.tags and "task.name" in run.data.params:
            latest[run.data.params["task.name"]] = run
    if len(latest) < 2:
        return []
    lines = [
        "| task | teacher score | metrics | speed-up | energy saving | test submission |",
        "|---|---|---|---|---|---|",
    ]
    archive = out / "superglue_submission.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for task, run in sorted(latest.items()):
            if SKIPPED_TAG in run.data.tags:
                lines.append(f"| {task} | not run: {run.data.tags[SKIPPED_TAG]} | | | | |")
                continue
            metrics = run.data.metrics
            official = ", ".join(
                f"{k.split('/')[-1]} {v:.4f}"
                for k, v in sorted(metrics.items())
                if k.startswith("evaluate/") and not k.endswith("/score")
            )
            splits = sorted({k.split("/")[1] for k in metrics if SCORE.match(k)})  # e.g. val_60-100pct: a share
            official += f" ({', '.join(splits)})" if splits else ""
            best = picked(run) or fastest(timed_settings(metrics), metrics)
            base_j, best_j = (metrics.get(f"benchmark/{name}/joules_per_example") for name in ("baseline", best))
            saving = f"{base_j / best_j:.1f}x" if base_j and best_j else ""
            speedup = metrics.get(f"benchmark/{best}/speedup")
            files = [a.path for a in client.list_artifacts(run.info.run_id, "evaluate/submission")]
            for path in files:
                bundle.write(client.download_artifacts(run.info.run_id, path, str(out)), Path(path).name)
            teacher = _cell(metrics.get("finetune/best_val_score"))  # the fine-tuned teacher, on the same split
            lines.append(
                f"| {task} | {teacher} | {official} | {_cell(speedup)}{'x' if speedup else ''} ({best}) | {saving} | "
                f"{', '.join(Path(f).name for f in files)} |"
            )
        missing = missing_files(client, latest, bundle)
    if missing:
        lines += ["", f"The archive lacks {len(missing)} of the leaderboard's {len(LEADERBOARD_FILES)} files "
                  "(listed in its MISSING.txt): " + "; ".join(missing)]  # fmt: skip
    (out / "tasks.md").write_text("\n".join(lines) + "\n")
    return [out / "tasks.md", archive]


def missing_files(client: MlflowClient, latest: dict, bundle: zipfile.ZipFile) -> list[str]:
    """The leaderboard files (the 7 tasks, AX-b, AX-g) the archive lacks, each with why; written into it too."""
    present = {Path(name).stem for name in bundle.namelist()}
    reasons: dict[str, str] = {}
    for run in latest.values():
        for path in (a.path for a in client.list_artifacts(run.info.run_id, "evaluate")):
            if Path(path).name == "diagnostics_missing.json":
                entries = json.loads(Path(client.download_artifacts(run.info.run_id, path)).read_text())
                for entry in entries:  # "AX-b.jsonl (no <path>)"
                    name, _, why = entry.partition(" ")
                    reasons[name.removesuffix(".jsonl")] = why.strip("()")
        task = TASKS.get(run.data.params["task.name"])
        if task and SKIPPED_TAG in run.data.tags:
            reasons[task.name] = run.data.tags[SKIPPED_TAG]
    missing = [f"{name}.jsonl: {reasons.get(name, 'no run of this experiment made it')}" for name in LEADERBOARD_FILES
               if name not in present]  # fmt: skip
    if missing:
        bundle.writestr("MISSING.txt", "\n".join(missing) + "\n")
    return missing


def report(
    tracking_uri: str, experiment: str, out: Path, setting: str | None = None, all_runs: bool = False
) -> list[Path]:
    """Writes the tables and plots into `out` and logs them to the experiment's sweep parent run (a compress
    experiment's: its latest search's parent run)."""
    from fastformers.tracking import compress_report  # it imports this module

    client = MlflowClient(tracking_uri)
    experiment_id, runs = experiment_runs(client, experiment)
    searches = compress_report.studies(runs)
    files = [path for study in searches for path in compress_report.write_study(study, out)]
    try:
        rows, parent = collect(runs, experiment, setting, all_runs)
    except FastformersError:
        if not files:  # a compress search's trials need no benchmark timings; anything else does
            raise
        rows, parent = [], None
    if rows:
        files += run_files(client, rows, runs, out, experiment)
    files += task_table(client, runs, out)
    if parent is None and searches:
        parent = searches[-1].parents[-1].info.run_id
    if parent is None:
        parent = client.create_run(experiment_id, run_name="report", tags={ROLE_TAG: "report"}).info.run_id
        client.set_terminated(parent, "FINISHED")
    for path in files:
        client.log_artifact(parent, str(path), "report")
    return files


def run_files(client: MlflowClient, rows: list[Row], runs: list, out: Path, experiment: str) -> list[Path]:
    """The table of the runs, their plots (a panel per task, or the fronts), each benchmark's rows, Table 3."""
    by_id = {run.info.run_id: run for run in runs}
    files = write_tables(rows, out)
    if len({r.task for r in rows}) > 1:  # one front through different tasks means nothing: a panel per task
        teachers = {r.run_id: by_id[r.run_id].data.metrics.get("finetune/best_val_score") for r in rows}
        files.append(plot_tasks(rows, teachers, out))
    else:
        files += plot(rows, out, f"{experiment}: {rows[0].task}")
    for row in rows:  # a benchmark run: every row it timed, not only its pick
        bench = benchmark_json(client, by_id[row.run_id])
        if bench and (points := row_points(bench)):
            files.append(plot_rows(points, out, row.run))
    if table := ablation_table([by_id[row.run_id] for row in rows]):
        (out / "ablation.md").write_text("\n".join(table) + "\n")
        files.append(out / "ablation.md")
    return files


def checked_store(uri: str, command: str) -> str:
    """The store's URI made absolute, once it is known to be one: a missing or non-SQLite file is a one-line error
    (MLflow would quietly create a store there)."""
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise FastformersError(f"{command}: --tracking-uri {uri}: no such MLflow store (run a job first)")
    problem = sqlite_problem(db, empty_ok=False) if db else None  # MLflow would fill an empty file
    if problem:
        raise FastformersError(f"{command}: --tracking-uri {uri}: {problem}")
    return absolute_uri(uri)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastformers report", description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="fastformers", help="MLflow experiment (mlflow.experiment_name)")
    parser.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db")
    parser.add_argument("--out", type=Path, default=None, help="default: outputs/reports/<experiment>")
    parser.add_argument("--setting", default=None, help="benchmark setting to plot (default: each run's fastest)")
    parser.add_argument(
        "--all-runs", action="store_true", help="every finished run, not only the latest of each run name"
    )
    args = parser.parse_args(argv)
    try:
        uri = checked_store(args.tracking_uri, "report")
        out = args.out or Path("outputs/reports") / args.experiment
        files = report(uri, args.experiment, out, args.setting, args.all_runs)
    except FastformersError as err:
        print(f"fastformers: error: {err}", file=sys.stderr)
        return 2
    for path in files:
        print(path)
    return 0
