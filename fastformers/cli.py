"""`fastformers`: the Hydra entry point. It only composes the config and hands it to the pipeline;
`fastformers report ...` reads an MLflow experiment back instead (fastformers/report.py)."""

import logging
import signal
import sys
from pathlib import Path
from typing import NoReturn

import hydra
from omegaconf import DictConfig

from fastformers.errors import FastformersError

log = logging.getLogger("fastformers")

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")  # the repo's top-level conf/


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | tuple[float, ...] | None:
    """Returns the run's `sweep_objectives` (by default its main metric), so Hydra sweepers can optimise them."""
    # imported here, not at the top: spawned benchmark instances re-import this module
    from fastformers import pipeline
    from fastformers.quiet import quiet_dependencies

    quiet_dependencies()

    signal.signal(signal.SIGTERM, _stop)
    try:
        return pipeline.objectives(cfg, pipeline.run(cfg))
    except FastformersError as err:
        fail(err)


def fail(err: FastformersError) -> NoReturn:
    """A FastformersError as the user sees it: one line on stderr (and in the job's log), exit status 2."""
    log.error("%s", err)
    print(f"fastformers: error: {err}", file=sys.stderr)
    raise SystemExit(2) from None


_stopped_by: list[int] = []  # the signal that stopped this process, if one did


def _stop(signum, frame):
    """SIGTERM (a scheduler or launcher cancelling the job) unwinds like Ctrl-C: the MLflow run ends FAILED
    instead of staying RUNNING, and unfinished cache entries are removed."""
    _stopped_by.append(signum)  # Lightning turns the KeyboardInterrupt into SystemExit(1); `entry` still knows
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def entry() -> None:
    """The console script: `report` as first word reads MLflow back; anything else is a Hydra run."""
    if sys.argv[1:2] == ["report"]:
        from fastformers.report import main as report

        raise SystemExit(report(sys.argv[2:]))
    signal.signal(signal.SIGTERM, _stop)  # from the start: a multirun stopped between jobs unwinds too
    try:
        main()
    except BaseException as stopped:
        _end_sweep("KILLED" if isinstance(stopped, KeyboardInterrupt) or _stopped_by else "FAILED")
        raise


def _end_sweep(status: str) -> None:
    """Ends the MLflow parent run of a multirun that did not get to its end (a failed job, an error, SIGTERM or
    Ctrl-C): Hydra calls the sweep callback's `on_multirun_end` only after every job succeeded."""
    sweep = sys.modules.get("fastformers.sweep")  # not imported: no multirun started here, no parent to end
    if sweep is not None:
        sweep.end_parent(status)


if __name__ == "__main__":
    entry()
