"""MLflow: one run per Hydra job, with the resolved config as params; SQLite under outputs/ by default."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import mlflow
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

SKIPPED_TAG = "skipped"  # a job that ran no stage (e.g. its task's data is absent here), and why
PARENT_ENV = "FASTFORMERS_SWEEP_RUN_ID"  # set by the sweep callback (fastformers/sweep.py) for its jobs
ROLE_TAG = "fastformers.role"  # `sweep` on the parent run, `report` on a standalone report run


def tracking_uri(cfg: DictConfig) -> str:
    return absolute_uri(cfg.mlflow.tracking_uri)


def absolute_uri(uri: str) -> str:
    """A relative `sqlite:///` path is made absolute, so every process of a sweep hits one store."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        db = Path(uri[len("sqlite:///"):]).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{db}"
    return uri


def experiment_id(cfg: DictConfig) -> str:
    """The experiment, created with its artifacts beside a local store (not in the working dir)."""
    name = cfg.mlflow.experiment_name
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if cfg.mlflow.tracking_uri.startswith("sqlite:"):
        location = (Path(cfg.paths.output_dir).resolve() / "mlartifacts" / name).as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def start_run(cfg: DictConfig) -> mlflow.ActiveRun:
    """Starts this job's run; leaving the `with` block on an exception marks it FAILED (mlflow does that)."""
    if os.environ.pop("MLFLOW_RUN_ID", None):
        log.warning("ignoring MLFLOW_RUN_ID from the environment: each job gets its own run")
    mlflow.set_tracking_uri(tracking_uri(cfg))
    run = mlflow.start_run(experiment_id=experiment_id(cfg), run_name=cfg.mlflow.run_name, tags=parent_tags())
    mlflow.log_params(flat_params(cfg))
    mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    return run


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as dotted params (`task.name`, `finetune.learning_rate`, ...)."""
    flat: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = str(node)[:6000]

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


class PipelineRunLogger(MLFlowLogger):
    """Lightning's MLflow logger writing into the pipeline's run; the pipeline, not the Trainer, ends it."""

    def finalize(self, status: str = "success") -> None:
        pass


def lightning_logger(cfg: DictConfig) -> PipelineRunLogger:
    run = mlflow.active_run()
    return PipelineRunLogger(tracking_uri=tracking_uri(cfg), run_id=run.info.run_id if run else None,
                             experiment_name=cfg.mlflow.experiment_name)


def parent_tags() -> dict[str, str]:
    """Tags that put a job's run under its sweep's parent (the UI nests runs by `mlflow.parentRunId`)."""
    parent = os.environ.get(PARENT_ENV)
    return {"mlflow.parentRunId": parent, "sweep": parent} if parent else {}
