"""The served model's code file (MLflow "models from code"): the run logs this source, not a pickled object, and
the fastformers package beside it as the model's code, so loading `runs:/<id>/model` runs this file and that
stored package (trust a store as you trust code; docs/serving.md says what else is checked)."""

import mlflow

from fastformers.tracking.serving import EngineTaskModel

mlflow.models.set_model(EngineTaskModel())
