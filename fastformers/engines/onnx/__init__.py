"""ONNX graph building, split the way optimum splits it: `convert` (PyTorch -> ONNX), `optimize`
(onnxruntime's transformer fusions), `quantize` (int8 dynamic/static, outliers, fp16). Each step writes
`<stem>_<suffix>.onnx` with a json of its settings beside it: model.onnx -> model_optimized.onnx ->
model_optimized_quantized.onnx."""

import json
from pathlib import Path


def sibling(path: Path, suffix: str) -> Path:
    """`model.onnx` -> `model_<suffix>.onnx`, the naming optimum uses for derived graphs."""
    return path.with_name(f"{path.stem}_{suffix}{path.suffix}")


def settings_path(graph: Path) -> Path:
    return graph.with_suffix(".json")


def write_settings(graph: Path, settings: dict) -> None:
    """What made the graph, beside it, so a file found later explains itself."""
    settings_path(graph).write_text(json.dumps(settings, indent=2, default=str))
