"""PyTorch as transformers ships it: the saved model folder, SDPA attention, no export. The baseline every
speed-up is measured from, and the torch side of every parity check."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fastformers.engines import Engine, ExportContext, Infer


class TorchEngine(Engine):
    name = "torch"
    precisions = ("fp32",)

    def prepare(self, ctx: ExportContext) -> dict[str, Path]:
        return {}  # runs the model folder a training stage saved

    def load(
        self, path: Path, precision: str, threads: int | None, options: Mapping[str, Any], bucket: int | None = None
    ) -> Infer:
        import torch

        from fastformers.models import load_finetuned

        if threads:
            torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)
        model, _ = load_finetuned(path, attn_implementation=None)  # transformers' default: out of the box
        model.eval()

        def infer(inputs: dict[str, np.ndarray]) -> np.ndarray:
            with torch.inference_mode():
                return model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.float().numpy()

        return infer
