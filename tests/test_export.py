"""Export, fusion, int8 quantization and fp16 conversion of tiny random models, checked against PyTorch;
the export stage (onnxruntime and OpenVINO artifacts) and evaluate on an exported engine through the pipeline."""

import copy
import inspect
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fastformers.data.loading import load_examples, make_loader
from fastformers.data.tasks import TASKS
from fastformers.engines import EngineModel
from fastformers.engines.onnx import sibling
from fastformers.engines.onnx.convert import export_onnx
from fastformers.engines.onnx.optimize import optimize
from fastformers.engines.onnx.quantize import (
    Int8Options,
    convert_fp16,
    matmul_input_stats,
    outlier_matmuls,
    quantize_int8,
    smooth_matmuls,
)
from fastformers.engines.onnxruntime_engine import (
    CPU,
    CUDA,
    OnnxClassifier,
    disabled_optimizers,
)
from fastformers.engines.parity import batch_logits, compare
from fastformers.errors import FastformersError
from fastformers.models.loading import model_inputs
from fastformers.models.pruning import attention_shape, encoder_layers, keep_attention_heads
from fastformers.run import pipeline
from tests.helpers import LAYERS, compose_cfg, saved_tiny


def on_onnxruntime(path, **kwargs) -> EngineModel:
    """A graph behind an onnxruntime session, called like a transformers model."""
    return EngineModel(OnnxClassifier(path, **kwargs).run)


def feeds_of(loader) -> list[dict[str, np.ndarray]]:
    """A loader's batches as the numpy feeds quantizers calibrate on."""
    return [{k: v.numpy() for k, v in model_inputs(batch).items()} for batch in loader]


@pytest.fixture(scope="module")
def bert(tmp_path_factory, superglue_root):
    """A tiny BERT with its raw and fused graphs."""
    folder = tmp_path_factory.mktemp("bert")
    model, tokenizer = saved_tiny("bert", superglue_root, folder / "model")
    exported = export_onnx(model, tokenizer, folder / "onnx" / "model.onnx", opset=17)
    fused, fusions = optimize(exported, *attention_shape(model))
    return {
        "model": model,
        "tokenizer": tokenizer,
        "exported": exported,
        "fused": fused,
        "fusions": fusions,
        "loader": make_loader(load_examples(TASKS["cb"], superglue_root, "val"), tokenizer, TASKS["cb"], 128, 5),
    }


def test_optimizer_fuses_attention_per_layer_and_the_embeddings_once(bert):
    fusions = bert["fusions"]
    assert fusions["Attention"] == LAYERS
    assert fusions["EmbedLayerNormalization"] == 1
    assert fusions["SkipLayerNormalization"] == 2 * LAYERS
    assert fusions["BiasGelu"] == LAYERS
    fused_ops = {node.op_type for node in onnx.load(str(bert["fused"])).graph.node}
    assert "Softmax" not in fused_ops  # attention no longer runs as separate MatMul/Softmax nodes
    settings = json.loads(bert["fused"].with_suffix(".json").read_text())
    assert settings["num_heads"] == 4 and settings["hidden_size"] == 64 and settings["fused_operators"] == fusions
    assert json.loads(bert["exported"].with_suffix(".json").read_text())["opset"] == 17


def test_a_graph_fused_without_skip_layer_norm_stays_so_in_every_session(bert, tmp_path):
    unfused, fusions = optimize(
        bert["exported"],
        4,
        64,
        {"enable_skip_layer_norm": False, "enable_bias_skip_layer_norm": False},
        suffix="plain_ln",
    )
    assert fusions["SkipLayerNormalization"] == 0 and fusions["LayerNormalization"] == 2 * LAYERS
    quantized = quantize_int8(unfused)
    for graph in (unfused, quantized):  # quantization keeps the graph's word on its session
        assert disabled_optimizers(graph, [CPU]) == ["SkipLayerNormFusion"]
        dumped = tmp_path / f"session_{graph.stem}.onnx"  # what onnxruntime runs after its own fusions
        OnnxClassifier(graph, session={"optimized_model_filepath": str(dumped)})
        ops = [node.op_type for node in onnx.load(str(dumped)).graph.node]
        assert "SkipLayerNormalization" not in ops and ops.count("LayerNormalization") == 2 * LAYERS
    assert disabled_optimizers(bert["fused"], [CPU]) == []  # default fusions: nothing to hold back
    reference = batch_logits(on_onnxruntime(bert["fused"]), bert["loader"])
    assert (
        compare(reference, batch_logits(on_onnxruntime(unfused), bert["loader"]), bert["loader"])["max_abs_diff"] < 1e-4
    )
    with pytest.raises(
        FastformersError, match=r"export\.fusion_options\.enable_warp_speed: not an onnxruntime FusionOptions"
    ):
        optimize(bert["exported"], 4, 64, {"enable_warp_speed": True})


def test_roberta_graph_takes_only_the_inputs_its_tokenizer_gives(tmp_path, superglue_root):
    model, tokenizer = saved_tiny("roberta", superglue_root, tmp_path / "model")
    exported = export_onnx(model, tokenizer, tmp_path / "model.onnx", opset=17)
    fused, fusions = optimize(exported, *attention_shape(model))
    inputs = [i.name for i in ort.InferenceSession(str(fused), providers=["CPUExecutionProvider"]).get_inputs()]
    assert inputs == ["input_ids", "attention_mask"]
    assert fusions["Attention"] == LAYERS


@pytest.mark.parametrize("graph", ["exported", "fused"])
def test_graphs_match_pytorch_on_new_batch_sizes_and_lengths(bert, graph):
    session = on_onnxruntime(bert[graph])
    tokenizer, model = bert["tokenizer"], bert["model"]
    for batch_size, words in [(1, 3), (3, 40), (7, 11)]:
        texts = [" ".join(["the cat sat by the river"] * words)[: 6 * words + i] for i in range(batch_size)]
        inputs = dict(tokenizer(texts, padding=True, return_tensors="pt"))
        got = session(**inputs).logits
        with torch.no_grad():
            expected = model(**inputs).logits
        assert got.shape == (batch_size, 3)
        assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_parity_on_eval_batches_is_tight_for_the_fused_graph(bert):
    reference = batch_logits(bert["model"], bert["loader"])
    result = compare(reference, batch_logits(on_onnxruntime(bert["fused"]), bert["loader"]), bert["loader"])
    assert result["max_abs_diff"] < 1e-4 and result["agreement"] == 1.0 and result["examples"] == 18


def weight_inputs(graph: onnx.ModelProto, op_type: str) -> list[bool]:
    """For every node of `op_type`: whether its second input (the weight side) is a stored initializer."""
    stored = {t.name for t in graph.graph.initializer}
    return [node.input[1] in stored for node in graph.graph.node if node.op_type == op_type]


@pytest.mark.parametrize(
    "weight_type, per_channel, dtype",
    [("QInt8", False, onnx.TensorProto.INT8), ("QUInt8", True, onnx.TensorProto.UINT8)],
)
def test_int8_quantizes_dense_weights_and_keeps_predictions(bert, tmp_path, weight_type, per_channel, dtype):
    source = tmp_path / "model.onnx"
    source.write_bytes(bert["fused"].read_bytes())
    quantized = quantize_int8(source, Int8Options(weight_type, per_channel))
    assert quantized.name == "model_quantized.onnx"
    graph = onnx.load(str(quantized))
    ops = [node.op_type for node in graph.graph.node]
    assert ops.count("QAttention") == LAYERS and "Attention" not in ops
    assert weight_inputs(graph, "MatMulInteger") and all(weight_inputs(graph, "MatMulInteger"))  # Q·Kᵀ stays float
    assert any(t.data_type == dtype for t in graph.graph.initializer)
    settings = json.loads(quantized.with_suffix(".json").read_text())
    assert settings["weight_type"] == weight_type and settings["per_channel"] is per_channel
    assert quantized.stat().st_size < 0.75 * bert["fused"].stat().st_size

    reference = batch_logits(bert["model"], bert["loader"])
    result = compare(reference, batch_logits(on_onnxruntime(quantized), bert["loader"]), bert["loader"])
    assert result["agreement"] >= 0.8
    assert 0 < result["max_abs_diff"] < 0.05


@pytest.fixture(scope="module")
def outlier_graph(tmp_path_factory, superglue_root):
    """A tiny BERT whose layer-1 FFN has one neuron firing 50x louder (its GELU output is an outlier), fused,
    with its MatMul inputs measured on CB train."""
    folder = tmp_path_factory.mktemp("outlier")
    model, tokenizer = saved_tiny("bert", superglue_root, folder / "model")
    with torch.no_grad():
        dense = encoder_layers(model)[1].intermediate.dense
        dense.weight[7] *= 50.0
        dense.bias[7] = 20.0
    exported = export_onnx(model, tokenizer, folder / "onnx" / "model.onnx", opset=17)
    fused, _ = optimize(exported, *attention_shape(model))
    loader = make_loader(load_examples(TASKS["cb"], superglue_root, "train"), tokenizer, TASKS["cb"], 128, 8)
    return {
        "fused": fused,
        "stats": matmul_input_stats(fused, feeds_of(loader)),
        "folder": folder,
        "loader": make_loader(load_examples(TASKS["cb"], superglue_root, "val"), tokenizer, TASKS["cb"], 128, 8),
    }


def test_the_matmul_fed_by_an_outlier_is_found_on_calibration_data_and_kept_float(outlier_graph):
    fused = outlier_graph["fused"]
    (chosen,) = outlier_matmuls(outlier_graph["stats"], 1)
    assert "layer.1/output/dense" in chosen
    graph = onnx.load(str(quantize_int8(fused, Int8Options.stock(), [chosen])))
    float_matmuls = [node.name for node in graph.graph.node if node.op_type == "MatMul"]
    assert chosen in float_matmuls and weight_inputs(graph, "MatMulInteger")
    assert json.loads(sibling(fused, "quantized").with_suffix(".json").read_text())["nodes_kept_float"] == [chosen]


def test_smoothing_moves_the_outlier_into_the_weights_without_changing_the_float_graph(outlier_graph):
    fused, stats = outlier_graph["fused"], outlier_graph["stats"]
    (chosen,) = outlier_matmuls(stats, 1)
    smoothed = smooth_matmuls(fused, stats, [chosen], alpha=0.5)
    loader = outlier_graph["loader"]
    reference = batch_logits(on_onnxruntime(fused), loader)
    assert compare(reference, batch_logits(on_onnxruntime(smoothed), loader), loader)["max_abs_diff"] < 1e-4
    after = matmul_input_stats(smoothed, feeds_of(outlier_graph["loader"]))[chosen]

    def spread(channel_max):  # how far the loudest channel stretches the one per-tensor int8 scale
        return channel_max.max() / np.median(channel_max)

    assert spread(after.channel_max) < spread(stats[chosen].channel_max) / 3
    graph = onnx.load(str(quantize_int8(smoothed)))
    assert "MatMul" not in [node.op_type for node in graph.graph.node]  # every dense layer in int8 now
    assert [node.op_type for node in graph.graph.node if node.name == f"{chosen}/smooth"] == ["Mul"]


def test_fp16_conversion_leaves_no_float32_weights_and_keeps_io_types(bert, tmp_path):
    source = tmp_path / "model.onnx"
    source.write_bytes(bert["fused"].read_bytes())
    graph = onnx.load(str(convert_fp16(source)))
    types = {t.data_type for t in graph.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types and onnx.TensorProto.FLOAT not in types
    assert [i.type.tensor_type.elem_type for i in graph.graph.input] == [onnx.TensorProto.INT64] * 2
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@pytest.mark.skipif(CUDA not in ort.get_available_providers(), reason="fp16 runs on onnxruntime's CUDA provider")
def test_fp16_graph_predicts_like_pytorch_on_the_gpu(bert, tmp_path):
    source = tmp_path / "model.onnx"
    source.write_bytes(bert["fused"].read_bytes())
    session = on_onnxruntime(convert_fp16(source), providers=[CUDA])
    reference = batch_logits(bert["model"], bert["loader"])
    assert compare(reference, batch_logits(session, bert["loader"]), bert["loader"])["agreement"] >= 0.9


def predictions(folder):
    return [json.loads(line)["prediction"] for line in open(f"{folder}/predictions_val.jsonl")]


@pytest.mark.slow
def test_export_stage_then_evaluate_on_onnx_matches_pytorch(make_cfg):
    stages = ["stages=[finetune,export,evaluate]", "finetune.learning_rate=5e-3"]
    on_onnx = pipeline.run(make_cfg(*stages, "evaluate.engine=onnxruntime"))
    assert on_onnx["export/fused/Attention"] == LAYERS and on_onnx["export/fused/EmbedLayerNormalization"] == 1
    assert on_onnx["export/parity/onnxruntime/fp32/max_abs_diff"] < 1e-4
    assert on_onnx["export/parity/onnxruntime/fp32/agreement"] == 1.0
    on_torch = pipeline.run(make_cfg(*stages, "evaluate.engine=torch"))
    assert on_torch["evaluate/val/score"] == on_onnx["evaluate/val/score"]
    int8 = pipeline.run(make_cfg(*stages, "evaluate.engine=onnxruntime", "precision=int8"))
    assert int8["export/parity/onnxruntime/int8/agreement"] >= 0.9
    assert int8["export/artifact_mb/onnxruntime/int8"] < int8["export/artifact_mb/onnxruntime/fp32"]
    assert abs(int8["evaluate/val/accuracy"] - on_torch["evaluate/val/accuracy"]) <= 2 / 18

    from mlflow.tracking import MlflowClient

    from fastformers.tracking import runs as tracking

    cfg = make_cfg()
    client = MlflowClient(tracking.tracking_uri(cfg))
    runs = client.search_runs(
        [client.get_experiment_by_name(cfg.mlflow.experiment_name).experiment_id],
        order_by=["attributes.start_time ASC"],
    )
    tags = [(r.data.tags["cache.finetune"], r.data.tags["cache.export"]) for r in runs]
    assert tags == [("miss", "miss"), ("hit", "hit"), ("hit", "miss")]  # int8 is a new export, same model
    assert predictions(runs[0].data.tags["cache.evaluate.path"]) == predictions(
        runs[1].data.tags["cache.evaluate.path"]
    )
    index = json.loads(open(f"{runs[2].data.tags['cache.export.path']}/export.json").read())
    assert index["precision"] == "int8"
    assert index["artifacts"]["onnxruntime/int8"] == "model/model_optimized_quantized.onnx"
    assert index["artifacts"]["onnxruntime/int8_stock"] == "model/model_optimized_stock_quantized.onnx"  # reference row


@pytest.mark.slow
def test_a_graph_that_disagrees_with_pytorch_fails_the_stage_loudly(make_cfg):
    cfg = make_cfg("stages=[finetune,export]", "finetune.epochs=1", "export.fp32_max_abs_diff=1e-12")
    with pytest.raises(
        FastformersError,
        match=r"parity: the exported graph's logits differ from PyTorch's by "
        r"\S+ > export.fp32_max_abs_diff=1e-12 on 18 examples",
    ):
        pipeline.run(cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["stages=[finetune,evaluate]", "evaluate.engine=onnxruntime"],
            "'evaluate' needs the 'onnx' output of an earlier stage",
        ),
        (
            ["stages=[finetune,export]", "precision=int8", "engines.onnxruntime.int8.int8.weight_type=QInt4"],
            "engines.onnxruntime.int8.int8.weight_type='QInt4' must be one of",
        ),
        (["stages=[finetune,export]", "export.opset=11"], "export.opset=11"),
        (["stages=[finetune,export]", "precision=int8", "precision.min_agreement=1.5"], "precision.min_agreement=1.5"),
        (["stages=[finetune,export,evaluate]", "evaluate.engine=tf"], r"engine 'tf' is not configured; choose from \["),
        (
            ["stages=[finetune,export]", "precision=int8", "precision.calibration_split='val[:50%]'"],
            r"precision.calibration_split='val\[:50%\]' overlaps the evaluation split",
        ),
        (
            ["stages=[finetune,export]", "precision=int8", "engines.onnxruntime.int8.int8.outlier_matmuls=-1"],
            "engines.onnxruntime.int8.int8.outlier_matmuls=-1",
        ),
        (
            ["stages=[finetune,export]", "precision=int8", "engines.onnxruntime.int8.int8.outliers=drop"],
            "engines.onnxruntime.int8.int8.outliers='drop' must be one",
        ),
        (
            ["stages=[finetune,export]", "precision=int8", "engines.onnxruntime.int8.int8.smooth_alpha=1.5"],
            r"engines.onnxruntime.int8.int8.smooth_alpha=1.5 must be in \(0, 1\)",
        ),
        (
            ["stages=[finetune,export]", "precision=int8", "+precision.reduce_range=true"],
            r"precision.reduce_range moved to the engines' int8 variants",
        ),
        (
            ["stages=[finetune,export]", "precision=int8", "engines.openvino.int8.int8_of.overflow_fix=half"],
            r"engines.openvino.int8.int8_of.overflow_fix='half' must be one of",
        ),
        (
            ["stages=[finetune,export]", "precision=int8", "+engines.onnxruntime.int8.int8_x.when={avx512: false}"],
            r"engines.onnxruntime.int8.int8_x.when: avx512=False: a variant's condition names a CPU feature",
        ),
    ],
)
def test_bad_export_configs_fail_before_any_work(make_cfg, overrides, message):
    cfg = make_cfg(*overrides)
    with pytest.raises(FastformersError, match=message):
        pipeline.run(cfg)
    assert not os.path.exists(cfg.paths.cache_dir)


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this machine can run fp16")
def test_fp16_without_a_gpu_is_refused_with_the_reason(make_cfg):
    with pytest.raises(
        FastformersError,
        match=r"precision=fp16: fp16 runs on onnxruntime's CUDAExecutionProvider \(install onnxruntime-gpu",
    ):
        pipeline.run(make_cfg("stages=[finetune,export]", "precision=fp16"))


def test_attention_shape_gives_the_optimizer_the_kept_heads_of_a_pruned_model(bert):
    assert attention_shape(bert["model"]) == (4, 64)
    pruned = copy.deepcopy(bert["model"])
    for layer in encoder_layers(pruned):
        keep_attention_heads(layer, [1, 3])
    assert attention_shape(pruned) == (2, 32)  # head size 16 unchanged; the model stays 64 wide


@pytest.fixture(scope="module")
def int8_export(superglue_root, tmp_path_factory):
    """One int8 export (every engine of export.engines; static scales too, one outlier MatMul kept float),
    shared by the tests that read it, with the split each of the export stage's readers asked for."""
    from mlflow.tracking import MlflowClient

    from fastformers.data.loading import DataSource
    from fastformers.tracking import runs as tracking

    reads = []
    original = DataSource.examples

    def recording(self, split, *args):
        reads.append((inspect.stack()[1].function, split))
        return original(self, split, *args)

    cfg = compose_cfg(
        superglue_root,
        tmp_path_factory.mktemp("int8") / "outputs",
        "stages=[finetune,export]",
        "finetune.learning_rate=5e-3",
        "precision=int8",
        "engines.onnxruntime.precisions.int8_static.built=true",
        "engines.onnxruntime.int8.int8.outlier_matmuls=1",
        "engines.onnxruntime.int8.int8.outliers=float",
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DataSource, "examples", recording)
        results = pipeline.run(cfg)
    client = MlflowClient(tracking.tracking_uri(cfg))
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment_name).experiment_id])
    folder = run.data.tags["cache.export.path"]
    return {
        "cfg": cfg,
        "results": results,
        "reads": reads,
        "folder": folder,
        "index": json.loads(open(f"{folder}/export.json").read()),
    }


@pytest.mark.slow
def test_static_int8_calibrates_on_the_calibration_split_only_and_keeps_predictions(int8_export):
    reads, results = int8_export["reads"], int8_export["results"]
    calibration = {split for caller, split in reads if caller == "calibration_examples"}
    assert calibration == {"train"} and ("check_parity", "val") in reads  # val is read for parity only
    assert results["export/parity/onnxruntime/int8_static/agreement"] >= 0.8

    folder, index = int8_export["folder"], int8_export["index"]
    graph = onnx.load(f"{folder}/{index['artifacts']['onnxruntime/int8_static']}")
    ops = [node.op_type for node in graph.graph.node]
    assert ops.count("QAttention") == LAYERS and "DequantizeLinear" in ops
    assert ops.count("DynamicQuantizeLinear") == LAYERS  # the Attention inputs only: the MatMuls' scales are fixed
    kept = index["settings"]["onnxruntime/int8_static"]["nodes_kept_float"]
    assert len(kept) == 1 and kept[0] in [node.name for node in graph.graph.node if node.op_type == "MatMul"]


@pytest.mark.slow
def test_int8_export_builds_openvino_artifacts_whose_fp32_model_matches_pytorch(int8_export):
    cfg, folder, index, results = (int8_export[k] for k in ("cfg", "folder", "index", "results"))
    assert index["skipped_engines"] == {}
    assert index["artifacts"]["openvino/fp32"] == "model/openvino/model.xml"
    assert index["artifacts"]["openvino/int8"] == "model/openvino/model_int8.xml"
    for key in ("openvino/fp32", "openvino/int8"):
        ir = Path(folder) / index["artifacts"][key]
        assert ir.is_file() and ir.with_suffix(".bin").is_file()  # the IR's weights beside its graph
        assert results[f"export/artifact_mb/{key}"] > 0
    assert "FakeQuantize" in (Path(folder) / index["artifacts"]["openvino/int8"]).read_text()  # NNCF's int8
    fp32 = index["parity"]["openvino/fp32"]
    assert fp32["max_abs_diff"] < cfg.export.fp32_max_abs_diff and fp32["agreement"] == 1.0
    assert results["export/parity/openvino/fp32/max_abs_diff"] == fp32["max_abs_diff"]
    assert "openvino/int8" in index["parity"]  # recorded for the benchmark's gate, not held by the export


@pytest.mark.slow
def test_int8_export_builds_every_declared_variant_and_each_runs(int8_export):
    """Every variant of both engines is built whatever this CPU needs (one cache entry fits any machine), with
    its recipe beside it, and runs through its engine in the parity check; the accuracy-controlled one only on a
    CPU it applies to (tests/test_accuracy_control.py)."""
    index = int8_export["index"]
    from fastformers.engines import get_engine

    openvino = get_engine("openvino", int8_export["cfg"].engines)
    assert ("openvino/int8_ac" in index["artifacts"]) == openvino.built_here(openvino.variants["int8_ac"])
    onnx_variants = ("int8", "int8_stock", "int8_rr", "int8_u8u8")
    for key in [f"onnxruntime/{v}" for v in onnx_variants] + ["openvino/int8", "openvino/int8_of"]:
        assert key in index["artifacts"] and index["parity"][key]["agreement"] >= 0.5
    settings = index["settings"]
    assert (
        settings["onnxruntime/int8_rr"]["reduce_range"] is True
        and settings["onnxruntime/int8"]["reduce_range"] is False
    )
    assert settings["onnxruntime/int8_u8u8"]["weight_type"] == "QUInt8"
    assert settings["onnxruntime/int8_stock"]["nodes_kept_float"] == []
    assert len(settings["onnxruntime/int8_rr"]["nodes_kept_float"]) == 2  # the fixture's override reached int8 only
    assert index["artifacts"]["openvino/int8_of"] == "model/openvino/model_int8_of.xml"
