"""PyTorch as transformers ships it: the saved model folder, SDPA attention, no export. The baseline every
speed-up is measured from, the torch side of every parity check, and the GPU rows: fp16 and bf16 on CUDA
(`device: cuda` puts fp32 there too)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fastformers.engines import Engine, ExportContext, Infer
from fastformers.errors import FastformersError

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DEVICES = ("cpu", "cuda")


class TorchEngine(Engine):
    name = "torch"  # precisions: conf/engines/torch.yaml (fp16 and bf16 run on a CUDA GPU)
    runs_model_folder = True
    libraries = ("torch",)

    def runs_on_gpu(self, precision: str, options: Mapping[str, Any] | None = None) -> bool:
        return precision != "fp32" or (options or {}).get("device") == "cuda"

    def unavailable(self, precision: str, options: Mapping[str, Any] | None = None) -> str | None:
        import torch

        if self.runs_on_gpu(precision, options) and not torch.cuda.is_available():
            return f"torch {precision} runs on a CUDA GPU here (SDPA attention); torch {torch.__version__} sees none"
        return None

    def check_options(self, options: Mapping[str, Any], field: str) -> None:
        unknown = sorted(set(options) - {"device"})
        if unknown or options.get("device", "cpu") not in DEVICES:
            raise FastformersError(f"{field}: engine torch takes only device: cpu | cuda (got {dict(options)})")

    def prepare(self, ctx: ExportContext) -> dict[str, Path]:
        return {}  # runs the model folder a training stage saved

    def load(
        self, path: Path, precision: str, threads: int | None, options: Mapping[str, Any], bucket: int | None = None
    ) -> Infer:
        import torch

        from fastformers.models.loading import load_finetuned

        if threads:
            torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)
        device = options.get("device") or ("cpu" if precision == "fp32" else "cuda")
        model, _ = load_finetuned(path, attn_implementation=None)  # transformers' default: out of the box
        model.to(device=device, dtype=getattr(torch, DTYPES[precision])).eval()

        def infer(inputs: dict[str, np.ndarray]) -> np.ndarray:
            with torch.inference_mode():
                feeds = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
                return model(**feeds).logits.float().cpu().numpy()  # .cpu() waits for the GPU: timings are whole

        return infer
