"""How close a run is to what this machine allows: multiply-adds per example from the architecture and the token
counts, against two ceilings. The *measured-GEMM bound*: the sustained fp32 and int8 GEMM throughput measured here
with onnxruntime's own kernels (`% of bound` = the least time the useful multiply-adds take at those rates /
measured time; an engine with faster kernels than onnxruntime's can exceed 100%). The *nominal peak*: vector width
x FMA ports x a nominal clock of the CPU's family, read from /proc/cpuinfo (`%peak`; a VM hides the real clock, so
it is labelled nominal, and an unknown CPU gets none).

The projections (Q/K/V, attention output, FFN) run at the int8 rate when the graph is quantized, Q·Kᵀ and
attention·V always at the fp32 rate (they stay float).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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
        from fastformers.models.modeling_fastformers import LAYOUTS, layer_sizes

        head_size = config.hidden_size // config.num_attention_heads
        layout = LAYOUTS.get(config.model_type)
        ffn = getattr(config, layout.intermediate_size if layout else "intermediate_size")
        kept_heads, kept_ffn = layer_sizes(config, config.num_hidden_layers)
        heads = round(sum(kept_heads) / len(kept_heads)) if kept_heads else config.num_attention_heads
        ffn = round(sum(kept_ffn) / len(kept_ffn)) if kept_ffn else ffn
        return cls(config.num_hidden_layers, config.hidden_size, heads, head_size, ffn)


def macs(shape: Shape, tokens: int) -> tuple[float, float]:
    """(projection multiply-adds, attention-score multiply-adds) of one sequence of `tokens` through the encoder
    (embeddings, softmax, norms and the classifier are left out: they are not GEMMs)."""
    width = shape.heads * shape.head_size
    projections = tokens * shape.hidden * (3 * width + width + 2 * shape.ffn)
    attention = 2 * tokens * tokens * width  # Q·Kᵀ and probabilities·V
    return float(shape.layers * projections), float(shape.layers * attention)


def gmacs_per_example(shape: Shape, token_counts: Sequence[int], examples: int | None = None) -> float:
    """Multiply-adds per example, in billions: every sequence run (`token_counts`, padding included where it ran)
    over the examples they answer (`examples`; default one sequence each)."""
    total = sum(sum(macs(shape, tokens)) for tokens in token_counts)
    return total / max(len(token_counts) if examples is None else examples, 1) / 1e9


def flops(shape: Shape, tokens: int) -> tuple[float, float]:
    """`macs` with a multiply-add counted as 2 FLOPs, the unit GEMM rates are quoted in."""
    projections, attention = macs(shape, tokens)
    return 2 * projections, 2 * attention


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


CPUINFO = Path("/proc/cpuinfo")
FEATURES = {  # the feature a table header names -> the /proc/cpuinfo flags that give it (any of them)
    "avx2": ("avx2",),
    "avx512": ("avx512f",),
    "vnni": ("avx512_vnni", "avx_vnni"),
    "amx": ("amx_tile",),
    "bf16": ("avx512_bf16", "amx_bf16"),
}


@dataclass(frozen=True)
class Cpu:
    """What /proc/cpuinfo says of the first logical CPU: enough to name the machine and pick its nominal peak."""

    model: str
    flags: frozenset[str]

    @property
    def features(self) -> dict[str, bool]:
        return {name: any(flag in self.flags for flag in flags) for name, flags in FEATURES.items()}

    def feature_label(self) -> str:
        """`AVX2 AVX512 VNNI -AMX BF16`: each relevant feature, a minus sign for one this CPU lacks."""
        return " ".join(("" if has else "-") + name.upper() for name, has in self.features.items())


def parse_cpuinfo(text: str) -> Cpu:
    """The model name and flags of the first processor block (every core of a VM reports the same)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return Cpu(
        fields.get("model name", "unknown CPU"),
        frozenset(fields.get("flags", "").split()),
    )


def this_cpu(path: Path = CPUINFO) -> Cpu:
    try:
        return parse_cpuinfo(path.read_text())
    except OSError:
        return Cpu("unknown CPU", frozenset())


@dataclass(frozen=True)
class Family:
    """A CPU family's nominal per-core rates: multiply-adds per cycle per core (vector lanes x FMA ports, or the
    matrix unit's rate) at a nominal clock: the ceiling its vendor quotes, not a measurement."""

    name: str
    fp32_macs_per_cycle: int
    bf16_macs_per_cycle: int  # = fp32 where the CPU has no bf16 arithmetic (bf16 rows are skipped there)
    int8_macs_per_cycle: int  # VNNI: 4 int8 products per 32-bit lane; without it, pmaddubsw pairs: 2 per lane
    nominal_ghz: float

    def peak_gmacs(self, precision: str, cores: int) -> float:
        """Nominal multiply-adds per second (G) of `cores` cores at `precision`'s projection rate."""
        per_cycle = {"int8": self.int8_macs_per_cycle, "bf16": self.bf16_macs_per_cycle}.get(
            precision.partition("_")[0], self.fp32_macs_per_cycle
        )
        return per_cycle * self.nominal_ghz * cores


# Per core and cycle: fp32 FMA lanes x ports (AVX2: 8 x 2; Zen 4 runs AVX-512 on two 256-bit pipes; Zen 5 and
# Xeons with two 512-bit FMA ports: 16 x 2); bf16 dot products (vdpbf16ps) do 2 per fp32 lane, AMX's tiles 512
# bf16 and 1024 int8 multiply-adds. Clocks: the family's usual base clock, since a VM hides the real one.
FAMILIES = {
    "epyc_avx2": Family("AMD EPYC Zen 2/3 (AVX2), nominal 2.45 GHz", 16, 16, 32, 2.45),
    "epyc_zen4": Family("AMD EPYC Zen 4 (AVX-512 on 256-bit pipes, VNNI, BF16), nominal 2.4 GHz", 16, 32, 64, 2.4),
    "epyc_zen5": Family("AMD EPYC Zen 5 (512-bit AVX-512, VNNI, BF16), nominal 2.7 GHz", 32, 64, 128, 2.7),
    "xeon_avx2": Family("Intel Xeon (AVX2), nominal 2.3 GHz", 16, 16, 32, 2.3),
    "xeon_avx512": Family("Intel Xeon (AVX-512, no VNNI), nominal 2.5 GHz", 32, 32, 64, 2.5),
    "xeon_vnni": Family("Intel Xeon (AVX-512 VNNI), nominal 2.5 GHz", 32, 32, 128, 2.5),
    "xeon_amx": Family("Intel Xeon with AMX (bf16, int8 tiles), nominal 2.0 GHz", 32, 512, 1024, 2.0),
}


def family_of(cpu: Cpu) -> Family | None:
    """The nominal-peak family from the model name and flags; None for a CPU this table does not know (then
    `%peak` is n/a rather than a guess)."""
    has = cpu.features
    if "EPYC" in cpu.model:
        if has["avx512"]:
            return FAMILIES["epyc_zen5" if "avx512_vp2intersect" in cpu.flags else "epyc_zen4"]
        return FAMILIES["epyc_avx2"] if has["avx2"] else None
    if "Xeon" in cpu.model:
        if has["amx"]:
            return FAMILIES["xeon_amx"]
        if has["avx512"]:
            return FAMILIES["xeon_vnni" if has["vnni"] else "xeon_avx512"]
        return FAMILIES["xeon_avx2"] if has["avx2"] else None
    return None


def peak_seconds(shape: Shape, lengths: list[int], family: Family, precision: str, cores: int) -> float:
    """The least time the multiply-adds of sequences of `lengths` tokens take at the nominal peak of `cores`
    cores: projections at the precision's rate, the attention scores at the fp32 rate (they stay float)."""
    projection_rate = family.peak_gmacs(precision, cores) * 1e9
    float_rate = family.peak_gmacs("fp32", cores) * 1e9
    total = 0.0
    for tokens in lengths:
        projections, attention = macs(shape, tokens)
        total += projections / projection_rate + attention / float_rate
    return total
