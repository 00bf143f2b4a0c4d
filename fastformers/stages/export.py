"""Stage `export`: the latest model as an ONNX graph with dynamic batch and sequence axes, fused by
onnxruntime's transformer optimizer, then converted to `precision` (int8 dynamic quantization, or fp16 for
CUDA). Every graph is compared with PyTorch on real eval inputs, and one that disagrees fails the stage.

Each step writes `<stem>_<suffix>.onnx` with a json of its settings beside it (optimum's layout):
model.onnx -> model_optimized.onnx -> model_optimized_quantized.onnx | model_optimized_fp16.onnx.
"""
from __future__ import annotations

import inspect
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from omegaconf import DictConfig
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.transformers.fusion_options import FusionOptions
from onnxruntime.transformers.onnx_model import OnnxModel
from onnxruntime.transformers.optimizer import optimize_model

from fastformers.data import load_examples, make_loader, parse_split
from fastformers.errors import FastformersError
from fastformers.models import encoder_layers, example_scores, load_finetuned, model_inputs
from fastformers.runtime import CUDA, DISABLED_OPTIMIZERS, GRAPHS, INDEX, OnnxClassifier, providers_for, require_provider
from fastformers.tasks import get_task

log = logging.getLogger(__name__)

VERSION = 3  # bump when a code change alters what this stage writes
PROVIDES = "onnx"
USES = ("model",)
CONFIG_KEYS = ("task", "export", "precision", "data.split_seed")

PRECISIONS = ("fp32", "int8", "fp16")
STOCK_INT8 = "int8_stock"  # quantize_dynamic per-channel QInt8, nothing kept float: what users get today
OUTLIER_TREATMENTS = ("smooth", "float")
STATIC_INT8 = "int8_static"  # MatMul activations quantized with scales calibrated ahead of time
WEIGHT_TYPES = {"QInt8": QuantType.QInt8, "QUInt8": QuantType.QUInt8}
QUANTIZED_OPS = ["MatMul", "Attention"]  # weights of the dense layers; Q·Kᵀ has no constant side, stays float
EXPORT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
SAMPLE = (["a short premise", "a somewhat longer premise with more words in it"], ["a hypothesis", "another"])


def validate(cfg: DictConfig) -> None:
    precision, opts = cfg.precision, cfg.export
    if precision.name not in PRECISIONS:
        raise FastformersError(f"precision.name={precision.name!r} must be one of {list(PRECISIONS)}")
    if not 0 < precision.min_agreement <= 1:
        raise FastformersError(f"precision.min_agreement={precision.min_agreement!r} must be in (0, 1]")
    if precision.name == "int8":
        if precision.weight_type not in WEIGHT_TYPES:
            raise FastformersError(f"precision.weight_type={precision.weight_type!r} must be one of "
                                   f"{list(WEIGHT_TYPES)}")
        if not isinstance(precision.outlier_matmuls, int) or precision.outlier_matmuls < 0:
            raise FastformersError(f"precision.outlier_matmuls={precision.outlier_matmuls!r} must be a count >= 0")
        if precision.outliers not in OUTLIER_TREATMENTS:
            raise FastformersError(f"precision.outliers={precision.outliers!r} must be one of {list(OUTLIER_TREATMENTS)}")
        if precision.outliers == "smooth" and not 0 < precision.smooth_alpha < 1:
            raise FastformersError(f"precision.smooth_alpha={precision.smooth_alpha!r} must be in (0, 1)")
        check_disjoint(precision.calibration_split, cfg.task.eval_split, "precision.calibration_split")
    if precision.name == "fp16":
        require_provider(CUDA, "precision=fp16")
    if not 13 <= opts.opset <= 17:
        raise FastformersError(f"export.opset={opts.opset!r}: onnxruntime's fusions are written for opsets 13-17")
    if opts.parity_examples is not None and opts.parity_examples <= 0:
        raise FastformersError(f"export.parity_examples={opts.parity_examples!r} must be positive (or null = all)")
    if not opts.fp32_max_abs_diff or opts.fp32_max_abs_diff <= 0:
        raise FastformersError(f"export.fp32_max_abs_diff={opts.fp32_max_abs_diff!r} must be positive")
    parse_split(opts.parity_split)


def run(cfg: DictConfig, inputs: dict[str, Path], out: Path) -> dict[str, float]:
    model, tokenizer = load_finetuned(inputs["model"] / "model")
    folder = out / GRAPHS
    started = time.perf_counter()
    exported = export_onnx(model, tokenizer, folder / "model.onnx", cfg.export.opset)
    fp32, fusions = optimize(exported, *attention_shape(model), dict(cfg.export.fusion_options or {}))
    graphs = {"exported": exported, "fp32": fp32}
    float_matmuls: list[str] = []
    smoothed: list[str] = []
    if cfg.precision.name == "int8":
        precision, source = cfg.precision, fp32
        calibration = calibration_loader(cfg, tokenizer) if precision.outlier_matmuls or precision.static else None
        if precision.outlier_matmuls:
            stats = matmul_input_stats(fp32, calibration)
            outliers = outlier_matmuls(stats, precision.outlier_matmuls)
            if precision.outliers == "smooth":
                source = graphs["smoothed"] = smooth_matmuls(fp32, stats, outliers, precision.smooth_alpha)
                smoothed = outliers
            else:
                float_matmuls = outliers
        graphs["int8"] = quantize_int8(source, precision.weight_type, precision.per_channel, precision.reduce_range,
                                       float_matmuls)
        # the stock pipeline's graph too (default fusions, quantize_dynamic as shipped), for a reference row
        stock, _ = optimize(exported, *attention_shape(model), {}, suffix="optimized_stock")
        graphs[STOCK_INT8] = quantize_int8(stock, "QInt8", True, False)
        stock.unlink()  # an intermediate: only its quantized graph is kept
        settings_path(stock).unlink()
        if precision.static:
            graphs[STATIC_INT8] = quantize_int8_static(source, calibration, float_matmuls)
    elif cfg.precision.name == "fp16":
        graphs["fp16"] = convert_fp16(fp32)
    seconds = time.perf_counter() - started
    tokenizer.save_pretrained(folder)
    parity = check_parity(cfg, model, tokenizer, graphs)
    (out / INDEX).write_text(json.dumps({
        "precision": cfg.precision.name,
        "graphs": {name: str(path.relative_to(out)) for name, path in graphs.items()},
        "fused_operators": fusions,
        "parity": parity,
        "settings": {name: json.loads(settings_path(path).read_text()) for name, path in graphs.items()},
    }, indent=2))
    metrics = {"export_seconds": seconds, "layers": model.config.num_hidden_layers,
               "float_matmuls": len(float_matmuls), "smoothed_matmuls": len(smoothed)}
    metrics |= {f"fused/{op}": count for op, count in fusions.items()}
    metrics |= {f"graph_mb/{name}": path.stat().st_size / 2**20 for name, path in graphs.items()}
    metrics |= {f"parity/{name}/{k}": v for name, values in parity.items() for k, v in values.items()}
    return metrics


def check_disjoint(calibration: str, evaluation: str, field: str) -> None:
    """Calibration must never read the split the metric is reported on."""
    (name, lo, hi), (eval_name, eval_lo, eval_hi) = parse_split(calibration), parse_split(evaluation)
    if name == eval_name and lo < eval_hi and eval_lo < hi:
        raise FastformersError(f"{field}={calibration!r} overlaps the evaluation split task.eval_split="
                               f"{evaluation!r}: calibrate on examples the metric never sees (e.g. train)")


def sibling(path: Path, suffix: str) -> Path:
    """`model.onnx` -> `model_<suffix>.onnx`, the naming optimum uses for derived graphs."""
    return path.with_name(f"{path.stem}_{suffix}{path.suffix}")


def settings_path(graph: Path) -> Path:
    return graph.with_suffix(".json")


def write_settings(graph: Path, settings: dict) -> None:
    """What made the graph, beside it, so a file found later explains itself."""
    settings_path(graph).write_text(json.dumps(settings, indent=2, default=str))


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
        torch.onnx.export(wrapper, tuple(sample[n] for n in names), str(path), input_names=names,
                          output_names=["logits"], dynamic_axes=axes, opset_version=opset, dynamo=False)
    model.eval()
    write_settings(path, {"exporter": "torch.onnx.export (TorchScript, dynamo=False)", "torch": torch.__version__,
                          "opset": opset, "inputs": names, "outputs": ["logits"], "dynamic_axes": axes,
                          "attn_implementation": model.config._attn_implementation,
                          "model_type": model.config.model_type})
    return path


def attention_shape(model) -> tuple[int, int]:
    """(num_heads, hidden_size) in the optimizer's sense: heads per layer and their total width, which pruning
    makes narrower than the model (its q/k/v reshape uses -1 heads, so the optimizer cannot read them off)."""
    attention = encoder_layers(model)[0].attention.self
    return attention.num_attention_heads, attention.all_head_size


def optimize(path: Path, num_heads: int, hidden_size: int, fusion_options: dict | None = None,
             suffix: str = "optimized") -> tuple[Path, dict[str, int]]:
    """onnxruntime's transformer optimizer (BERT and RoBERTa share model_type bert) with `fusion_options`
    (FusionOptions attributes) changed from its defaults; returns the fused graph and how many of each fused
    operator it holds. A graph left without SkipLayerNormalization records that onnxruntime's session must not
    fuse it back (runtime.DISABLED_OPTIMIZERS)."""
    options = FusionOptions("bert")
    for key, value in (fusion_options or {}).items():
        if not hasattr(options, key):
            raise FastformersError(f"export.fusion_options.{key}: not an onnxruntime FusionOptions attribute "
                                   f"(have {sorted(vars(options))})")
        setattr(options, key, value)
    optimized = optimize_model(str(path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                               optimization_options=options)
    fusions = {op: int(n) for op, n in optimized.get_fused_operator_statistics().items()}
    disabled = [] if options.enable_skip_layer_norm else ["SkipLayerNormFusion"]
    if disabled:
        onnx.helper.set_model_props(optimized.model, {DISABLED_OPTIMIZERS: ",".join(disabled)})
    target = sibling(path, suffix)
    optimized.save_model_to_file(str(target))
    write_settings(target, {"optimizer": "onnxruntime.transformers.optimizer.optimize_model", "model_type": "bert",
                            "num_heads": num_heads, "hidden_size": hidden_size, "onnxruntime": ort.__version__,
                            "fusion_options": fusion_options or {}, "session_disabled_optimizers": disabled,
                            "fused_operators": fusions})
    log.info("fused operators: %s", {op: n for op, n in fusions.items() if n})
    return target, fusions


def quantize_int8(path: Path, weight_type: str, per_channel: bool, reduce_range: bool,
                  float_nodes: list[str] = (), suffix: str = "quantized") -> Path:
    """Dynamic quantization: int8 weights for MatMul/Attention, activations quantized on the fly;
    `float_nodes` stay fp32."""
    target = sibling(path, suffix)
    options = {"MatMulConstBOnly": True,  # only MatMuls with a weight side: Q·Kᵀ and attention·V stay float
               "DefaultTensorType": onnx.TensorProto.FLOAT}  # fused ops lack type info the quantizer needs
    quantize_dynamic(str(path), str(target), op_types_to_quantize=QUANTIZED_OPS, per_channel=per_channel,
                     reduce_range=reduce_range, weight_type=WEIGHT_TYPES[weight_type],
                     nodes_to_exclude=list(float_nodes),
                     extra_options=dict(options))  # quantize_dynamic mutates the dict it gets
    write_settings(target, {"quantizer": "onnxruntime.quantization.quantize_dynamic", "op_types": QUANTIZED_OPS,
                            "weight_type": weight_type, "per_channel": per_channel, "reduce_range": reduce_range,
                            "nodes_kept_float": list(float_nodes),
                            "extra_options": {"MatMulConstBOnly": True, "DefaultTensorType": "FLOAT"},
                            "onnxruntime": ort.__version__})
    return target


class _Calibration(CalibrationDataReader):
    """The calibration sample as the graph's feeds, one batch per call."""

    def __init__(self, path: Path, loader):
        names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
        self.feeds = iter([{k: batch[k].numpy() for k in names if k in batch} for batch in loader])

    def get_next(self) -> dict | None:
        return next(self.feeds, None)


def quantize_int8_static(path: Path, loader, float_nodes: list[str] = ()) -> Path:
    """Static int8: each MatMul's activation scale fixed from the calibration sample (MinMax), so no min/max
    pass runs per call; the fused Attention ops, which the static quantizer does not handle, are then
    quantized dynamically as in `quantize_int8`."""
    staged = sibling(path, "static_matmuls")
    options = {"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT}
    quantize_static(str(path), str(staged), _Calibration(path, loader), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul"], per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=list(float_nodes), extra_options=dict(options))
    target = sibling(path, "quantized_static")
    quantize_dynamic(str(staged), str(target), op_types_to_quantize=["Attention"], per_channel=True,
                     weight_type=QuantType.QInt8, extra_options=dict(options))
    staged.unlink()
    write_settings(target, {"quantizer": "onnxruntime.quantization.quantize_static (QDQ, MinMax) for MatMul, "
                            "quantize_dynamic for Attention", "per_channel": True, "activations": "QUInt8",
                            "weights": "QInt8", "nodes_kept_float": list(float_nodes),
                            "calibration_batches": "precision.calibration_split", "onnxruntime": ort.__version__})
    return target


def calibration_loader(cfg: DictConfig, tokenizer):
    """The calibration sample: `precision.calibration_examples` of `precision.calibration_split` (train by default)."""
    task = get_task(cfg.task.name)
    examples = load_examples(task, cfg.data.root, cfg.precision.calibration_split, cfg.data.split_seed,
                             cfg.data.download)[: cfg.precision.calibration_examples]
    return make_loader(examples, tokenizer, task, cfg.task.max_seq_length, 8)


@dataclass
class InputStats:
    """What the calibration sample puts into one weight MatMul."""

    input: str               # the activation tensor's name
    outlier_ratio: float     # max|x| / std over real tokens, mean over batches
    channel_max: np.ndarray  # max|x| per input channel


def matmul_input_stats(path: Path, loader) -> dict[str, InputStats]:
    """Every weight MatMul's input on the calibration sample (real tokens only), by node name."""
    graph = onnx.load(str(path))
    weights = {init.name for init in graph.graph.initializer}
    nodes = {node.input[0]: node.name for node in graph.graph.node
             if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in weights}
    outputs = {o.name for o in graph.graph.output}
    graph.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in nodes if name not in outputs)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = [i.name for i in session.get_inputs()]
    ratios = {name: [] for name in nodes}
    maxima = {name: 0.0 for name in nodes}
    for batch in loader:
        values = session.run(list(nodes), {k: batch[k].numpy() for k in feeds if k in batch})
        real = batch["attention_mask"].numpy().astype(bool)
        for name, value in zip(nodes, values):
            tokens = np.abs(value[real])
            ratios[name].append(float(tokens.max() / max(tokens.std(), 1e-12)))
            maxima[name] = np.maximum(maxima[name], tokens.max(axis=0))
    return {nodes[name]: InputStats(name, float(np.mean(ratios[name])), maxima[name]) for name in nodes}


def outlier_matmuls(stats: dict[str, InputStats], count: int) -> list[str]:
    """The `count` weight MatMuls whose inputs have the most extreme outliers: one per-tensor int8 scale
    stretched over such an outlier leaves the other values a few steps (in BERT-like models, the FFN output
    projections of some layers)."""
    ranked = sorted(stats, key=lambda node: stats[node].outlier_ratio, reverse=True)[:count]
    log.info("int8: outlier MatMuls %s (max|x|/std %s)", ranked, [round(stats[n].outlier_ratio, 1) for n in ranked])
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
            ordered.append(onnx.helper.make_node("Mul", [node.input[0], inverse.name], [smoothed],
                                                 name=f"{node.name}/smooth"))
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
    write_settings(target, {"converter": "onnxruntime.transformers OnnxModel.convert_float_to_float16",
                            "keep_io_types": True, "execution_provider": CUDA, "onnxruntime": ort.__version__})
    return target


def check_parity(cfg: DictConfig, model, tokenizer, graphs: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Logits and predictions of every graph against PyTorch on the first examples of the parity split;
    float graphs must match closely, the precision's graph must agree on enough predictions."""
    task = get_task(cfg.task.name)
    examples = load_examples(task, cfg.data.root, cfg.export.parity_split, cfg.data.split_seed, cfg.data.download)
    examples = examples[: cfg.export.parity_examples]
    loader = make_loader(examples, tokenizer, task, cfg.task.max_seq_length, cfg.export.parity_batch_size)
    reference = batch_logits(model, loader)
    results = {}
    for name, path in graphs.items():
        session = OnnxClassifier(path, providers=providers_for(name))
        results[name] = compare(reference, batch_logits(session, loader), loader)
        log.info("parity %s: %s", name, results[name])
    for name in [name for name in ("exported", "fp32", "smoothed") if name in results]:  # the float graphs
        if results[name]["max_abs_diff"] > cfg.export.fp32_max_abs_diff:
            raise FastformersError(f"parity: the {name} graph's logits differ from PyTorch's by "
                                   f"{results[name]['max_abs_diff']:.3g} > export.fp32_max_abs_diff="
                                   f"{cfg.export.fp32_max_abs_diff} on {len(examples)} examples")
    chosen = results[cfg.precision.name]
    if chosen["agreement"] < cfg.precision.min_agreement:
        raise FastformersError(f"parity: the {cfg.precision.name} graph predicts like PyTorch on only "
                               f"{chosen['agreement']:.1%} of {len(examples)} examples < precision.min_agreement="
                               f"{cfg.precision.min_agreement}")
    return results


@torch.no_grad()
def batch_logits(model, loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, group_sizes) of every batch; batches of differing size and length exercise the dynamic axes."""
    model.eval()
    return [(model(**model_inputs(batch)).logits.float(), batch["group_sizes"]) for batch in loader]


def compare(reference, candidate, loader) -> dict[str, float]:
    """Largest logit difference, and the share of examples whose prediction is the same."""
    candidate_scoring = loader.collate_fn.candidate_scoring
    diffs, same = [], []
    for (ref, sizes), (got, _) in zip(reference, candidate, strict=True):
        diffs.append(float((ref - got).abs().max()))
        same.extend((example_scores(ref, sizes, candidate_scoring).argmax(1)
                     == example_scores(got, sizes, candidate_scoring).argmax(1)).tolist())
    return {"max_abs_diff": max(diffs), "agreement": float(np.mean(same)), "examples": len(same)}
