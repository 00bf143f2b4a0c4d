"""Groups the runs of one Hydra multirun in MLflow: a parent run per sweep, its jobs nested under it.

Registered as a Hydra callback in conf/config.yaml, so it works with any sweeper and launcher: the parent's id
travels to the jobs in an environment variable, which launcher processes (joblib, submitit) inherit.

Hydra calls `on_multirun_end` only when every job succeeded; a multirun that stops on a failed job, an error or a
signal ends its parent through `end_parent` (called by `fastformers.run.cli.entry`, and at exit as a last resort), so
the parent does not stay RUNNING.
"""

from __future__ import annotations

import atexit
import logging
import os
import time

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fastformers.errors import STOPPED_RUNS, FastformersError, fail
from fastformers.tracking.server import check_server

log = logging.getLogger(__name__)

_open: dict[str, str | int] = {}  # the parent run this process started and has not ended: uri, run_id, pid


class MlflowSweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """Opens the store (checking the server, creating the store and the experiment under the store's lock,
        ending runs whose process is gone), then creates the sweep's parent run. Hydra builds this callback for
        every command, so mlflow (seconds to import) is imported only here, once a server was found up."""
        try:
            check_server(str(config.mlflow.tracking_uri))
            from mlflow.tracking import MlflowClient

            from fastformers.tracking import runs as tracking
            from fastformers.tracking.runs import PARENT_ENV, ROLE_TAG

            experiment = tracking.open_experiment(config)
        except FastformersError as err:
            fail(err)
        uri = tracking.tracking_uri(config)
        overrides = " ".join(config.hydra.overrides.task) if "hydra" in config else ""
        run = MlflowClient(uri).create_run(
            experiment,
            run_name=f"sweep {time.strftime('%Y-%m-%d %H:%M:%S')}",
            tags={ROLE_TAG: "sweep", "sweep.overrides": overrides[:5000]} | tracking.owner_tags(),
        )
        os.environ[PARENT_ENV] = run.info.run_id
        _open.update(uri=uri, run_id=run.info.run_id, pid=os.getpid())

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from fastformers.tracking.runs import PARENT_ENV

        os.environ.pop(PARENT_ENV, None)
        end_parent("FINISHED")


def end_parent(status: str) -> None:
    """Ends the parent run of the multirun this process started, if it is still open (FINISHED, FAILED, KILLED),
    retried while the store is locked (`tracking.write_end`)."""
    if not _open or _open["pid"] != os.getpid():  # a forked worker inherits `_open`; the parent is not its own
        return
    from fastformers.tracking import runs as tracking

    uri, run_id = str(_open["uri"]), str(_open["run_id"])
    _open.clear()
    problem = tracking.write_end(uri, run_id, status)
    if problem is not None:  # on the way out of a failed sweep: say so, and let the first error be the one shown
        log.warning("could not end the sweep's parent run %s as %s: %s", run_id, status, problem)
    elif status == "KILLED":
        STOPPED_RUNS.append(f"the sweep's parent run {run_id}")


atexit.register(end_parent, "FAILED")  # the last resort for a multirun not started by `fastformers.run.cli.entry`
