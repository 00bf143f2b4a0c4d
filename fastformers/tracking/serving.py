"""The run's served model as an MLflow model, ready for `mlflow models serve -m runs:/<id>/model`: the
benchmark's pick when the run made one (engine, precision, bucket), else the run's precision on onnxruntime.

Requests carry records in the task's official jsonl shape (e.g. CB: premise, hypothesis, idx); answers are
the leaderboard's submission rows (idx and label), so a served model and a submission file read alike. A task on
your own files (task=text_classification) takes rows with its text field(s) and answers with the label's name.

The model ships its own code (the fastformers package, as MLflow `code_paths`) and pins the libraries it runs
on, so a server built elsewhere (`--env-manager virtualenv`, `mlflow models build-docker`) runs this code, never
the unrelated `fastformers` project of the package registry. Serving limits and the load test: docs/serving.md.
"""

from __future__ import annotations

import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from omegaconf import DictConfig, OmegaConf
from packaging.version import Version

from fastformers.checks import require_number
from fastformers.data.loading import make_loader  # imported with the model, not by the first requests (torch: seconds)
from fastformers.data.tasks import RecordError
from fastformers.engines import (
    PICK,
    REFERENCE,
    Engine,
    artifact_path,
    check_target,
    engine_names,
    get_engine,
    picked_target,
    tokenizer_folder,
)
from fastformers.engines.target import Target
from fastformers.errors import FastformersError
from fastformers.models.loading import predict

ARTIFACT_PATH = "model"
PACKAGE = Path(__file__).resolve().parents[1]  # the fastformers package, shipped with the model as its code
# what the served code imports (the package's own dependencies that serving reaches), by distribution name;
# the engine's own (Engine.requirements) are added per model
RUNTIME_REQUIREMENTS = (
    *("transformers", "tokenizers", "safetensors", "torch", "lightning"),  # models/loading.py, data/loading.py
    *("numpy", "pandas", "scikit-learn", "omegaconf", "packaging"),  # engines, requests, metrics.py, config
)


class EngineTaskModel(PythonModel):
    """Official records in, submission rows out, through the engine's artifact and the model's tokenizer."""

    def load_context(self, context) -> None:
        from transformers import AutoTokenizer

        from fastformers.data import text_classification
        from fastformers.data.tasks import get_task
        from fastformers.engines import EngineModel

        config = context.model_config
        spec = config.get("task_spec")  # a task on your own files: its definition, labels included
        self.task = text_classification.build(dict(spec), with_files=False) if spec else get_task(config["task"])
        self.shape = f"as rows with the field {spec['text_field']}" if spec else "in the official jsonl shape"
        self.max_length = int(config["max_seq_length"])
        self.max_records = config.get("max_records")  # None in a model logged before the limit existed
        target = Target.from_dict(config, "the served model's config")  # the keys models logged before it held
        engine = get_engine(target.engine, {target.engine: config["engine_conf"]})
        self.model = EngineModel(
            engine.open(Path(context.artifacts["model"]), target.precision, None, dict(target.options), target.bucket)
        )
        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["tokenizer"])

    def predict(
        self, context, model_input: list[dict[str, Any]], params: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        records = model_input.to_dict(orient="records") if hasattr(model_input, "to_dict") else list(model_input)
        if self.max_records and len(records) > self.max_records:
            raise MlflowException(
                f"{len(records)} records in one request; this model takes at most serve.max_records="
                f"{self.max_records} (split the request)",
                error_code=INVALID_PARAMETER_VALUE,
            )
        examples = []
        for number, record in enumerate(records):
            try:
                examples.extend(self.task.read({k: v for k, v in record.items() if not _is_nan(v)}))
            except (RecordError, TypeError, KeyError, AttributeError) as err:
                raise MlflowException(
                    f"record {number}: {err} (send {self.task.name} records {self.shape})",
                    error_code=INVALID_PARAMETER_VALUE,
                ) from err
        if not examples:
            raise MlflowException("no records to predict", error_code=INVALID_PARAMETER_VALUE)
        loader = make_loader(examples, self.tokenizer, self.task, self.max_length, 32)
        return self.task.submit(examples, predict(self.model, loader))


def _is_nan(value) -> bool:
    """A hole a DataFrame request leaves where a record lacks a field (NaN is the one value unequal to itself)."""
    return isinstance(value, float) and value != value  # noqa: PLR0124


def served_choice(cfg: DictConfig, pick_folder: Path | None) -> dict:
    """`serve.engine` when set (with `serve.precision`, else the run's, and `serve.bucket`), else the
    benchmark's pick if it chose an exported artifact, else the run's precision on the reference engine; as
    a Target's dict."""
    return served_target(cfg, pick_folder).to_dict()


def served_target(cfg: DictConfig, pick_folder: Path | None) -> Target:
    forced = cfg.serve.engine
    if forced:
        return forced_choice(cfg, str(forced))
    pick = picked_target(pick_folder) if pick_folder and (pick_folder / PICK).is_file() else None
    if pick and not get_engine(pick.engine, cfg.engines).runs_model_folder:
        return pick
    return Target(REFERENCE, cfg.precision.name)


def validate(cfg: DictConfig) -> None:
    """The `serve` settings, checked with the rest of the config: before the stages, not after them."""
    if not cfg.mlflow.serve_model:
        return
    require_number(cfg, "serve.max_records", 1, integer=True, null="no limit", meaning="records per request")
    require_number(cfg, "serve.bucket", 1, integer=True, null="dynamic shapes")
    if cfg.serve.engine:
        forced_choice(cfg, str(cfg.serve.engine))


def forced_choice(cfg: DictConfig, engine_name: str) -> Target:
    """The served model `serve.engine` names (an engine that runs the model folder has no artifact to serve)."""
    servable = [name for name in engine_names(cfg.engines) if not get_engine(name, cfg.engines).runs_model_folder]
    if engine_name not in servable:
        raise FastformersError(
            f"serve.engine={engine_name!r}: serve one of {servable}, or null for the benchmark's pick"
        )
    precision = str(cfg.serve.precision or cfg.precision.name)
    check_target(get_engine(engine_name, cfg.engines), precision, "serve.precision")
    return Target(engine_name, precision, cfg.serve.bucket)


def pinned(distribution: str) -> str:
    """`name==version` of the installed distribution, without a local label (`torch 2.x+cpu` -> `torch==2.x`):
    the registry has no local builds, and a local label makes the requirement uninstallable."""
    return f"{distribution}=={Version(version(distribution)).public}"


def served_requirements(engine: Engine) -> list[str]:
    """The served code's libraries pinned to what this run used; fastformers itself travels as the model's code."""
    return [pinned(name) for name in dict.fromkeys([*RUNTIME_REQUIREMENTS, *engine.requirements])]


def tokenizer_files(onnx_folder: Path, out: Path) -> None:
    """Only the tokenizer's files: the export's folder also holds every graph variant (300 MB for MiniLM-L6 at
    int8), which the served model would otherwise carry beside the one graph it serves."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(tokenizer_folder(onnx_folder))).save_pretrained(str(out))


def log_served_model(onnx_folder: Path, cfg: DictConfig, pick_folder: Path | None = None) -> dict:
    """Logs the chosen artifact (an OpenVINO IR with its weights file) and the tokenizer under the active
    run's `model`; returns the choice."""
    from fastformers.data.task_config import from_files, task_of

    target = served_target(cfg, pick_folder)
    choice = target.to_dict()
    task_spec = {"task_spec": task_of(cfg).spec} if from_files(cfg.task) else {}
    engine = get_engine(target.engine, cfg.engines)
    files = engine.artifact_files(artifact_path(onnx_folder, engine, target.precision))  # copied side by side
    with tempfile.TemporaryDirectory(prefix="fastformers-tokenizer-") as tokenizer:
        tokenizer_files(onnx_folder, Path(tokenizer))
        mlflow.pyfunc.log_model(
            name=ARTIFACT_PATH,
            # models from code: a file path, run when loaded
            python_model=str(PACKAGE / "tracking" / "served_model.py"),
            code_paths=[str(PACKAGE)],  # copied to the model's code/fastformers, put first on sys.path when loaded
            artifacts={role: str(path) for role, path in files.items()} | {"tokenizer": tokenizer},
            pip_requirements=served_requirements(engine),
            model_config={
                "task": cfg.task.name,
                "max_seq_length": cfg.task.max_seq_length,
                "max_records": cfg.serve.max_records,
                "engine_conf": OmegaConf.to_container(cfg.engines[engine.name], resolve=True),
            }
            | task_spec
            | choice,
        )
    mlflow.set_tags({"served.engine": target.engine, "served.precision": target.precision})
    return choice
