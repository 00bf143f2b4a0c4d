"""Exported graphs run by ONNX Runtime, called like a transformers model (`model(**inputs).logits`), so
`predict`, the evaluate stage, the export parity check and the benchmark treat ONNX and PyTorch alike.
PyTorch and transformers are imported only where used: a benchmark instance serving a graph through
`OnnxClassifier.run` never loads them, so its memory is the graph's."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort

from fastformers.errors import FastformersError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DISABLED_OPTIMIZERS = "fastformers.disabled_optimizers"  # graph metadata: session fusions the graph must not get
INDEX = "export.json"  # written by the export stage: which graph file holds which precision
GRAPHS = "model"       # the export stage's subfolder of graphs and tokenizer (kept out of MLflow artifacts)


def providers_for(precision: str) -> list[str]:
    """fp16 graphs are built for the CUDA execution provider; everything else runs on the CPU."""
    return [CUDA] if precision == "fp16" else [CPU]


def require_provider(provider: str, field: str) -> None:
    available = ort.get_available_providers()
    if provider not in available:
        raise FastformersError(f"{field}: needs onnxruntime's {provider} (install onnxruntime-gpu on a CUDA "
                               f"machine); this onnxruntime offers {available}")


def session_options(threads: int | None, extra: dict | None = None) -> ort.SessionOptions:
    """One session per process: `threads` intra-op threads (None = onnxruntime's default), no inter-op pool.
    `extra` tunes it the way onnxruntime names things: a dotted key is a session config entry
    (`session.intra_op.allow_spinning: "0"`), any other a SessionOptions attribute (`enable_cpu_mem_arena: false`)."""
    options = ort.SessionOptions()
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: fused graphs trigger harmless shape-inference warnings
    for key, value in (extra or {}).items():
        if "." in key:
            options.add_session_config_entry(key, str(value))
        elif hasattr(options, key) and not key.startswith("_"):
            setattr(options, key, value)
        else:
            raise FastformersError(f"session option {key!r}: not an onnxruntime SessionOptions attribute nor a "
                                   "dotted session config entry (e.g. session.intra_op.allow_spinning)")
    return options


def disabled_optimizers(path: Path, providers: list[str]) -> list[str]:
    """The session fusions a graph says it must not get (the export stage records them in its metadata), read
    from an unoptimized session: e.g. a graph exported without SkipLayerNormalization keeps Add + LayerNorm."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    meta = ort.InferenceSession(str(path), options, providers=providers).get_modelmeta().custom_metadata_map
    return [name for name in meta.get(DISABLED_OPTIMIZERS, "").split(",") if name]


class OnnxClassifier:
    """An exported sequence classifier behind an InferenceSession. Inputs the graph does not take are
    ignored; a missing `token_type_ids` is fed as zeros (what the PyTorch model assumes)."""

    def __init__(self, path: str | Path, threads: int | None = None, providers: list[str] | None = None,
                 session: dict | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FastformersError(f"missing ONNX graph {self.path}")
        providers = providers or [CPU]
        self.session = ort.InferenceSession(str(self.path), session_options(threads, session), providers=providers,
                                            disabled_optimizers=disabled_optimizers(self.path, providers))
        self.input_names = [i.name for i in self.session.get_inputs()]

    def eval(self) -> OnnxClassifier:
        return self  # the transformers convention `predict` relies on; a graph has no training mode

    def __call__(self, **inputs) -> SimpleNamespace:
        """Tensors in, `.logits` tensor out: the transformers way."""
        import torch

        return SimpleNamespace(logits=torch.from_numpy(self.run({k: v.numpy() for k, v in inputs.items()})))

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Integer arrays in, float32 logits out."""
        logits = self.session.run(["logits"], self.feeds(inputs))[0]
        return logits.astype(np.float32, copy=False)

    def feeds(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {}
        for name in self.input_names:
            if name in inputs:
                feeds[name] = np.asarray(inputs[name], dtype=np.int64)
            elif name == "token_type_ids":
                feeds[name] = np.zeros(np.shape(inputs["input_ids"]), dtype=np.int64)
            else:
                raise FastformersError(f"{self.path}: the graph needs input {name!r}, which the batch lacks")
        return feeds


def export_index(folder: Path) -> dict:
    path = Path(folder) / INDEX
    if not path.is_file():
        raise FastformersError(f"{folder} holds no {INDEX}: not an export stage output")
    return json.loads(path.read_text())


def graph_path(folder: Path, variant: str | None = None) -> Path:
    """The graph file of `variant` (fp32, int8, fp16); None = the precision the export stage was asked for."""
    index = export_index(folder)
    variant = variant or index["precision"]
    if variant not in index["graphs"]:
        raise FastformersError(f"{folder}: no {variant} graph was exported (have {sorted(index['graphs'])}); "
                               f"run the export stage with precision={variant}")
    return Path(folder) / index["graphs"][variant]


def load_exported(folder: Path, variant: str | None = None, threads: int | None = None):
    """(OnnxClassifier, tokenizer) of an export stage output, on the provider its precision needs."""
    from transformers import AutoTokenizer

    variant = variant or export_index(folder)["precision"]
    model = OnnxClassifier(graph_path(folder, variant), threads, providers_for(variant))
    return model, AutoTokenizer.from_pretrained(str(Path(folder) / GRAPHS))
