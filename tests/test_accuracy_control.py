"""OpenVINO's accuracy-controlled int8 variant (NNCF quantize_with_accuracy_control): validated on unlabelled
calibration-split examples past the calibration sample, never on the eval split; built and tried only on a CPU
its `when` names."""

import functools
import inspect

import numpy as np
import pytest

from fastformers.data.loading import DataSource
from fastformers.engines import ExportContext, get_engine
from fastformers.engines import variants as cpu_variants
from fastformers.engines.onnx.convert import export_onnx
from fastformers.errors import FastformersError
from fastformers.run import pipeline
from fastformers.stages import export
from tests.helpers import saved_tiny

NO_VNNI = frozenset({"avx2"})


@pytest.fixture
def recorded_reads(monkeypatch):
    """(caller, split) of every read of examples by the export stage's feed builders."""
    reads = []
    original = DataSource.examples

    def recording(self, split, *args, **kwargs):
        reads.append((inspect.stack()[2].function, split))  # the feed builder above calibration_examples
        return original(self, split, *args, **kwargs)

    monkeypatch.setattr(DataSource, "examples", recording)
    return reads


def context(cfg, tmp_path):
    model, tokenizer = saved_tiny("bert", cfg.data.root, tmp_path / "model")
    onnx = export_onnx(model, tokenizer, tmp_path / "model.onnx", 17)
    run = pipeline.context_of(cfg)
    ctx = ExportContext(
        onnx,
        tmp_path,
        model.config.num_attention_heads,
        model.config.hidden_size,
        cfg.precision,
        cfg.export,
        functools.cache(lambda: export.calibration_feeds(run, tokenizer)),
        held_out=lambda count: export.held_out_feeds(run, tokenizer, count),
    )
    return ctx


def test_the_accuracy_controlled_variant_is_built_from_the_calibration_split_and_runs(
    make_cfg, tmp_path, monkeypatch, recorded_reads
):
    monkeypatch.setattr(cpu_variants, "cpu_flags", lambda: NO_VNNI)  # a CPU its `when` names
    cfg = make_cfg("precision=int8", "precision.calibration_examples=16")
    engine = get_engine("openvino", cfg.engines)
    ctx = context(cfg, tmp_path)
    artifacts = engine.prepare(ctx)

    assert {"fp32", "int8", "int8_of", "int8_ac"} <= set(artifacts) and engine.unavailable("int8_ac") is None
    held_out = [split for caller, split in recorded_reads if caller == "held_out_feeds"]
    assert held_out == [cfg.precision.calibration_split] == ["train"]  # never task.eval_split
    assert cfg.task.eval_split not in {split for _, split in recorded_reads}
    assert sum(len(feed["input_ids"]) for feed in ctx.held_out(64)) == 48 - 16  # past the calibration sample
    fp32 = engine.open(artifacts["fp32"], "fp32", 1)
    quantized = engine.open(artifacts["int8_ac"], "int8_ac", 1)
    feeds = ctx.calibration()
    same = np.concatenate([np.argmax(quantized(f), -1) == np.argmax(fp32(f), -1) for f in feeds])
    assert same.mean() >= 0.5  # a random tiny model: runs and mostly agrees; the gate judges it in a benchmark


def test_a_cpu_the_variant_does_not_name_neither_builds_nor_tries_it(make_cfg, monkeypatch):
    monkeypatch.setattr(cpu_variants, "cpu_flags", lambda: frozenset({"avx512_vnni"}))
    engine = get_engine("openvino", make_cfg("precision=int8").engines)
    assert not engine.built_here(engine.variants["int8_ac"]) and engine.built_here(engine.variants["int8_of"])
    assert "built only on a CPU it applies to" in engine.unavailable("int8_ac")


@pytest.mark.parametrize(
    "override, message",
    [
        ("engines.openvino.int8.int8_ac.accuracy_control.max_drop=1.5", r"accuracy_control.max_drop=1.5 must be"),
        ("engines.openvino.int8.int8_ac.accuracy_control.examples=0", r"accuracy_control.examples=0 must be"),
        ("~engines.openvino.int8.int8_ac.accuracy_control.max_iterations", r"must set exactly"),
    ],
)
def test_a_bad_accuracy_control_is_refused_naming_its_field(make_cfg, override, message):
    with pytest.raises(FastformersError, match=message):
        get_engine("openvino", make_cfg("precision=int8", override).engines)


@pytest.mark.parametrize(
    "calibration, message",
    [("null", r"calibration_examples=null calibrates on all"), ("48", r"no examples past the 48 calibration")],
)
def test_accuracy_control_needs_calibration_examples_left_over(make_cfg, tmp_path, calibration, message):
    cfg = make_cfg("precision=int8", f"precision.calibration_examples={calibration}")
    with pytest.raises(FastformersError, match=message):
        export.held_out_feeds(pipeline.context_of(cfg), None, 8)
