"""`fastformers`: the Hydra entry point. It only composes the config and hands it to the pipeline;
`fastformers report ...` reads an MLflow experiment back instead (fastformers/tracking/report.py), and
`fastformers cache gc` frees the cache entries of a compress search's losing trials (fastformers/run/cache_gc.py)."""

import difflib
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from fastformers.checks import check_config, first_line
from fastformers.errors import STOP_SIGNALS, FastformersError, fail, print_once, stop_message, stop_signal
from fastformers.run.quiet import VERBOSE_ENV, quiet_dependencies, verbose
from fastformers.tracking.server import check_server

log = logging.getLogger("fastformers")

VERBOSE_FLAGS = ("-v", "--verbose")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")  # the repo's top-level conf/


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | tuple[float, ...] | None:
    """Returns the run's `sweep_objectives` (by default its main metric), so Hydra sweepers can optimise them."""
    try:
        check_config(cfg)  # before the heavy imports: bad input fails within a second or two
        check_tracking_server(cfg)  # and a server that is down fails within seconds
    except FastformersError as err:
        fail(err)
    set_verbosity(bool(HydraConfig.get().verbose))
    from fastformers.run import pipeline  # after set_verbosity: some noise is raised while modules are imported

    _catch_stop_signals()
    try:
        if "compress" in cfg:  # experiment=compress (or pruning_search): a search of runs, not one run
            from fastformers.run import compress

            compress.run(cfg)
            return None
        return pipeline.objectives(cfg, pipeline.run(cfg))
    except FastformersError as err:
        fail(err)


def check_tracking_server(cfg: DictConfig) -> None:
    """Asks an http(s) tracking server whether it is up, with nothing heavy imported yet (mlflow, torch and
    lightning take seconds to import); a URI that does not resolve is left to `pipeline.validate` to name."""
    try:
        uri = str(cfg.mlflow.tracking_uri)
    except OmegaConfBaseException:
        return
    check_server(uri)


def set_verbosity(hydra_verbose: bool) -> None:
    """Quiet by default: the dependencies' noise is silenced at its source (fastformers/run/quiet.py). `-v` or
    `hydra.verbose=true` shows it all, with this package's own debug lines; spawned processes inherit the choice."""
    if hydra_verbose:
        os.environ[VERBOSE_ENV] = "1"
    if verbose():
        logging.getLogger("fastformers").setLevel(logging.DEBUG)
    quiet_dependencies()


_stopped_by = STOP_SIGNALS  # the signal that stopped this process, if one did


def _stop(signum, frame):
    """SIGTERM (a scheduler or launcher cancelling the job) and Ctrl-C unwind as KeyboardInterrupt: the MLflow run
    ends KILLED instead of staying RUNNING, and unfinished cache entries are removed. Only the first signal raises:
    a second one must not interrupt the cleanup the first started."""
    _stopped_by.append(signum)  # Lightning turns the KeyboardInterrupt into SystemExit(1); `entry` still knows
    if len(_stopped_by) == 1:
        raise KeyboardInterrupt(f"stopped by signal {signum}")


def _catch_stop_signals() -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop)


def entry() -> None:
    """The console script: `report` as first word reads MLflow back, `cache gc` frees cache entries; anything else
    is a Hydra run. A run stopped by a signal ends with one line saying what it marked KILLED, and exit status
    128 + the signal's number."""
    if sys.argv[1:2] == ["report"]:
        from fastformers.tracking.report import main as report

        raise SystemExit(report(sys.argv[2:]))
    if sys.argv[1:2] == ["cache"]:
        from fastformers.run.cache_gc import main as cache

        raise SystemExit(cache(sys.argv[2:]))
    _catch_stop_signals()  # from the start: a multirun stopped between jobs unwinds too
    take_verbose_flag(sys.argv)
    from hydra._internal import utils as hydra_internal

    hydra_report = hydra_internal.run_and_report
    hydra_internal.run_and_report = lambda func: hydra_report(lambda: config_errors_in_one_line(func))
    try:
        main()
    except BaseException as err:
        signum = stop_signal(err)
        _end_sweep("KILLED" if signum is not None else "FAILED")
        if signum is None:
            raise
        line = stop_message(signum)
        print_once(line, logging.WARNING, line.removeprefix("fastformers: "))
        raise SystemExit(128 + signum) from None
    finally:
        hydra_internal.run_and_report = hydra_report


def take_verbose_flag(argv: list[str]) -> None:
    """`-v` / `--verbose` is this CLI's flag, not Hydra's: taken out of argv before Hydra parses it."""
    for flag in VERBOSE_FLAGS:
        while flag in argv[1:]:
            argv.remove(flag)
            os.environ[VERBOSE_ENV] = "1"


def config_errors_in_one_line(func: Callable[[], Any]) -> Any:
    """Hydra runs each step (composing, showing, running, sweeping) through `run_and_report`, which prints an
    error in several lines and exits 1; `entry` routes every step through here first, so that the errors of
    composing the config (an unknown group option or key, an override that does not parse, an interpolation
    that fails) end as bad input: one line, exit 2. What a job itself raises is left to Hydra (the job's own
    bad input is already a FastformersError), and so is everything when HYDRA_FULL_ERROR=1 asks for traces."""
    try:
        return func()
    except (ConfigCompositionException, OverrideParseException, OmegaConfBaseException) as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or _raised_by_job(err):
            raise
        fail(FastformersError(config_error(err)))


def _raised_by_job(err: BaseException) -> bool:
    """Whether the exception came out of the task function (`main`), not out of composing its config."""
    job = main.__wrapped__.__code__  # hydra.main wraps the task function with functools.wraps
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is job:
            return True
        tb = tb.tb_next
    return False


def config_error(err: Exception) -> str:
    """Hydra's multi-line report of a config error as one line that names what to fix."""
    cause = err.__cause__
    if isinstance(err, MissingConfigException) and "/" in (err.missing_cfg_file or ""):
        group, _, option = str(err.missing_cfg_file).rpartition("/")
        options = list(err.options or [])
        guess = difflib.get_close_matches(option, options, n=1)
        return (
            f"{group}={option}: no such option in config group '{group}'"
            + (f"; did you mean {group}={guess[0]}?" if guess else "")
            + (f" (options: {', '.join(options)})" if options else "")
        )
    if isinstance(err, OverrideParseException):
        return f"{err.override}: not a valid override: " + "; ".join(_lines(err.message))
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and isinstance(cause.full_key, str):
        parent, name = cause.parent_node, cause.full_key.rpartition(".")[2]
        if not (isinstance(parent, DictConfig) and name in parent):  # the key is not there (else: say what Hydra says)
            return unknown_key(cause.full_key, parent)
    if isinstance(err, OmegaConfBaseException):
        key = getattr(err, "full_key", None)
        return f"{key}: {first_line(err)}" if key else first_line(err)
    cause_line = f" ({first_line(cause)})" if isinstance(cause, OmegaConfBaseException) else ""
    return "; ".join(_lines(str(err))) + cause_line


def unknown_key(full_key: str, parent: Any) -> str:
    """The line for a key the config does not have, with the closest key of the same node if one is close:
    `finetune.epohcs: no such key; did you mean finetune.epochs?`."""
    prefix, _, name = full_key.rpartition(".")
    keys = [str(key) for key in parent] if isinstance(parent, DictConfig) else []
    guess = difflib.get_close_matches(name, keys, n=1)
    where = f"{prefix}." if prefix else ""
    if guess:
        return f"{full_key}: no such key; did you mean {where}{guess[0]}?"
    have = f"; {prefix or 'the config'} has {', '.join(keys)}" if keys else ""
    return f"{full_key}: no such key{have} (+{full_key}=... adds one)"


def _lines(message: str) -> list[str]:
    """The lines of a Hydra message worth one line: without blanks and without the config search path."""
    kept = []
    for line in message.splitlines():
        if line.startswith("Config search path"):
            break
        if line.strip():
            kept.append(line.strip())
    return [line.rstrip(".") for line in kept[:-1]] + kept[-1:]


def _end_sweep(status: str) -> None:
    """Ends the MLflow parent run of a multirun that did not get to its end (a failed job, an error, SIGTERM or
    Ctrl-C): Hydra calls the sweep callback's `on_multirun_end` only after every job succeeded."""
    sweep = sys.modules.get("fastformers.run.sweep")  # not imported: no multirun started here, no parent to end
    if sweep is not None:
        sweep.end_parent(status)


if __name__ == "__main__":
    entry()
