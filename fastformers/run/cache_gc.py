"""`fastformers cache gc`: frees the stage cache of the compress searches' trials that lost (neither on the Pareto
front nor chosen). Entries are shared (the teacher's by every trial, a distilled student by every trial of its depth
and seeding), so an entry goes only when no other run in the MLflow store still names it: the teacher's, a kept
trial's, a running search's, another experiment's. Each removal holds the entry's build lock (run/cache.py's
BuildLock), so an entry being built or rebuilt is skipped, and the folder is renamed away before it is deleted, so
a job looking it up sees it whole or not at all."""

from __future__ import annotations

import argparse
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.tracking import MlflowClient

from fastformers.errors import FastformersError
from fastformers.run.cache import BuildLock, StageCache
from fastformers.tracking.compress_report import PARAMS_TAG, Study, studies, unconstrained_front
from fastformers.tracking.report import checked_store

PATH_TAG = "cache.{}.path"
MODEL_STAGES = ("prune", "distill")  # the entry that makes a student the student it is (the last one a run has)
MB = 1e6


@dataclass
class Plan:
    """What a gc would do: the entries to remove (each with its bytes), those the searches keep, those refused."""

    remove: dict[Path, int] = field(default_factory=dict)
    kept: set[Path] = field(default_factory=set)
    refused: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def entry_paths(run) -> set[Path]:
    """The cache entries a run ran or hit (its `cache.<stage>.path` tags)."""
    return {Path(v) for k, v in run.data.tags.items() if k.startswith("cache.") and k.endswith(".path")}


def model_entry(run) -> str | None:
    """The entry holding the run's student: a held-out check or a timing of a trial shares it with the trial."""
    return next((run.data.tags[PATH_TAG.format(s)] for s in MODEL_STAGES if PATH_TAG.format(s) in run.data.tags), None)


def losing_runs(study: Study, keep_all_front: bool) -> list:
    """The runs of the trials that lost (off the front, not chosen) and the other children of the search that used
    their students (held-out checks, timings); with `keep_all_front`, a trial on the front of score vs multiply-adds
    with the budget ignored is kept too (a looser budget would choose among those)."""
    kept = {t.run_id for t in study.trials if t.front or t.chosen}
    if keep_all_front:
        kept |= {t.run_id for t in unconstrained_front(study.trials)}
    lost = {t.run_id for t in study.trials} - kept
    lost_models = {model_entry(r) for r in study.children if r.info.run_id in lost} - {None}
    return [
        r
        for r in study.children
        if r.info.run_id in lost or (PARAMS_TAG not in r.data.tags and model_entry(r) in lost_models)
    ]


def plan(all_runs: list, searches: list[Study], root: Path, keep_all_front: bool = False) -> Plan:
    """The entries only losing runs name (every other run of the store keeps what it names), checked to be entry
    folders of the cache at `root`."""
    found = Plan()
    losing: list = []
    for study in searches:
        if study.running:
            found.notes.append(f"study {study.name}: a search is still running: all its entries kept")
        else:
            losing += losing_runs(study, keep_all_front)
    losing_ids = {r.info.run_id for r in losing}
    keep = set().union(*(entry_paths(r) for r in all_runs if r.info.run_id not in losing_ids))
    candidates = set().union(*(entry_paths(r) for r in losing)) - keep
    for path in sorted(candidates):
        problem = outside(path, root)
        if problem:
            found.refused.append(f"refused: {path}: {problem}")
        elif path.is_dir():
            found.remove[path] = folder_bytes(path)
    named = set().union(*(entry_paths(r) for study in searches for r in study.children))
    found.kept = {p for p in named - candidates if p.is_dir()}
    return found


def outside(path: Path, root: Path) -> str | None:
    """Why `path` is not an entry folder `<root>/<stage>/<key>` of this cache (None: it is one)."""
    resolved, root = path.resolve(), root.resolve()
    if resolved.parent.parent != root or resolved.name.startswith("."):
        return f"not an entry of the cache root {root} (--cache-dir names the root)"
    return None


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def remove_entry(root: Path, path: Path) -> bool:
    """Removes one entry while holding its build lock (False: another process holds it, the entry is kept). The
    folder is renamed to a hidden name first (atomic: a lookup sees the entry whole or not at all)."""
    stage, key = path.parent.name, path.name
    entry = StageCache(root).entry(stage, key)
    lock = BuildLock(entry.parent / f".{key}.lock")
    try:
        if not lock.try_take():
            return False
        trash = entry.with_name(f".{key}.gc-{uuid.uuid4().hex[:8]}")
        entry.rename(trash)
    except FileNotFoundError:  # removed meanwhile (a damaged entry deleted by a lookup, another gc)
        return False
    finally:
        lock.release()
    shutil.rmtree(trash)
    return True


def collect(uri: str, experiment: str, study: str | None) -> tuple[list, list[Study]]:
    """(every run of the store, the compress searches of `experiment`)."""
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise FastformersError(f"cache gc: --experiment {experiment!r}: no such MLflow experiment in {uri}")
    ids = [e.experiment_id for e in client.search_experiments()]
    all_runs = every_run(client, ids)
    mine = sorted((r for r in all_runs if r.info.experiment_id == found.experiment_id), key=lambda r: r.info.start_time)
    searches = studies(mine, study)
    if not searches:
        named = f" of study {study!r}" if study else ""
        raise FastformersError(f"cache gc: experiment {experiment!r} has no compress search{named}")
    return all_runs, searches


def every_run(client: MlflowClient, experiment_ids: list[str]) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, max_results=5000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def gc(uri: str, experiment: str, root: Path, dry_run: bool, study: str | None, keep_all_front: bool) -> list[str]:
    """Removes (or, dry, lists) the losing trials' entries; returns the lines it says."""
    all_runs, searches = collect(uri, experiment, study)
    found = plan(all_runs, searches, root, keep_all_front)
    lines = found.notes + found.refused
    freed, removed = 0, 0
    for path, size in found.remove.items():
        if dry_run or remove_entry(root, path):
            lines.append(f"{'would remove' if dry_run else 'removed'} {path} ({size / MB:.1f} MB)")
            freed, removed = freed + size, removed + 1
        else:
            lines.append(f"kept {path}: another process holds its build lock")
            found.kept.add(path)
    verb = "would free" if dry_run else "freed"
    lines.append(f"{verb} {freed / MB:.1f} MB in {removed} entries; kept {len(found.kept)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastformers cache", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["gc"])
    parser.add_argument("--experiment", default="compress", help="MLflow experiment of the searches")
    parser.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path("outputs/cache"), help="the cache root (paths.cache_dir)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print what would go and its size; delete nothing")
    parser.add_argument("--study", default=None, help="only this study (compress.study_name; default: every one)")
    parser.add_argument(
        "--keep-all-front", action="store_true", help="also keep the front of score vs GMAC with the budget ignored"
    )
    args = parser.parse_args(argv)
    try:
        uri = checked_store(args.tracking_uri, "cache gc")
        if not args.cache_dir.is_dir():
            raise FastformersError(f"cache gc: --cache-dir {args.cache_dir}: no such folder")
        lines = gc(uri, args.experiment, args.cache_dir, args.dry_run, args.study, args.keep_all_front)
    except FastformersError as err:
        print(f"fastformers: error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0
