"""int8 for onnxruntime: dynamic quantization (weights per channel, activations per call), static
MatMul scales calibrated ahead of time, the MatMuls with outlying inputs kept float or smoothed; and fp16 for
CUDA. Calibration feeds come from the train split, never the one the metric is reported on."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.transformers.onnx_model import OnnxModel

from fastformers.engines.onnx import sibling, write_settings
from fastformers.errors import FastformersError

log = logging.getLogger(__name__)

WEIGHT_TYPES = {"QInt8": QuantType.QInt8, "QUInt8": QuantType.QUInt8}
QUANTIZED_OPS = ["MatMul", "Attention"]  # weights of the dense layers; Q·Kᵀ has no constant side, stays float
CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class Int8Options:
    """One setting of onnxruntime's dynamic quantizer. QInt8 weights run u8s8 kernels, QUInt8 u8u8 ones;
    `reduce_range` keeps weights to 7 bits so u8s8 sums cannot saturate on CPUs without VNNI."""

    weight_type: str = "QInt8"  # QInt8 | QUInt8
    per_channel: bool = True  # one scale per output column: keeps fp32's accuracy (docs/speed.md)
    reduce_range: bool = False

    @classmethod
    def of(cls, recipe: Mapping[str, Any]) -> Int8Options:
        """The quantizer's fields of an int8 variant's recipe (conf/engines/onnxruntime.yaml); unset: stock."""
        stock = cls.stock()
        return cls(
            weight_type=str(recipe.get("weight_type", stock.weight_type)),
            per_channel=bool(recipe.get("per_channel", stock.per_channel)),
            reduce_range=bool(recipe.get("reduce_range", stock.reduce_range)),
        )

    @classmethod
    def stock(cls) -> Int8Options:
        """The reference preset: per-channel QInt8 over MatMul/Attention, full range (what users get today)."""
        return cls()

    def __post_init__(self) -> None:
        if self.weight_type not in WEIGHT_TYPES:
            raise FastformersError(f"weight_type={self.weight_type!r} must be one of {list(WEIGHT_TYPES)}")


def quantize_int8(
    path: Path,
    options: Int8Options | None = None,
    float_nodes: Sequence[str] = (),
    suffix: str = "quantized",
) -> Path:
    """Dynamic quantization: int8 weights for MatMul/Attention, activations quantized on the fly;
    `float_nodes` stay fp32. `options`: None = the stock preset."""
    options = options or Int8Options.stock()
    target = sibling(path, suffix)
    extra = {
        "MatMulConstBOnly": True,  # only MatMuls with a weight side: Q·Kᵀ and attention·V stay float
        "DefaultTensorType": onnx.TensorProto.FLOAT,
    }  # fused ops lack type info the quantizer needs
    quantize_dynamic(
        str(path),
        str(target),
        op_types_to_quantize=QUANTIZED_OPS,
        per_channel=options.per_channel,
        reduce_range=options.reduce_range,
        weight_type=WEIGHT_TYPES[options.weight_type],
        nodes_to_exclude=list(float_nodes),
        extra_options=dict(extra),
    )  # quantize_dynamic mutates the dict it gets
    write_settings(
        target,
        {
            "quantizer": "onnxruntime.quantization.quantize_dynamic",
            "op_types": QUANTIZED_OPS,
            **asdict(options),
            "nodes_kept_float": list(float_nodes),
            "extra_options": {"MatMulConstBOnly": True, "DefaultTensorType": "FLOAT"},
            ort.__name__: ort.__version__,
        },
    )
    return target


class _Calibration(CalibrationDataReader):
    """The calibration sample as the graph's feeds, one batch per call."""

    def __init__(self, path: Path, feeds: list[dict[str, np.ndarray]]):
        names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
        self.feeds = iter([{k: batch[k] for k in names if k in batch} for batch in feeds])

    def get_next(self) -> dict | None:
        return next(self.feeds, None)


def quantize_int8_static(path: Path, feeds: list[dict[str, np.ndarray]], float_nodes: Sequence[str] = ()) -> Path:
    """Static int8: each MatMul's activation scale fixed from the calibration sample (MinMax), so no min/max
    pass runs per call; the fused Attention ops, which the static quantizer does not handle, are then
    quantized dynamically as in `quantize_int8`."""
    staged = sibling(path, "static_matmuls")
    options = {"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT}
    quantize_static(
        str(path),
        str(staged),
        _Calibration(path, feeds),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=list(float_nodes),
        extra_options=dict(options),
    )
    target = sibling(path, "quantized_static")
    quantize_dynamic(
        str(staged),
        str(target),
        op_types_to_quantize=["Attention"],
        per_channel=True,
        weight_type=QuantType.QInt8,
        extra_options=dict(options),
    )
    staged.unlink()
    write_settings(
        target,
        {
            "quantizer": "onnxruntime.quantization.quantize_static (QDQ, MinMax) for MatMul, "
            "quantize_dynamic for Attention",
            "per_channel": True,
            "activations": "QUInt8",
            "weights": "QInt8",
            "nodes_kept_float": list(float_nodes),
            "calibration_batches": "precision.calibration_split",
            ort.__name__: ort.__version__,
        },
    )
    return target


@dataclass
class InputStats:
    """What the calibration sample puts into one weight MatMul."""

    input: str  # the activation tensor's name
    outlier_ratio: float  # max|x| / std over real tokens, mean over batches
    channel_max: np.ndarray  # max|x| per input channel


def matmul_input_stats(path: Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, InputStats]:
    """Every weight MatMul's input on the calibration sample (real tokens only), by node name."""
    graph = onnx.load(str(path))
    weights = {init.name for init in graph.graph.initializer}
    nodes = {
        node.input[0]: node.name
        for node in graph.graph.node
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in weights
    }
    outputs = {o.name for o in graph.graph.output}
    graph.graph.output.extend(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in nodes if name not in outputs
    )
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    ratios: dict[str, list[float]] = {name: [] for name in nodes}
    maxima: dict[str, np.ndarray] = {name: np.zeros(0) for name in nodes}
    for batch in feeds:
        values = session.run(list(nodes), {k: batch[k] for k in names if k in batch})
        real = batch["attention_mask"].astype(bool)
        for name, value in zip(nodes, values):
            tokens = np.abs(value[real])
            ratios[name].append(float(tokens.max() / max(tokens.std(), 1e-12)))
            peak = tokens.max(axis=0)
            maxima[name] = np.maximum(maxima[name], peak) if maxima[name].size else peak
    return {nodes[name]: InputStats(name, float(np.mean(ratios[name])), maxima[name]) for name in nodes}


def outlier_matmuls(stats: dict[str, InputStats], count: int) -> list[str]:
    """The `count` weight MatMuls whose inputs have the most extreme outliers: one per-tensor int8 scale
    stretched over such an outlier leaves the other values a few steps (in BERT-like models, the FFN output
    projections of some layers)."""
    ranked = sorted(stats, key=lambda node: stats[node].outlier_ratio, reverse=True)[:count]
    log.debug("int8: outlier MatMuls %s (max|x|/std %s)", ranked, [round(stats[n].outlier_ratio, 1) for n in ranked])
    return ranked


def smooth_matmuls(path: Path, stats: dict[str, InputStats], nodes: list[str], alpha: float) -> Path:
    """SmoothQuant for the outlier MatMuls: input channel j divided by s_j = max|x_j|^alpha / max|W_j|^(1-alpha)
    (a Mul before the MatMul) and weight row j multiplied by it, so the product is unchanged and the per-tensor
    activation scale no longer stretches over one channel's outliers: the MatMul can then be quantized."""
    graph = onnx.load(str(path))
    initializers = {init.name: init for init in graph.graph.initializer}
    ordered = []
    for node in graph.graph.node:
        if node.name in nodes:
            weight = initializers[node.input[1]]
            values = onnx.numpy_helper.to_array(weight)
            scale = stats[node.name].channel_max ** alpha / np.maximum(np.abs(values).max(axis=1), 1e-8) ** (1 - alpha)
            scale = np.clip(scale, 1e-5, None).astype(np.float32)
            weight.CopyFrom(onnx.numpy_helper.from_array(values * scale[:, None], weight.name))
            inverse = onnx.numpy_helper.from_array(1 / scale, f"{node.name}/smooth_scale")
            graph.graph.initializer.append(inverse)
            smoothed = f"{node.input[0]}/smoothed_for/{node.name}"
            ordered.append(
                onnx.helper.make_node("Mul", [node.input[0], inverse.name], [smoothed], name=f"{node.name}/smooth")
            )
            node.input[0] = smoothed
        ordered.append(node)
    del graph.graph.node[:]
    graph.graph.node.extend(ordered)
    target = sibling(path, "smoothed")
    onnx.save(graph, str(target))
    write_settings(target, {"smoothed_matmuls": nodes, "alpha": alpha, "source": path.name})
    return target


def convert_fp16(path: Path) -> Path:
    """Half-precision weights and activations for the CUDA provider; int64 inputs and float32 logits kept."""
    model = OnnxModel(onnx.load(str(path)))
    model.convert_float_to_float16(keep_io_types=True)
    target = sibling(path, "fp16")
    model.save_model_to_file(str(target))
    write_settings(
        target,
        {
            "converter": "onnxruntime.transformers OnnxModel.convert_float_to_float16",
            "keep_io_types": True,
            "execution_provider": CUDA,
            ort.__name__: ort.__version__,
        },
    )
    return target
