"""The one exception type the CLI turns into a single clear error line, and the record of a stop signal."""

from __future__ import annotations

import logging
import signal
import sys
from typing import NoReturn


class FastformersError(Exception):
    """Bad input or config: the message names the field or file and says what to do."""


def fail(err: FastformersError) -> NoReturn:
    """A FastformersError as the user sees it: one line on stderr, once (and in the job's log file), exit 2. Here,
    not in the CLI, so that Hydra callbacks (the sweep's) end the same way without importing the CLI."""
    print_once(f"fastformers: error: {err}", logging.ERROR, str(err))
    raise SystemExit(2) from None


def print_once(line: str, level: int, logged: str) -> None:
    """`line` on stderr, and `logged` into the job's log file, not through Hydra's console handler, which would
    show it on the terminal a second time."""
    log = logging.getLogger("fastformers")
    record = log.makeRecord(log.name, level, __file__, 0, logged, (), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    print(line, file=sys.stderr, flush=True)


STOP_SIGNALS: list[int] = []  # signals received (SIGTERM from a scheduler, a launcher cancelling a job; Ctrl-C)
STOPPED_RUNS: list[str] = []  # what a stop ended and marked KILLED ("run <id> (<name>)"), for the CLI's last line


def check_stopped() -> None:
    """Raises KeyboardInterrupt if a stop signal arrived: the signal handler raises at once, but an exception
    raised inside a library call (an SQLAlchemy finalizer, a logger) can be swallowed there, so training checks
    this after every batch and the pipeline after every stage, and a stopped job never ends FINISHED."""
    if STOP_SIGNALS:
        raise KeyboardInterrupt(f"stopped by signal {STOP_SIGNALS[0]}")


def stop_signal(err: BaseException | None = None) -> int | None:
    """The signal that stopped this process, if one did: the first recorded stop signal, else SIGINT when `err` is
    a KeyboardInterrupt or was raised while handling one (Lightning turns it into SystemExit(1))."""
    if STOP_SIGNALS:
        return STOP_SIGNALS[0]
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return signal.SIGINT
        seen.add(id(err))
        err = err.__context__
    return None


def stop_message(signum: int) -> str:
    """The one line a stopped command ends with: what stopped it and which runs it marked KILLED."""
    what = f"{' and '.join(STOPPED_RUNS)} marked KILLED" if STOPPED_RUNS else "no run was open"
    return f"fastformers: stopped by {signal.Signals(signum).name}: {what}"
