"""What a run leaves: MLflow tracking, the report read back from it, and the served MLflow model."""
