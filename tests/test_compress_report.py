"""After a compress search: its Pareto figure and trial table in `fastformers report`, and `fastformers cache gc`
freeing the entries of the trials that lost. Both read a fake search's MLflow runs (a parent, the teacher's run, a
run per trial, a held-out check) whose cache entries are fake folders."""

from __future__ import annotations

import csv
import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from fastformers.run import cache_gc
from fastformers.run.cache import BuildLock
from fastformers.tracking import compress_report
from fastformers.tracking.report import experiment_runs, report
from fastformers.tracking.runs import ROLE_TAG
from tests.test_report import log_run, store  # noqa: F401 (store: the fixture)

STUDY = "compress/cb/tiny/holdout0.1"
# trial: (layers, heads, ffn, GMAC/ex, score, within budget, on the front, p50 ms or None, its entries)
TRIALS = {
    0: (1, 1.0, 1.0, 1.0, 0.70, 0, False, None, ["distill/d1", "prune/p0", "export/e0", "evaluate/v0"]),
    1: (2, 1.0, 1.0, 2.0, 0.80, 1, True, 4.0, ["distill/d2", "prune/p1", "export/e1", "evaluate/v1"]),
    2: (2, 0.5, 0.5, 1.5, 0.795, 1, True, 3.0, ["distill/d2", "prune/p2", "export/e2", "evaluate/v2"]),
    3: (2, 1.0, 0.5, 1.8, 0.79, 1, False, None, ["distill/d2", "prune/p3", "export/e3", "evaluate/v3"]),
    4: (3, 1.0, 1.0, 3.0, 0.78, 0, False, None, ["distill/d3", "prune/p4", "export/e4", "evaluate/v4"]),
}
TEACHER = ["finetune/t", "export/te", "evaluate/tv"]
EXTRAS = [["prune/p2", "evaluate/h2"], ["prune/p3", "evaluate/h3"]]  # held-out checks of trials 2 and 3
LOST = ["distill/d1", "prune/p0", "export/e0", "evaluate/v0", "prune/p3", "export/e3", "evaluate/v3", "evaluate/h3",
        "distill/d3", "export/e4", "evaluate/v4"]  # fmt: skip
KEPT = ["finetune/t", "export/te", "evaluate/tv", "distill/d2", "prune/p1", "export/e1", "evaluate/v1", "prune/p2",
        "export/e2", "evaluate/v2", "evaluate/h2", "prune/p4"]  # fmt: skip  # p4: another experiment's run names it

PARENT_METRICS = {
    "compress/teacher_score": 0.80,
    "compress/teacher_gmacs": 10.0,
    "compress/teacher_latency_p50_ms": 9.0,
    "compress/chosen_trial": 2,
    "compress/chosen_gmacs": 1.5,
    "compress/chosen_score": 0.795,
    "compress/paper_baseline_gmacs": 20.0,
    "compress/paper_student_gmacs": 20 / 124,
}


def entry_tags(root, entries):
    """`cache.<stage>.path` tags of a run that used these entries, each a folder with a file of 1 MB."""
    tags = {}
    for entry in entries:
        folder = root / entry
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "weights.bin").write_bytes(b"\0" * 1_000_000)
        tags[f"cache.{entry.split('/')[0]}.path"] = str(folder)
    return tags


def fake_search(root, front_tags=True, outside=None):
    """A finished compress search in experiment `compress` (trial 2 chosen), and a plain run in another
    experiment that names prune/p4; `outside`: a folder outside the cache that trial 4's run names."""
    mlflow.set_experiment("compress")
    with mlflow.start_run(run_name="compress cb", tags={ROLE_TAG: "compress", "compress.study": STUDY,
                                                        "compress.max_drop": "1.0"}) as parent:  # fmt: skip
        mlflow.log_metrics(PARENT_METRICS)
    child = {"mlflow.parentRunId": parent.info.run_id}
    log_run("teacher", {"task.name": "cb"}, {"evaluate/val/score": 0.80}, child | entry_tags(root, TEACHER))
    for number, (layers, heads, ffn, gmacs, score, within, front, latency, entries) in TRIALS.items():
        point = {"layers": layers, "seeding": "bottom", "heads": heads, "ffn": ffn}
        tags = child | entry_tags(root, entries) | {"compress.params": json.dumps(point), "compress.trial": str(number)}
        tags |= {"compress.front": "1"} if front and front_tags else {}
        tags |= {"cache.benchmark.path": str(outside)} if outside and number == 4 else {}
        metrics = {
            "evaluate/val/score": score,
            "compress/gmacs_per_example": gmacs,
            "compress/within_budget": within,
            "compress/delta_points": 100 * (score - 0.80),
            "compress/gate_p": 0.5,
            "compress/shape_layers": layers,
            "compress/shape_heads": 4 * heads,
            "compress/shape_ffn": 128 * ffn,
        }
        metrics |= {"compress/latency_p50_ms": latency} if latency else {}
        log_run(f"trial {number}", {"task.name": "cb"}, metrics, tags)
    for entries in EXTRAS:
        log_run(
            "held-out", {"task.name": "cb"}, {"evaluate/train_90-100pct/score": 0.7}, child | entry_tags(root, entries)
        )
    mlflow.set_experiment("fastformers")
    log_run("cb", {"task.name": "cb"}, {"evaluate/val/score": 0.78}, entry_tags(root, ["prune/p4"]))


def test_the_report_draws_the_search_and_tables_its_trials(store, tmp_path):  # noqa: F811
    fake_search(tmp_path / "cache")
    files = report(store, "compress", tmp_path / "out")  # no benchmark timings: the search's files alone
    slug = "compress_cb_tiny_holdout0.1"
    assert {path.name for path in files} == {f"compress_pareto_{slug}.png", f"compress_trials_{slug}.csv"}
    assert (tmp_path / "out" / f"compress_pareto_{slug}.png").stat().st_size > 10_000
    with (tmp_path / "out" / f"compress_trials_{slug}.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert [row["trial"] for row in rows] == ["0", "2", "3", "1", "4"]  # fewest multiply-adds first
    assert [row["front"] for row in rows] == ["False", "True", "False", "True", "False"]
    assert [row["chosen"] for row in rows] == ["False", "True", "False", "False", "False"]
    assert [row["latency"] for row in rows] == ["", "3.0", "", "4.0", ""]
    assert json.loads(rows[1]["params"])["heads"] == 0.5 and rows[1]["within_budget"] == "True"


def test_a_store_without_front_tags_gets_the_front_within_the_budget_computed(store, tmp_path):  # noqa: F811
    fake_search(tmp_path / "cache", front_tags=False)
    _, runs = experiment_runs(MlflowClient(store), "compress")
    (study,) = compress_report.studies(runs)
    assert sorted(t.number for t in study.trials if t.front) == [1, 2]  # trial 0 is smaller but out of budget
    assert [t.number for t in study.trials if t.chosen] == [2]
    for trial in study.trials:  # a search that timed no trial: the latency panel says so instead of an empty axis
        trial.latency = None
    assert compress_report.plot_pareto(study, tmp_path).stat().st_size > 10_000


def test_cache_gc_frees_the_losing_trials_entries_and_keeps_shared_ones(store, tmp_path, capsys):  # noqa: F811
    root = tmp_path / "cache"
    fake_search(root)
    args = ["gc", "--tracking-uri", store, "--cache-dir", str(root)]
    assert cache_gc.main([*args, "--dry-run"]) == 0
    dry = capsys.readouterr().out.splitlines()
    assert dry[-1] == f"would free {len(LOST):.1f} MB in {len(LOST)} entries; kept {len(KEPT)}"
    assert all((root / entry).is_dir() for entry in LOST)  # a dry run deletes nothing
    assert cache_gc.main([*args, "--dry-run", "--keep-all-front"]) == 0  # trial 0: the fewest GMAC, out of budget
    assert capsys.readouterr().out.splitlines()[-1] == f"would free 7.0 MB in 7 entries; kept {len(KEPT) + 4}"
    assert cache_gc.main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert sorted(line.split()[1] for line in out[:-1]) == sorted(str(root / entry) for entry in LOST)
    assert not any((root / entry).exists() for entry in LOST)
    assert all((root / entry).is_dir() for entry in KEPT)
    assert sorted(p.name for p in (root / "prune").iterdir()) == ["p1", "p2", "p4"]  # no lock or trash left


def test_cache_gc_refuses_a_path_outside_the_cache_root(store, tmp_path, capsys):  # noqa: F811
    elsewhere = tmp_path / "elsewhere" / "benchmark" / "run"
    fake_search(tmp_path / "cache", outside=elsewhere)
    elsewhere.mkdir(parents=True)
    assert cache_gc.main(["gc", "--tracking-uri", store, "--cache-dir", str(tmp_path / "cache")]) == 0
    assert f"refused: {elsewhere}: not an entry of the cache root" in capsys.readouterr().out
    assert elsewhere.is_dir() and not (tmp_path / "cache" / "distill" / "d3").exists()


def test_cache_gc_keeps_a_running_search_and_an_entry_another_process_builds(store, tmp_path, capsys):  # noqa: F811
    root = tmp_path / "cache"
    fake_search(root)
    client = MlflowClient(store)
    client.create_run(client.get_experiment_by_name("compress").experiment_id,
                      tags={ROLE_TAG: "compress", "compress.study": STUDY})  # fmt: skip  # resumed, still running
    assert cache_gc.main(["gc", "--tracking-uri", store, "--cache-dir", str(root)]) == 0
    assert "still running" in capsys.readouterr().out and all((root / e).is_dir() for e in LOST)
    held = BuildLock(root / "distill" / ".d1.lock")  # another build of d1 holds its lock
    assert held.try_take()
    try:
        assert not cache_gc.remove_entry(root, root / "distill" / "d1")  # it tries the lock for 2 s, then gives up
    finally:
        held.release()
    assert (root / "distill" / "d1").is_dir() and cache_gc.remove_entry(root, root / "distill" / "d1")


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["gc", "--tracking-uri", "sqlite:///{tmp}/none.db"], "no such MLflow store"),
        (["gc", "--tracking-uri", "{store}", "--experiment", "nope"], "--experiment 'nope': no such MLflow experiment"),
    ],
)
def test_cache_gc_names_a_missing_store_or_experiment(store, tmp_path, capsys, argv, says):  # noqa: F811
    fake_search(tmp_path / "cache")
    capsys.readouterr()  # MLflow's lines while the store was made
    argv = [a.format(tmp=tmp_path, store=store) for a in argv] + ["--cache-dir", str(tmp_path / "cache")]
    assert cache_gc.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1
