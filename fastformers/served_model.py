"""The served model's code file (MLflow "models from code"): the run logs this source, not a pickled object,
so loading `runs:/<id>/model` runs this file and the installed fastformers, never code unpickled from a store."""

import mlflow

from fastformers.serving import EngineTaskModel

mlflow.models.set_model(EngineTaskModel())
