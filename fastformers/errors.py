"""The one exception type the CLI turns into a single clear error line, and the record of a stop signal."""


class FastformersError(Exception):
    """Bad input or config: the message names the field or file and says what to do."""


STOP_SIGNALS: list[int] = []  # signals received (SIGTERM from a scheduler, a launcher cancelling a job)


def check_stopped() -> None:
    """Raises KeyboardInterrupt if a stop signal arrived: the signal handler raises at once, but an exception
    raised inside a library call (an SQLAlchemy finalizer, a logger) can be swallowed there, so training checks
    this after every batch and the pipeline after every stage, and a stopped job never ends FINISHED."""
    if STOP_SIGNALS:
        raise KeyboardInterrupt(f"stopped by signal {STOP_SIGNALS[0]}")
