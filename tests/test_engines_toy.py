"""The engine seam's promise: a new engine is one module and one config file (`_target_` and its precisions),
and a new precision is one engine change and one config entry; nothing else in the package names engines."""

from pathlib import Path

import pytest

from fastformers.bench.settings import plan_settings
from fastformers.engines import artifact_key, get_engine
from fastformers.run import pipeline
from tests.helpers import mlflow_runs

TOY_MODULE = '''
import shutil

from fastformers.engines import Engine
from fastformers.engines.onnxruntime_engine import OnnxClassifier


class ToyEngine(Engine):
    """Runs a copy of the raw ONNX export; `fp32_copy` is the same graph under a second precision name."""

    name = "toy"

    def prepare(self, ctx):
        folder = ctx.folder / "toy"
        folder.mkdir(parents=True, exist_ok=True)
        return {"fp32": shutil.copy(ctx.onnx, folder / "model.onnx")}

    def load(self, path, precision, threads, options, bucket=None):
        return OnnxClassifier(path, threads).run
'''

TOY_CONFIG = """# @package engines
toy:
  _target_: toy_engine.ToyEngine
  precisions:
    fp32: {float: true}
    fp32_copy: {artifact: fp32}
"""


@pytest.fixture
def toy(tmp_path, monkeypatch) -> list[str]:
    """The toy engine's module on sys.path and its config in a config-search folder: the overrides that load it."""
    (tmp_path / "toy_engine.py").write_text(TOY_MODULE)
    (tmp_path / "conf" / "engines").mkdir(parents=True)
    (tmp_path / "conf" / "engines" / "toy.yaml").write_text(TOY_CONFIG)
    monkeypatch.syspath_prepend(str(tmp_path))
    return [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "engines=[torch,onnxruntime,openvino,toy]"]


def test_a_new_precision_is_one_config_entry_the_settings_accept_and_the_export_builds(make_cfg, toy):
    cfg = make_cfg(*toy, "benchmark.settings=[{name: t, engine: toy, precision: fp32_copy, padding: dynamic}]")
    engine = get_engine("toy", cfg.engines)
    assert engine.precisions == ("fp32", "fp32_copy") and engine.float_precisions == ("fp32",)
    assert engine.artifact_name("fp32_copy") == "fp32" and engine.builds("fp32_copy", "fp32")
    assert [(row.name, row.target.label) for row in plan_settings(cfg)] == [("t", "toy/fp32_copy")]


@pytest.mark.slow
def test_a_toy_engine_from_one_module_and_one_config_file_is_exported_checked_and_evaluated(make_cfg, toy):
    cfg = make_cfg(
        *toy,
        "stages=[finetune,export,evaluate]",
        "export.engines=[onnxruntime,toy]",
        "evaluate.engine=toy",
        "evaluate.precision=fp32_copy",
    )
    pipeline.run(cfg)
    _, (run,) = mlflow_runs(cfg)
    index = (Path(run.data.tags["cache.export.path"]) / "export.json").read_text()
    assert artifact_key("toy", "fp32") in index and '"toy/fp32_copy"' in index  # built, and held to parity
    evaluated = (Path(run.data.tags["cache.evaluate.path"]) / "evaluated.json").read_text()
    assert '"engine": "toy"' in evaluated and '"precision": "fp32_copy"' in evaluated
    assert any(key.endswith("val/score") for key in run.data.metrics)  # scored through the toy engine
