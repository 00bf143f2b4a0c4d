"""onnxruntime's transformer optimizer: Attention, EmbedLayerNormalization, Gelu and LayerNorm fusions."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import onnxruntime as ort
from onnxruntime.transformers.fusion_options import FusionOptions
from onnxruntime.transformers.optimizer import optimize_model

from fastformers.engines.onnx import sibling, write_settings
from fastformers.errors import FastformersError

log = logging.getLogger(__name__)

DISABLED_OPTIMIZERS = "fastformers.disabled_optimizers"  # graph metadata: session fusions the graph must not get


def optimize(
    path: Path,
    num_heads: int,
    hidden_size: int,
    fusion_options: dict | None = None,
    suffix: str = "optimized",
    model_type: str = "bert",
) -> tuple[Path, dict[str, int]]:
    """onnxruntime's transformer optimizer (every supported family is `model_type` bert there: the
    family table's onnx_model_type, as optimum maps them) with `fusion_options`
    (FusionOptions attributes) changed from its defaults; returns the fused graph and how many of each fused
    operator it holds. A graph left without SkipLayerNormalization records that onnxruntime's session must not
    fuse it back (DISABLED_OPTIMIZERS, read by the onnxruntime engine)."""
    options = FusionOptions(model_type)
    for key, value in (fusion_options or {}).items():
        if not hasattr(options, key):
            raise FastformersError(
                f"export.fusion_options.{key}: not an onnxruntime FusionOptions attribute "
                f"(have {sorted(vars(options))})"
            )
        setattr(options, key, value)
    optimized = optimize_model(
        str(path), model_type=model_type, num_heads=num_heads, hidden_size=hidden_size, optimization_options=options
    )
    fusions = {op: int(n) for op, n in optimized.get_fused_operator_statistics().items()}
    disabled = [] if options.enable_skip_layer_norm else ["SkipLayerNormFusion"]
    if disabled:
        onnx.helper.set_model_props(optimized.model, {DISABLED_OPTIMIZERS: ",".join(disabled)})
    target = sibling(path, suffix)
    optimized.save_model_to_file(str(target))
    write_settings(
        target,
        {
            "optimizer": "onnxruntime.transformers.optimizer.optimize_model",
            "model_type": model_type,
            "num_heads": num_heads,
            "hidden_size": hidden_size,
            ort.__name__: ort.__version__,
            "fusion_options": fusion_options or {},
            "session_disabled_optimizers": disabled,
            "fused_operators": fusions,
        },
    )
    log.debug("fused operators: %s", {op: n for op, n in fusions.items() if n})
    return target, fusions
