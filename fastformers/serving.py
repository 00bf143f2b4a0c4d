"""The run's served model as an MLflow model, ready for `mlflow models serve -m runs:/<id>/model`: the
benchmark's pick when the run made one (engine, precision, bucket), else the run's precision on onnxruntime.

Requests carry records in the task's official jsonl shape (e.g. CB: premise, hypothesis, idx); answers are
the leaderboard's submission rows (idx and label), so a served model and a submission file read alike. A task on
your own files (task=text_classification) takes rows with its text field(s) and answers with the label's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import transformers
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from omegaconf import DictConfig, OmegaConf

from fastformers.engines import PICK, artifact_path, get_engine, read_pick, tokenizer_folder

ARTIFACT_PATH = "model"


class EngineTaskModel(PythonModel):
    """Official records in, submission rows out, through the engine's artifact and the model's tokenizer."""

    def load_context(self, context) -> None:
        from transformers import AutoTokenizer

        from fastformers import text_classification
        from fastformers.engines import EngineModel
        from fastformers.tasks import get_task

        config = context.model_config
        spec = config.get("task_spec")  # a task on your own files: its definition, labels included
        self.task = text_classification.build(dict(spec), with_files=False) if spec else get_task(config["task"])
        self.shape = f"as rows with the field {spec['text_field']}" if spec else "in the official jsonl shape"
        self.max_length = int(config["max_seq_length"])
        engine = get_engine(config["engine"], {config["engine"]: config["engine_conf"]})
        self.model = EngineModel(
            engine.open(
                Path(context.artifacts["model"]), config["precision"], None, config["options"], config["bucket"]
            )
        )
        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["tokenizer"])

    def predict(
        self, context, model_input: list[dict[str, Any]], params: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        from fastformers.data import make_loader
        from fastformers.models import predict
        from fastformers.tasks import RecordError

        records = model_input.to_dict(orient="records") if hasattr(model_input, "to_dict") else list(model_input)
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
    """The benchmark's pick if it chose an exported artifact, else the run's precision on onnxruntime."""
    pick = read_pick(pick_folder) if pick_folder and (pick_folder / PICK).is_file() else None
    if pick and pick["engine"] != "torch":
        return {k: pick[k] for k in ("engine", "precision", "bucket", "options")}
    return {"engine": "onnxruntime", "precision": cfg.precision.name, "bucket": None, "options": {}}


def log_served_model(onnx_folder: Path, cfg: DictConfig, pick_folder: Path | None = None) -> dict:
    """Logs the chosen artifact (an OpenVINO IR with its weights file) and the tokenizer under the active
    run's `model`; returns the choice."""
    from fastformers.tasks import from_files, task_of

    choice = served_choice(cfg, pick_folder)
    task_spec = {"task_spec": task_of(cfg).spec} if from_files(cfg.task) else {}
    engine = get_engine(choice["engine"], cfg.engines)
    path = artifact_path(onnx_folder, engine, choice["precision"])
    artifacts = {"model": str(path), "tokenizer": str(tokenizer_folder(onnx_folder))}
    if path.suffix == ".xml":
        artifacts["weights"] = str(path.with_suffix(".bin"))  # copied beside the .xml, where OpenVINO looks
    package = {"onnxruntime": "onnxruntime", "openvino": "openvino"}.get(engine.name)
    requirements = [f"transformers=={transformers.__version__}", "fastformers"]
    if package:
        requirements.append(f"{package}=={__import__(package).__version__}")
    mlflow.pyfunc.log_model(
        name=ARTIFACT_PATH,
        python_model=str(Path(__file__).with_name("served_model.py")),
        artifacts=artifacts,
        pip_requirements=requirements,
        model_config={
            "task": cfg.task.name,
            "max_seq_length": cfg.task.max_seq_length,
            "engine_conf": OmegaConf.to_container(cfg.engines[engine.name], resolve=True),
        }
        | task_spec
        | choice,
    )
    mlflow.set_tags({"served.engine": choice["engine"], "served.precision": choice["precision"]})
    return choice
