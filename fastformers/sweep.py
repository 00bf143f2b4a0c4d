"""Groups the runs of one Hydra multirun in MLflow: a parent run per sweep, its jobs nested under it.

Registered as a Hydra callback in conf/config.yaml, so it works with any sweeper and launcher: the parent's id
travels to the jobs in an environment variable, which launcher processes (joblib, submitit) inherit.
"""
from __future__ import annotations

import os
import time

import mlflow
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from fastformers import tracking
from fastformers.tracking import PARENT_ENV, ROLE_TAG


class MlflowSweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """Creates the store and the experiment once, here, before parallel jobs race to (SQLite migrations
        are not safe against two first writers), then the sweep's parent run."""
        uri = tracking.tracking_uri(config)
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        experiment = tracking.experiment_id(config)
        overrides = " ".join(config.hydra.overrides.task) if "hydra" in config else ""
        run = client.create_run(experiment, run_name=f"sweep {time.strftime('%Y-%m-%d %H:%M:%S')}",
                                tags={ROLE_TAG: "sweep", "sweep.overrides": overrides[:5000]})
        os.environ[PARENT_ENV] = run.info.run_id

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        parent = os.environ.pop(PARENT_ENV, None)
        if parent:
            MlflowClient(tracking.tracking_uri(config)).set_terminated(parent, "FINISHED")
