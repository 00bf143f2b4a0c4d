"""The engine seam: the registry composes from conf/engines/, every engine x precision runs the exported tiny
model like PyTorch (allclose for float, argmax agreement for bf16/int8), shape buckets change nothing but the
shapes, and an unknown engine or precision is refused in one line before any work."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from fastformers.data.loading import load_examples, make_loader
from fastformers.data.tasks import TASKS
from fastformers.engines import (
    Engine,
    EngineModel,
    artifact_path,
    engine_names,
    get_engine,
    pad_to_bucket,
)
from fastformers.engines.openvino_engine import OpenVinoEngine
from fastformers.errors import FastformersError
from fastformers.models.loading import load_finetuned, model_inputs
from fastformers.run import pipeline
from fastformers.run.cli import CONF_DIR
from fastformers.tracking import runs as tracking
from tests.helpers import compose_cfg


def test_the_registry_composes_every_engine_from_its_config_file(make_cfg):
    cfg = make_cfg()
    assert engine_names(cfg.engines) == ["onnxruntime", "openvino", "torch"]
    for name in engine_names(cfg.engines):
        engine = get_engine(name, cfg.engines)
        assert isinstance(engine, Engine) and engine.name == name and "fp32" in engine.precisions
    assert get_engine("openvino", cfg.engines).options["nncf"]["ignored_types"] == ["Gather"]
    only_ort = make_cfg("engines=[torch,onnxruntime]", "export.engines=[onnxruntime]")
    assert engine_names(only_ort.engines) == ["onnxruntime", "torch"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, superglue_root):
    """The export stage's output for a fine-tuned tiny BERT in int8: artifacts of every engine."""
    cfg = compose_cfg(
        superglue_root,
        tmp_path_factory.mktemp("engines"),
        "finetune.learning_rate=5e-3",
        "stages=[finetune,export]",
        "precision=int8",
        "precision.calibration_examples=16",
    )
    pipeline.run(cfg)
    client = MlflowClient(tracking.tracking_uri(cfg))
    run = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment_name).experiment_id])[0]
    folder = Path(run.data.tags["cache.export.path"])
    model, tokenizer = load_finetuned(Path(run.data.tags["cache.finetune.path"]) / "model")
    loader = make_loader(load_examples(TASKS["cb"], superglue_root, "val"), tokenizer, TASKS["cb"], 64, 5)
    with torch.no_grad():
        reference = [model(**model_inputs(batch)).logits for batch in loader]
    return {"cfg": cfg, "folder": folder, "loader": loader, "reference": reference}


def engine_logits(engine: Engine, path: Path, precision: str, loader, bucket=None) -> list[torch.Tensor]:
    model = EngineModel(engine.open(path, precision, threads=1, bucket=bucket))
    return [model(**model_inputs(batch)).logits for batch in loader]


def exported_engine_precisions() -> list[tuple[str, str]]:
    """Every engine x precision an int8 export builds an artifact for, from the registry (conf/engines/)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        engines = compose("config", overrides=["precision=int8"]).engines
    pairs = []
    for name in engine_names(engines):
        engine = get_engine(name, engines)
        if not engine.runs_model_folder:
            pairs += [(name, precision) for precision in engine.precisions if engine.builds(precision, "int8")]
    return pairs


ENGINE_PRECISIONS = exported_engine_precisions()


@pytest.mark.slow
@pytest.mark.parametrize("name, precision", ENGINE_PRECISIONS)
def test_every_engine_and_precision_runs_the_export_like_pytorch(exported, name, precision):
    engine = get_engine(name, exported["cfg"].engines)
    reason = engine.unavailable(precision)
    if reason:
        pytest.skip(reason)
    got = engine_logits(engine, artifact_path(exported["folder"], engine, precision), precision, exported["loader"])
    ref, got = torch.cat(exported["reference"]), torch.cat(got)
    assert got.shape == ref.shape and got.dtype == torch.float32
    if precision in engine.float_precisions:
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-3)
    else:  # low precision: the same decisions on (nearly) every example
        agreement = (got.argmax(1) == ref.argmax(1)).float().mean().item()
        assert agreement >= 0.8, f"{name}/{precision} agrees with PyTorch on {agreement:.0%}"
    index = json.loads((exported["folder"] / "export.json").read_text())
    label = f"{name}/{precision}"
    assert label in index["parity"] and index["parity"][label]["examples"] == 18


@pytest.mark.slow
@pytest.mark.parametrize("name, precision", [("onnxruntime", "int8"), ("openvino", "fp32"), ("openvino", "int8")])
def test_bucketed_and_dynamic_shapes_give_the_same_predictions(exported, name, precision):
    engine = get_engine(name, exported["cfg"].engines)
    path = artifact_path(exported["folder"], engine, precision)
    dynamic = torch.cat(engine_logits(engine, path, precision, exported["loader"]))
    bucketed = torch.cat(engine_logits(engine, path, precision, exported["loader"], bucket=16))
    assert torch.equal(dynamic.argmax(1), bucketed.argmax(1))
    if precision == "fp32":
        torch.testing.assert_close(dynamic, bucketed, atol=1e-4, rtol=1e-3)


def test_bucket_padding_is_masked_zeros_up_to_the_next_multiple():
    inputs = {"input_ids": np.array([[5, 6, 7]]), "attention_mask": np.array([[1, 1, 1]])}
    padded = pad_to_bucket(inputs, 4)
    assert padded["input_ids"].tolist() == [[5, 6, 7, 0]] and padded["attention_mask"].tolist() == [[1, 1, 1, 0]]
    assert pad_to_bucket(padded, 4)["input_ids"].shape == (1, 4)  # already a multiple: unchanged


@pytest.mark.slow
def test_openvino_keeps_at_most_max_compiled_static_models(exported):
    engine = OpenVinoEngine(max_compiled=2)
    path = artifact_path(exported["folder"], engine, "fp32")
    from fastformers.engines.openvino_engine import CompiledBuckets

    compiled = CompiledBuckets(path, "fp32", 1, engine.options, static=True)
    for length in (8, 16, 24, 8):
        compiled.infer(
            {"input_ids": np.ones((1, length), dtype=np.int64), "attention_mask": np.ones((1, length), dtype=np.int64)}
        )
    assert list(compiled.compiled) == [(1, 24), (1, 8)]  # least recently used dropped


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["evaluate.engine=tensorrt"], r"engine 'tensorrt' is not configured; choose from"),
        (
            ["evaluate.engine=openvino", "evaluate.precision=fp8"],
            r"evaluate.precision: engine openvino runs precisions "
            r"\['fp32', 'bf16', 'int8', 'int8_of', 'int8_ac'\], not 'fp8'",
        ),
        (["export.engines=[openvino]"], r"export.engines=\['openvino'\] must include onnxruntime"),
        (["export.engines=[onnxruntime,tvm]"], r"engine 'tvm' is not configured"),
        (
            ["engines.openvino._target_=builtins.dict"],
            r"engines.openvino._target_='builtins.dict' is not a fastformers Engine",
        ),
    ],
)
def test_an_unknown_engine_or_precision_is_refused_before_any_work(make_cfg, overrides, message):
    cfg = make_cfg("stages=[finetune,export,evaluate]", *overrides)
    with pytest.raises(FastformersError, match=message):
        pipeline.run(cfg)
    assert not os.path.exists(cfg.paths.cache_dir)


def test_openvino_telemetry_is_declined_once_the_engine_imports_openvino():
    """The converter's and NNCF's telemetry fork a process per event that resolves a host name; offline, one such
    child hung in getaddrinfo and kept a finished sweep from exiting. Using the engine declines it."""
    pytest.importorskip("openvino_telemetry")
    from openvino.tools.ovc.telemetry_utils import init_ovc_telemetry
    from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker

    from fastformers.engines.openvino_engine import _ov

    _ov()
    assert OptInChecker().check(enable_opt_in_dialog=False) == ConsentCheckResult.DECLINED
    assert init_ovc_telemetry().consent is False
