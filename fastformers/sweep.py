"""Groups the runs of one Hydra multirun in MLflow: a parent run per sweep, its jobs nested under it.

Registered as a Hydra callback in conf/config.yaml, so it works with any sweeper and launcher: the parent's id
travels to the jobs in an environment variable, which launcher processes (joblib, submitit) inherit.

Hydra calls `on_multirun_end` only when every job succeeded; a multirun that stops on a failed job, an error or a
signal ends its parent through `end_parent` (called by `fastformers.cli.entry`, and at exit as a last resort), so
the parent does not stay RUNNING.
"""

from __future__ import annotations

import atexit
import logging
import os
import time

from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from fastformers import tracking
from fastformers.errors import FastformersError
from fastformers.tracking import PARENT_ENV, ROLE_TAG

log = logging.getLogger(__name__)

_open: dict[str, str | int] = {}  # the parent run this process started and has not ended: uri, run_id, pid


class MlflowSweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """Opens the store (checking the server, creating the store and the experiment under the store's lock,
        ending runs whose process is gone), then creates the sweep's parent run."""
        from fastformers.cli import fail

        try:
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
        os.environ.pop(PARENT_ENV, None)
        end_parent("FINISHED")


def end_parent(status: str) -> None:
    """Ends the parent run of the multirun this process started, if it is still open (FINISHED, FAILED, KILLED)."""
    if not _open or _open["pid"] != os.getpid():  # a forked worker inherits `_open`; the parent is not its own
        return
    uri, run_id = str(_open["uri"]), str(_open["run_id"])
    _open.clear()
    try:
        MlflowClient(uri).set_terminated(run_id, status)
    except Exception as err:  # on the way out of a failed sweep: say so, and let the first error be the one shown
        log.warning("could not end the sweep's parent run %s as %s: %s", run_id, status, err)


atexit.register(end_parent, "FAILED")  # the last resort for a multirun not started by `fastformers.cli.entry`
