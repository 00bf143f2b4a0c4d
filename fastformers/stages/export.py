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
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from omegaconf import DictConfig
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.onnx_model import OnnxModel
from onnxruntime.transformers.optimizer import optimize_model

from fastformers.data import load_examples, make_loader, parse_split
from fastformers.errors import FastformersError
from fastformers.models import encoder_layers, example_scores, load_finetuned, model_inputs
from fastformers.runtime import CUDA, GRAPHS, INDEX, OnnxClassifier, providers_for, require_provider
from fastformers.tasks import get_task

log = logging.getLogger(__name__)

VERSION = 2  # bump when a code change alters what this stage writes
PROVIDES = "onnx"
USES = ("model",)
CONFIG_KEYS = ("task", "export", "precision", "data.split_seed")

PRECISIONS = ("fp32", "int8", "fp16")
STOCK_INT8 = "int8_stock"  # quantize_dynamic per-channel QInt8, nothing kept float: what users get today
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
        if not isinstance(precision.keep_float, int) or precision.keep_float < 0:
            raise FastformersError(f"precision.keep_float={precision.keep_float!r} must be a count >= 0")
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
    fp32, fusions = optimize(exported, *attention_shape(model))
    graphs = {"exported": exported, "fp32": fp32}
    float_matmuls: list[str] = []
    if cfg.precision.name == "int8":
        if cfg.precision.keep_float:
            float_matmuls = outlier_matmuls(fp32, calibration_loader(cfg, tokenizer), cfg.precision.keep_float)
        graphs["int8"] = quantize_int8(fp32, cfg.precision.weight_type, cfg.precision.per_channel,
                                       cfg.precision.reduce_range, float_matmuls)
        if float_matmuls:  # the stock pipeline's graph too, for a reference row timed beside ours
            graphs[STOCK_INT8] = quantize_int8(fp32, "QInt8", True, False, suffix="quantized_stock")
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
               "float_matmuls": len(float_matmuls)}
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


def optimize(path: Path, num_heads: int, hidden_size: int) -> tuple[Path, dict[str, int]]:
    """onnxruntime's transformer optimizer (BERT and RoBERTa share model_type bert); returns the fused graph
    and how many of each fused operator it holds."""
    optimized = optimize_model(str(path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size)
    fusions = {op: int(n) for op, n in optimized.get_fused_operator_statistics().items()}
    target = sibling(path, "optimized")
    optimized.save_model_to_file(str(target))
    write_settings(target, {"optimizer": "onnxruntime.transformers.optimizer.optimize_model", "model_type": "bert",
                            "num_heads": num_heads, "hidden_size": hidden_size, "onnxruntime": ort.__version__,
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


def calibration_loader(cfg: DictConfig, tokenizer):
    """The calibration sample: `precision.calibration_examples` of `precision.calibration_split` (train by default)."""
    task = get_task(cfg.task.name)
    examples = load_examples(task, cfg.data.root, cfg.precision.calibration_split, cfg.data.split_seed,
                             cfg.data.download)[: cfg.precision.calibration_examples]
    return make_loader(examples, tokenizer, task, cfg.task.max_seq_length, 8)


def outlier_matmuls(path: Path, loader, count: int) -> list[str]:
    """The `count` weight MatMuls whose inputs have the most extreme outliers, max|x| / std over real tokens of
    the calibration sample: one per-tensor int8 scale stretched over such an outlier leaves the other values
    a few steps (in BERT-like models, the FFN output projections of some layers)."""
    graph = onnx.load(str(path))
    weights = {init.name for init in graph.graph.initializer}
    inputs = {node.input[0]: node.name for node in graph.graph.node
              if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in weights}
    outputs = {o.name for o in graph.graph.output}
    graph.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in inputs if name not in outputs)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = [i.name for i in session.get_inputs()]
    ratios = {name: [] for name in inputs}
    for batch in loader:
        values = session.run(list(inputs), {k: batch[k].numpy() for k in feeds if k in batch})
        real = batch["attention_mask"].numpy().astype(bool)
        for name, value in zip(inputs, values):
            tokens = np.abs(value[real])
            ratios[name].append(float(tokens.max() / max(tokens.std(), 1e-12)))
    mean = {name: float(np.mean(values)) for name, values in ratios.items()}
    ranked = sorted(inputs, key=mean.get, reverse=True)[:count]
    log.info("int8: keeping float %s (max|x|/std %s)", [inputs[n] for n in ranked], [round(mean[n], 1) for n in ranked])
    return [inputs[name] for name in ranked]


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
    for name in ("exported", "fp32"):
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
