"""The run's exported graph as an MLflow model, ready for `mlflow models serve -m runs:/<id>/model`.

Requests carry records in the task's official jsonl shape (e.g. CB: premise, hypothesis, idx); answers are
the leaderboard's submission rows (idx and label), so a served model and a submission file read alike.
"""
from __future__ import annotations

from pathlib import Path

import mlflow
import onnxruntime as ort
import transformers
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from omegaconf import DictConfig

from fastformers.runtime import GRAPHS, graph_path

ARTIFACT_PATH = "model"


class OnnxTaskModel(mlflow.pyfunc.PythonModel):
    """Official records in, submission rows out, through the ONNX graph and the model's tokenizer."""

    def load_context(self, context) -> None:
        from transformers import AutoTokenizer

        from fastformers.runtime import OnnxClassifier
        from fastformers.tasks import get_task

        self.task = get_task(context.model_config["task"])
        self.max_length = int(context.model_config["max_seq_length"])
        self.model = OnnxClassifier(context.artifacts["graph"])
        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["tokenizer"])

    def predict(self, context, model_input, params=None) -> list[dict]:
        from fastformers.data import make_loader
        from fastformers.models import predict
        from fastformers.tasks import RecordError

        records = model_input.to_dict(orient="records") if hasattr(model_input, "to_dict") else list(model_input)
        examples = []
        for number, record in enumerate(records):
            try:
                examples.extend(self.task.read({k: v for k, v in record.items() if v == v}))  # drop NaN holes
            except (RecordError, TypeError, KeyError, AttributeError) as err:
                raise MlflowException(f"record {number}: {err} (send {self.task.name} records in the official "
                                      "jsonl shape)", error_code=INVALID_PARAMETER_VALUE) from err
        if not examples:
            raise MlflowException("no records to predict", error_code=INVALID_PARAMETER_VALUE)
        loader = make_loader(examples, self.tokenizer, self.task, self.max_length, 32)
        return self.task.submit(examples, predict(self.model, loader))


def log_served_model(onnx_folder: Path, cfg: DictConfig) -> None:
    """Logs the precision's graph and its tokenizer under the active run's `model`."""
    mlflow.pyfunc.log_model(
        name=ARTIFACT_PATH,
        python_model=OnnxTaskModel(),
        artifacts={"graph": str(graph_path(onnx_folder)), "tokenizer": str(onnx_folder / GRAPHS)},
        model_config={"task": cfg.task.name, "max_seq_length": cfg.task.max_seq_length},
        pip_requirements=[f"onnxruntime=={ort.__version__}", f"transformers=={transformers.__version__}",
                          "fastformers"],
    )
