"""Serving under load and from a store you do not trust: the OpenVINO engine answers concurrent calls like
single ones, the served model refuses an oversized request and a stored engine `_target_` that is not an Engine
(before instantiating it), the logged model ships its own code with pinned requirements, and (slow) the load
test against a tiny run served on 127.0.0.1."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
from mlflow.exceptions import MlflowException

from fastformers.data.tasks import get_task
from fastformers.engines import ExportContext, get_engine, pad_to_bucket
from fastformers.engines.onnx.convert import export_onnx
from fastformers.engines.openvino_engine import CompiledBuckets, OpenVinoEngine
from fastformers.errors import FastformersError
from fastformers.models.pruning import attention_shape
from fastformers.run import pipeline
from fastformers.tracking.serving import EngineTaskModel, served_choice, served_requirements
from tests.helpers import mlflow_runs, saved_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import load_test

THREADS, ROUNDS, INPUTS, BUCKET = 8, 5, 64, 16


@pytest.fixture(scope="module")
def openvino_ir(tmp_path_factory, superglue_root) -> Path:
    """A tiny random BERT's fp32 OpenVINO IR, made by the engine's own `prepare`."""
    folder = tmp_path_factory.mktemp("ov")
    model, tokenizer = saved_tiny("bert", superglue_root, folder / "model")
    onnx = export_onnx(model, tokenizer, folder / "onnx" / "model.onnx", opset=17)
    heads, width = attention_shape(model)
    ctx = ExportContext(onnx, folder, heads, width, SimpleNamespace(name="fp32"), None, list)
    return OpenVinoEngine().prepare(ctx)["fp32"]


def one_bucket_inputs(count: int, vocab: int = 500) -> list[dict[str, np.ndarray]]:
    """`count` single rows of random tokens, 9 to 16 long: one 16-token bucket, so every call shares one shape."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(count):
        length = int(rng.integers(9, BUCKET + 1))
        rows.append(
            {
                "input_ids": rng.integers(5, vocab, size=(1, length), dtype=np.int64),
                "attention_mask": np.ones((1, length), dtype=np.int64),
            }
        )
    return rows


def test_openvino_answers_concurrent_calls_of_one_bucket_like_single_calls(openvino_ir):
    infer = OpenVinoEngine(max_compiled=4).open(openvino_ir, "fp32", threads=1, bucket=BUCKET)
    inputs = one_bucket_inputs(INPUTS)
    alone = [infer(x) for x in inputs]
    assert len({a.tobytes() for a in alone}) == INPUTS  # distinct answers: a swapped one cannot pass unseen
    with ThreadPoolExecutor(THREADS) as pool:
        for _ in range(ROUNDS):
            together = list(pool.map(infer, inputs))
            wrong = [i for i, (a, b) in enumerate(zip(alone, together)) if not np.allclose(a, b, atol=1e-5)]
            assert not wrong, f"{len(wrong)} of {INPUTS} concurrent calls got another input's logits"


def test_concurrent_calls_of_a_new_shape_compile_it_once(openvino_ir):
    compiled = CompiledBuckets(openvino_ir, "fp32", 1, {"max_compiled": 4}, static=True)
    core, calls = compiled.core, []

    def counted(*args):
        calls.append(args)
        return core.compile_model(*args)

    compiled.core = SimpleNamespace(compile_model=counted)
    inputs = [pad_to_bucket(x, BUCKET) for x in one_bucket_inputs(THREADS)]  # one shape: (1, 16)
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(compiled.infer, inputs))
    assert len(calls) == 1 and list(compiled.compiled) == [(1, BUCKET)]


def test_openvino_profile_still_reads_the_requests_counters(openvino_ir, tmp_path):
    batches = one_bucket_inputs(3)
    profile = OpenVinoEngine().profile(openvino_ir, "fp32", 1, {}, batches, tmp_path, bucket=BUCKET)
    assert profile["wall_ms"] > 0 and sum(profile["kernel_ms"].values()) > 0


def test_openvino_max_compiled_is_bounded_by_default_and_checked(make_cfg, openvino_ir):
    assert get_engine("openvino", make_cfg().engines).options["max_compiled"] == 32
    with pytest.raises(FastformersError, match=r"engines.openvino.max_compiled: 0 is not a positive whole number"):
        OpenVinoEngine(max_compiled=0).open(openvino_ir, "fp32", bucket=BUCKET)


def cb_model(max_records: int | None) -> EngineTaskModel:
    """A served CB model as far as `predict` reads it before tokenizing: the task and the limit."""
    model = EngineTaskModel()
    model.task, model.shape, model.max_records = get_task("cb"), "in the official jsonl shape", max_records
    return model


def test_a_request_over_max_records_is_refused_naming_the_limit():
    records = [{"premise": "p", "hypothesis": "h", "idx": i} for i in range(3)]
    with pytest.raises(
        MlflowException, match=r"3 records in one request; this model takes at most serve.max_records=2"
    ):
        cb_model(2).predict(None, records)


@pytest.mark.parametrize(
    "target, options",
    [("subprocess.Popen", {"args": ["touch", "{marker}"]}), ("os.system", {"command": "touch {marker}"})],
)
def test_a_stored_engine_target_that_is_no_engine_is_refused_before_it_is_called(tmp_path, target, options):
    marker = tmp_path / "ran"
    options = {
        k: [a.format(marker=marker) for a in v] if isinstance(v, list) else v.format(marker=marker)
        for k, v in options.items()
    }
    context = SimpleNamespace(
        model_config={
            "task": "cb",
            "max_seq_length": 64,
            "engine": "openvino",
            "engine_conf": {"_target_": target, **options},
            "precision": "fp32",
            "options": {},
            "bucket": None,
        },
        artifacts={"model": str(tmp_path / "model.xml"), "tokenizer": str(tmp_path)},
    )
    with pytest.raises(FastformersError) as refused:
        EngineTaskModel().load_context(context)
    assert str(refused.value) == f"engines.openvino._target_={target!r} is not a fastformers Engine"
    assert not marker.exists()  # nothing was instantiated or called


def test_serve_engine_forces_the_served_model_and_bad_settings_are_refused_up_front(make_cfg):
    cfg = make_cfg("precision=int8", "serve.engine=openvino", "serve.bucket=32")
    assert served_choice(cfg, None) == {"engine": "openvino", "precision": "int8", "bucket": 32, "options": {}}
    for overrides, message in [
        (["serve.engine=torch"], r"serve.engine='torch': serve one of \['onnxruntime', 'openvino'\]"),
        (["serve.engine=onnxruntime", "serve.precision=bf16"], r"serve.precision: engine onnxruntime runs"),
        (["serve.max_records=0"], r"serve.max_records=0 must be a positive integer"),
    ]:
        with pytest.raises(FastformersError, match=message):
            pipeline.validate(make_cfg("stages=[finetune,export]", *overrides))


def test_the_served_requirements_pin_the_runtime_and_never_name_fastformers():
    requirements = served_requirements(OpenVinoEngine())
    names = {r.split("==")[0] for r in requirements}
    assert {"transformers", "tokenizers", "torch", "numpy", "omegaconf", "openvino"} <= names
    assert "fastformers" not in names and all("==" in r and "+" not in r for r in requirements)


@pytest.mark.slow
def test_the_load_test_finds_every_served_answer_equal_to_the_offline_one(make_cfg, tmp_path):
    cfg = make_cfg(
        "stages=[finetune,export]",
        "precision=int8",
        "precision.min_agreement=0.5",
        "precision.calibration_examples=16",
        "serve.engine=openvino",
        f"serve.bucket={BUCKET}",
    )
    pipeline.run(cfg)
    _, (run,) = mlflow_runs(cfg)
    model_dir = Path(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model", dst_path=str(tmp_path)))
    requirements = (model_dir / "requirements.txt").read_text().split()
    assert not [r for r in requirements if r.split("==")[0] == "fastformers"]
    assert (model_dir / "code" / "fastformers" / "tracking" / "serving.py").is_file()  # the package travels with it

    uri = f"sqlite:///{cfg.paths.output_dir}/mlflow.db"
    records = load_test.official_records("cb", Path(cfg.data.root), "val")
    cold, warm = load_test.run(uri, run.info.run_id, records, clients=4, requests=24, passes=2)
    assert load_test.all_equal([cold, warm]) and cold.total == warm.total == 24, cold.summary() + warm.summary()
    assert cold.peak_memory_mb > 0 and warm.peak_memory_mb > 0
