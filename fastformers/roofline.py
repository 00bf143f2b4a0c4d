"""How close a run is to what this machine allows: FLOPs per example from the architecture and the real token
lengths, and the sustained fp32 and int8 GEMM throughput measured here with onnxruntime's own kernels.

The bound of a variant is the time its FLOPs take at those rates: the projections (Q/K/V, attention output,
FFN) at the int8 rate when the graph is quantized, Q·Kᵀ and attention·V always at the fp32 rate (they stay
float), so `% of bound` = bound time / measured time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper


@dataclass(frozen=True)
class Shape:
    """What sets an encoder's FLOPs: every layer alike (pruning keeps the same count in each)."""

    layers: int
    hidden: int
    heads: int  # heads per layer (kept heads, for a pruned model)
    head_size: int
    ffn: int  # FFN neurons per layer (kept ones)

    @classmethod
    def of(cls, config) -> Shape:
        """From a transformers config of a supported family (its FFN width under the family's key); a pruned
        model records its kept heads and neurons per layer (the mean is used: FLOPs are linear in them), or, saved
        before per-layer sizes, one head count in `attention_heads_kept`."""
        from fastformers.modeling_fastformers import LAYOUTS, layer_sizes

        head_size = config.hidden_size // config.num_attention_heads
        layout = LAYOUTS.get(config.model_type)
        ffn = getattr(config, layout.intermediate_size if layout else "intermediate_size")
        kept_heads, kept_ffn = layer_sizes(config, config.num_hidden_layers)
        heads = round(sum(kept_heads) / len(kept_heads)) if kept_heads else config.num_attention_heads
        ffn = round(sum(kept_ffn) / len(kept_ffn)) if kept_ffn else ffn
        return cls(config.num_hidden_layers, config.hidden_size, heads, head_size, ffn)


def flops(shape: Shape, tokens: int) -> tuple[float, float]:
    """(projection FLOPs, attention-score FLOPs) of one sequence of `tokens`, multiply-adds counted as 2."""
    width = shape.heads * shape.head_size
    projections = 2 * tokens * shape.hidden * (3 * width + width + 2 * shape.ffn)
    attention = 2 * 2 * tokens * tokens * width  # Q·Kᵀ and probabilities·V
    return float(shape.layers * projections), float(shape.layers * attention)


@dataclass(frozen=True)
class Peaks:
    fp32_gflops: float
    int8_gops: float


def _gemm_graph(m: int, k: int, n: int, integer: bool) -> bytes:
    """A one-node graph: fp32 MatMul, or the uint8 x int8 MatMulInteger that dynamic quantization runs."""
    rng = np.random.default_rng(0)
    if integer:
        values, kind, out_kind, op = (
            rng.integers(-127, 127, (k, n)).astype(np.int8),
            TensorProto.INT8,
            TensorProto.INT32,
            "MatMulInteger",
        )
        a = helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])
    else:
        values, kind, out_kind, op = (
            rng.standard_normal((k, n)).astype(np.float32),
            TensorProto.FLOAT,
            TensorProto.FLOAT,
            "MatMul",
        )
        a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])
    weight = helper.make_tensor("w", kind, [k, n], values.tobytes(), raw=True)
    out = helper.make_tensor_value_info("y", out_kind, [m, n])
    node = helper.make_node(op, ["a", "w"], ["y"])
    graph = helper.make_graph([node], "gemm", [a], [out], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _sustained(model: bytes, feed: np.ndarray, ops: float, threads: int | None, seconds: float) -> float:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(None, {"a": feed})
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        session.run(None, {"a": feed})
        calls += 1
    return ops * calls / elapsed


def measure_peaks(threads: int | None = None, seconds: float = 1.0, m: int = 256, k: int = 384, n: int = 1536) -> Peaks:
    """Sustained GEMM rates on a transformer-sized product (tokens x hidden x FFN), `seconds` each."""
    ops = 2.0 * m * k * n
    rng = np.random.default_rng(0)
    floats, codes = rng.standard_normal((m, k)).astype(np.float32), rng.integers(0, 255, (m, k)).astype(np.uint8)
    fp32 = _sustained(_gemm_graph(m, k, n, False), floats, ops, threads, seconds)
    int8 = _sustained(_gemm_graph(m, k, n, True), codes, ops, threads, seconds)
    return Peaks(fp32 / 1e9, int8 / 1e9)


def bound_seconds(shape: Shape, lengths: list[int], peaks: Peaks, quantized: bool) -> float:
    """The least time the examples' FLOPs take at this machine's rates."""
    total = 0.0
    for tokens in lengths:
        projections, attention = flops(shape, tokens)
        total += projections / ((peaks.int8_gops if quantized else peaks.fp32_gflops) * 1e9)
        total += attention / (peaks.fp32_gflops * 1e9)
    return total
