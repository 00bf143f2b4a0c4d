"""`fastformers report`: an MLflow experiment as the paper shows it: a table (Markdown and CSV) and the
accuracy vs inference time (Figure 2) and accuracy vs queries/s (Figure 3) plots with the Pareto front marked.
Everything is read back from the runs' metrics and params; nothing is typed in. The files are logged to the
experiment's latest sweep parent run (or, without one, to a run of their own)."""
from __future__ import annotations

import argparse
import csv
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from fastformers.errors import FastformersError
from fastformers.tracking import absolute_uri
from fastformers.sweep import ROLE_TAG

SCORE = re.compile(r"^evaluate/(.+)/score$")
BENCHMARK = re.compile(r"^benchmark/(.+)/latency_p50_ms$")
PLOTS = {"accuracy_vs_latency.png": ("latency_p50_ms", "latency at batch size 1, p50 (ms)"),
         "accuracy_vs_throughput.png": ("throughput", "throughput (examples/s)")}


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


def row_of(run, setting: str | None) -> Row | None:
    """A finished run's point: its eval score, and the named benchmark setting (default: its fastest)."""
    metrics, params = run.data.metrics, run.data.params
    score = next((v for k, v in sorted(metrics.items()) if SCORE.match(k)), None)
    settings = [m.group(1) for k in metrics if (m := BENCHMARK.match(k))]
    if score is None or not settings:
        return None
    if setting is None:
        setting = max(settings, key=lambda s: metrics.get(f"benchmark/{s}/throughput", 0.0))
    elif setting not in settings:
        return None
    get = lambda key: metrics.get(f"benchmark/{setting}/{key}")  # noqa: E731
    parameters = next((metrics[k] for k in ("prune/parameters", "distill/student_parameters", "finetune/parameters")
                       if k in metrics), None)
    return Row(run=run.info.run_name, run_id=run.info.run_id, task=params.get("task.name", ""),
               student=params.get("student.name", ""), heads=params.get("pruning.heads", ""),
               ffn=params.get("pruning.ffn", ""), precision=params.get("precision.name", ""), setting=setting,
               score=score, latency_p50_ms=get("latency_p50_ms"), throughput=get("throughput"),
               speedup=get("speedup"), usd_per_100m_queries=get("usd_per_100m_queries"), parameters=parameters)


def mark_pareto(rows: list[Row]) -> None:
    """A point is on the front when no other point is at least as fast and as accurate, and better in one."""
    for row in rows:
        row.pareto = not any(
            o.latency_p50_ms <= row.latency_p50_ms and o.score >= row.score
            and (o.latency_p50_ms < row.latency_p50_ms or o.score > row.score)
            for o in rows if o is not row)


def collect(client: MlflowClient, experiment: str, setting: str | None) -> tuple[list[Row], str | None]:
    """(rows of the experiment's finished job runs, the latest sweep parent's id or None)."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise FastformersError(f"report: no MLflow experiment {experiment!r} in this store")
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"], max_results=5000)
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"]
    rows = [row for r in runs if r.info.status == "FINISHED" and ROLE_TAG not in r.data.tags
            and (row := row_of(r, setting)) is not None]
    if not rows:
        raise FastformersError(f"report: experiment {experiment!r} has no finished run with an evaluate score and "
                               "benchmark timings (stages [..., evaluate, benchmark])")
    mark_pareto(rows)
    return rows, parents[-1].info.run_id if parents else None


def write_tables(rows: list[Row], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    fields = list(asdict(rows[0]))
    with (out / "report.csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields)
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    shown = ["run", "setting", "score", "latency_p50_ms", "throughput", "speedup", "usd_per_100m_queries",
             "parameters", "pareto"]
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
    for name, (key, label) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
        xs, ys = [getattr(r, key) for r in rows], [r.score for r in rows]
        ax.scatter(xs, ys, color="tab:blue", label="runs")
        front = sorted((r for r in rows if r.pareto), key=lambda r: getattr(r, key))
        ax.plot([getattr(r, key) for r in front], [r.score for r in front], color="tab:red", marker="o",
                label="Pareto front (latency vs score)")
        for row in rows:
            ax.annotate(f"h{row.heads} f{row.ffn} {row.setting}", (getattr(row, key), row.score), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel=label, ylabel="task score (official metric)", title=title)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        written.append(out / name)
    return written


def report(tracking_uri: str, experiment: str, out: Path, setting: str | None = None) -> list[Path]:
    """Writes the tables and plots into `out` and logs them to the experiment's sweep parent run."""
    client = MlflowClient(tracking_uri)
    rows, parent = collect(client, experiment, setting)
    files = write_tables(rows, out) + plot(rows, out, f"{experiment}: {rows[0].task}")
    if parent is None:
        parent = client.create_run(client.get_experiment_by_name(experiment).experiment_id, run_name="report",
                                   tags={ROLE_TAG: "report"}).info.run_id
        client.set_terminated(parent, "FINISHED")
    for path in files:
        client.log_artifact(parent, str(path), "report")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastformers report", description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="fastformers", help="MLflow experiment (mlflow.experiment_name)")
    parser.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db")
    parser.add_argument("--out", type=Path, default=None, help="default: outputs/reports/<experiment>")
    parser.add_argument("--setting", default=None, help="benchmark setting to plot (default: each run's fastest)")
    args = parser.parse_args(argv)
    try:
        if args.tracking_uri.startswith("sqlite:///") and not Path(args.tracking_uri[len("sqlite:///"):]).is_file():
            raise FastformersError(f"report: --tracking-uri {args.tracking_uri}: no such MLflow store (run a job first)")
        files = report(absolute_uri(args.tracking_uri), args.experiment, args.out or Path("outputs/reports") / args.experiment, args.setting)
    except FastformersError as err:
        print(f"fastformers: error: {err}", file=sys.stderr)
        return 2
    for path in files:
        print(path)
    return 0
