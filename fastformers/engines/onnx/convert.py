"""PyTorch -> ONNX: the TorchScript exporter with dynamic batch and sequence axes."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import torch

from fastformers.engines.onnx import write_settings

EXPORT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # those the model and its tokenizer both take
SAMPLE = (["a short premise", "a somewhat longer premise with more words in it"], ["a hypothesis", "another"])


def export_input_names(model, tokenizer) -> list[str]:
    """The inputs the tokenizer produces and the model's forward takes (RoBERTa tokenizers give no
    token_type_ids, so those graphs do not ask for them)."""
    takes = inspect.signature(model.forward).parameters
    return [name for name in EXPORT_INPUTS if name in tokenizer.model_input_names and name in takes]


class _LogitsOnly(torch.nn.Module):
    """Positional inputs in, logits out: the shape torch.onnx.export traces."""

    def __init__(self, model, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, tensors))).logits


def export_onnx(model, tokenizer, path: Path, opset: int) -> Path:
    """TorchScript export (dynamo=False: its graphs are the ones onnxruntime's fusions recognise) of a
    model loaded with eager attention (an SDPA export gets no Attention fusion)."""
    names = export_input_names(model, tokenizer)
    sample = tokenizer(*SAMPLE, padding=True, return_tensors="pt")  # padded rows trace the mask path too
    axes = {name: {0: "batch", 1: "sequence"} for name in names} | {"logits": {0: "batch"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _LogitsOnly(model, names).eval()  # export restores the wrapper's mode: eval keeps dropout off
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python branches on shapes that never change
        torch.onnx.export(
            wrapper,
            tuple(sample[n] for n in names),
            str(path),
            input_names=names,
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
    model.eval()
    write_settings(
        path,
        {
            "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
            torch.__name__: torch.__version__,
            "opset": opset,
            "inputs": names,
            "outputs": ["logits"],
            "dynamic_axes": axes,
            "attn_implementation": model.config._attn_implementation,
            "model_type": model.config.model_type,
        },
    )
    return path
