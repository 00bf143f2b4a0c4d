"""The benchmark engine (core layouts, pinned spawned instances, ordered gathering, energy methods) and
the benchmark stage through the pipeline. Behaviour only: no assertion depends on how fast anything ran."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from fastformers import pipeline, tracking
from fastformers.data import EncodedDataset, load_examples
from fastformers.energy import EnergyMeter, choose_meter
from fastformers.errors import FastformersError
from fastformers.instances import Backend, Work, layouts_filling, physical_cores, plan_layout, serve, usable_cores
from fastformers.stages.benchmark import apply_gate, deal, make_batches, operator_times
from fastformers.stages.export import attention_shape, export_onnx, optimize
from fastformers.tasks import TASKS
from tests.test_export import saved_tiny

needs_two_cores = pytest.mark.skipif(len(usable_cores()) < 2, reason="needs two physical cores")
NO_ENERGY = EnergyMeter("none")


def test_layouts_give_each_instance_its_own_cores():
    assert plan_layout(2, 1, usable=[0, 1]).cores == ((0,), (1,))
    assert plan_layout(1, None, usable=[0, 1]).cores == ((0, 1),)  # threads default to cores / instances
    wide = plan_layout(4, 2, usable=list(range(8)))
    assert wide.label == "4x2" and [len(c) for c in wide.cores] == [2] * 4
    assert len({cpu for cores in wide.cores for cpu in cores}) == 8  # disjoint
    assert plan_layout(1, 1, cores=1, usable=[4, 5]).cores == ((4,),)
    assert layouts_filling(4) == [(1, 4), (2, 2), (4, 1)]


@pytest.mark.parametrize(
    "instances, threads, cores, message",
    [
        (4, 2, None, r"hardware.instances=4 x hardware.threads_per_instance=2 = 8 threads > 2 physical cores"),
        (3, None, None, r"hardware.instances=3 > 2 physical cores: each instance needs a core of its own"),
        (1, 0, None, r"hardware.instances=1 and hardware.threads_per_instance=0 must be at least 1"),
        (1, 1, 3, r"hardware.cores=3 but this process may run on 2 physical cores"),
    ],
)
def test_more_threads_than_cores_is_refused(instances, threads, cores, message):
    with pytest.raises(FastformersError, match=message):
        plan_layout(instances, threads, cores, usable=[0, 1])


def test_hyperthread_siblings_count_as_one_core(tmp_path):
    for cpu, siblings in {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3", 4: "4"}.items():
        (tmp_path / f"cpu{cpu}" / "topology").mkdir(parents=True)
        (tmp_path / f"cpu{cpu}" / "topology" / "thread_siblings_list").write_text(siblings + "\n")
    assert physical_cores([0, 1, 2, 3, 4], sys_cpu=tmp_path) == [0, 1, 4]
    assert physical_cores([2, 3], sys_cpu=tmp_path) == [2, 3]  # a sibling outside the mask does not count


@pytest.fixture(scope="module")
def graph_and_data(tmp_path_factory, superglue_root):
    """A tiny BERT's fused graph and the CB val examples, tokenized."""
    folder = tmp_path_factory.mktemp("engine")
    model, tokenizer = saved_tiny("bert", superglue_root, folder / "model")
    fused, _ = optimize(export_onnx(model, tokenizer, folder / "model.onnx", 17), *attention_shape(model))
    examples = load_examples(TASKS["cb"], superglue_root, "val")
    return fused, tokenizer, EncodedDataset(examples, tokenizer, 64)


def shares(dataset, tokenizer, instances, batch_size, sort_by_length=False, fixed_length=None):
    batches = make_batches(dataset, range(len(dataset)), batch_size, tokenizer, fixed_length, sort_by_length)
    singles = make_batches(dataset, range(2 * instances), 1, tokenizer, fixed_length, False)
    return [Work(share, latency_share, warmup=1, repeats=2)
            for share, latency_share in zip(deal(batches, instances), deal(singles, instances))]


@needs_two_cores
def test_two_pinned_instances_return_what_one_returns_in_the_same_order(graph_and_data):
    graph, tokenizer, dataset = graph_and_data
    backend = Backend("onnx", str(graph))
    one = serve(backend, plan_layout(1, 1), shares(dataset, tokenizer, 1, batch_size=4), NO_ENERGY)
    two_layout = plan_layout(2, 1)
    two = serve(backend, two_layout, shares(dataset, tokenizer, 2, batch_size=3, sort_by_length=True), NO_ENERGY)

    assert sorted(one.rows) == sorted(two.rows) == list(range(len(dataset)))
    for index in range(len(dataset)):
        np.testing.assert_allclose(one.rows[index], two.rows[index], atol=1e-5)
    assert [r.cpus for r in two.results] == [list(c) for c in two_layout.cores]  # each pinned to its own core
    assert not set(two.results[0].cpus) & set(two.results[1].cpus)
    assert [len(r.passes) for r in two.results] == [2, 2] and len(two.pass_seconds) == 2
    assert len(two.latencies) == 4  # two batch-size-1 calls per instance
    assert two.peak_rss_mb > one.peak_rss_mb > 0  # every instance holds its own copy of the model


def test_fixed_padding_changes_the_shapes_not_the_outputs(graph_and_data):
    graph, tokenizer, dataset = graph_and_data
    backend, layout = Backend("onnx", str(graph)), plan_layout(1, 1)
    fixed_work = shares(dataset, tokenizer, 1, batch_size=4, fixed_length=64)
    assert {b.inputs["input_ids"].shape[1] for b in fixed_work[0].batches} == {64}
    dynamic_work = shares(dataset, tokenizer, 1, batch_size=4)
    assert max(b.inputs["input_ids"].shape[1] for b in dynamic_work[0].batches) < 64
    fixed, dynamic = serve(backend, layout, fixed_work, NO_ENERGY), serve(backend, layout, dynamic_work, NO_ENERGY)
    for index in range(len(dataset)):
        np.testing.assert_allclose(fixed.rows[index], dynamic.rows[index], atol=1e-5)


def test_an_instance_that_fails_fails_the_benchmark_with_its_error(graph_and_data, tmp_path):
    _, tokenizer, dataset = graph_and_data
    with pytest.raises(FastformersError, match=r"^benchmark instance 0: missing ONNX graph .*nothing.onnx$"):
        serve(Backend("onnx", str(tmp_path / "nothing.onnx")), plan_layout(1, 1),
              shares(dataset, tokenizer, 1, batch_size=4), NO_ENERGY)


def fake_rapl(root, energy_uj: int, max_uj: int = 10**9):
    zone = root / "intel-rapl:0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")
    (root / "intel-rapl:0:0").mkdir(exist_ok=True)  # a subzone: already inside the package's count
    return zone


@pytest.mark.skipif(choose_meter(None).method == "codecarbon", reason="codecarbon is installed and preferred")
def test_energy_comes_from_rapl_when_readable_else_a_labelled_tdp_estimate(tmp_path):
    zone = fake_rapl(tmp_path / "powercap", energy_uj=5_000_000)
    meter = choose_meter(tdp_watts=100, root=tmp_path / "powercap")
    assert meter.method == "rapl" and not meter.estimated and meter.zones == (str(zone),)
    reading = meter.start()
    (zone / "energy_uj").write_text("7500000\n")
    assert meter.stop(reading, seconds=1.0) == pytest.approx(2.5)
    reading = meter.start()
    (zone / "energy_uj").write_text("500000\n")  # the counter wrapped at max_energy_range_uj
    assert meter.stop(reading, seconds=1.0) == pytest.approx((10**9 - 7_500_000 + 500_000) / 1e6)

    estimate = choose_meter(tdp_watts=100, share=0.5, root=tmp_path / "absent")
    assert estimate.method == "tdp_estimate" and estimate.estimated
    assert estimate.stop(estimate.start(), seconds=2.0) == pytest.approx(100.0)
    nothing = choose_meter(tdp_watts=None, root=tmp_path / "absent")
    assert nothing.method == "none" and nothing.stop(nothing.start(), seconds=2.0) is None


def mlflow_runs(cfg):
    client = MlflowClient(tracking.tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment_name)
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


@needs_two_cores
def test_benchmark_stage_measures_every_setting_with_its_accuracy(make_cfg):
    cfg = make_cfg("stages=[finetune,export,benchmark]", "precision=int8", "finetune.learning_rate=5e-3",
                   "benchmark.layouts=auto", "benchmark.repeats=2", "benchmark.latency_examples=4",
                   "benchmark.warmup_batches=1", "hardware.tdp_watts=50", "hardware.usd_per_hour=0.5")
    results = pipeline.run(cfg)

    rows = ["baseline", "dynamic_length", "onnx_fp32", "onnx_int8", f"onnx_int8_{len(usable_cores())}x1"]
    for row in rows:
        m = {k.split("/", 2)[2]: v for k, v in results.items() if k.startswith(f"benchmark/{row}/")}
        assert m["examples"] == 18 and m["throughput"] == pytest.approx(18 / m["wall_seconds"])
        assert m["wall_seconds_min"] <= m["wall_seconds"] <= m["wall_seconds_max"]
        assert m["latency_p50_ms"] <= m["latency_p90_ms"] <= m["latency_p99_ms"]
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["f1"] <= 1 and m["energy_estimated"] == 1.0
        assert m["energy_joules"] > 0 and m["usd_per_100m_queries"] > 0 and m["peak_rss_mb"] > 0
    assert results["benchmark/baseline/speedup"] == 1.0 and results["benchmark/baseline/fixed_padding"] == 1.0
    assert results["benchmark/dynamic_length/agreement_with_baseline"] == 1.0
    assert results["benchmark/onnx_fp32/accuracy"] == results["benchmark/baseline/accuracy"]
    assert results[f"benchmark/{rows[-1]}/instances"] == len(usable_cores())
    assert "benchmark/best_layout/speedup" in results

    client, (run,) = mlflow_runs(cfg)
    assert run.data.tags["benchmark.energy_method"] == "tdp_estimate"
    assert run.data.tags["benchmark.best_layout"] in ("onnx_int8", rows[-1])
    folder = run.data.tags["cache.benchmark.path"]
    report = json.loads(open(f"{folder}/benchmark.json").read())
    assert [r["name"] for r in report["rows"]] == rows
    by_name = {r["name"]: r for r in report["rows"]}
    assert by_name["onnx_int8"]["predictions"] == by_name[rows[-1]]["predictions"]  # layouts agree, in order
    table = open(f"{folder}/table.txt").read()
    assert all(row in table for row in rows) and "ESTIMATE" in table and "<- best layout" in table
    assert "benchmark/table.txt" in {a.path for a in client.list_artifacts(run.info.run_id, "benchmark")}


def test_benchmark_is_measured_afresh_in_every_run(make_cfg):
    only_onnx = ["stages=[finetune,export,benchmark]", "finetune.epochs=1", "benchmark.repeats=1",
                 "benchmark.latency_examples=0", "benchmark.settings=[{name: onnx, backend: onnx_fp32, padding: dynamic}]"]
    first = pipeline.run(make_cfg(*only_onnx))
    pipeline.run(make_cfg(*only_onnx))
    _, runs = mlflow_runs(make_cfg())
    tags = [(r.data.tags["cache.export"], r.data.tags["cache.benchmark"]) for r in runs]
    assert tags == [("miss", "miss"), ("hit", "miss")]
    assert runs[0].data.tags["cache.benchmark.path"] != runs[1].data.tags["cache.benchmark.path"]
    assert "benchmark/onnx/latency_p50_ms" not in first and "benchmark/onnx/energy_joules" not in first


def test_a_setting_can_time_the_teacher_beside_the_distilled_student(make_cfg):
    settings = ("benchmark.settings=[{name: teacher, backend: torch, padding: fixed, model: teacher},"
                "{name: student, backend: torch, padding: dynamic}]")
    results = pipeline.run(make_cfg("stages=[finetune,evaluate,distill,benchmark]", "student=tiny_random",
                                    "distill.epochs=1", "benchmark.repeats=1", "benchmark.latency_examples=0", settings))
    assert results["benchmark/teacher/score"] == results["evaluate/val/score"]  # evaluate ran on the teacher
    assert results["benchmark/student/score"] == pytest.approx(results["distill/best_val_score"])
    assert results["benchmark/teacher/speedup"] == 1.0 and results["benchmark/student/speedup"] > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["benchmark.settings=[{name: t, backend: onnx_fp32, padding: dynamic, model: teacher}]"],
         r"benchmark.settings\[0\]: model=teacher runs in PyTorch only"),
        (["hardware.instances=64", "hardware.threads_per_instance=2"], r"hardware.instances=64 x "
                                                                       r"hardware.threads_per_instance=2 = 128 threads"),
        (["benchmark.layouts=[2by1]"], "benchmark.layouts: '2by1' is not <instances>x<threads>"),
        (["benchmark.settings=[{name: q, backend: onnx_int8, padding: dynamic}]"],
         r"benchmark.settings\[0\].backend=onnx_int8: .* run with precision=int8"),
        (["benchmark.settings=[{name: t, backend: torch, padding: sometimes}]"],
         r"benchmark.settings\[0\].padding='sometimes' must be one of"),
        (["benchmark.repeats=0"], "benchmark.repeats=0 must be a positive integer"),
        (["hardware.usd_per_hour=-1"], "hardware.usd_per_hour=-1"),
        (["benchmark.settings=[{name: o, backend: onnx_fp32, padding: dynamic, session: {spin_fast: 1}}]"],
         r"benchmark.settings\[0\].session option 'spin_fast': not an onnxruntime SessionOptions attribute"),
        (["benchmark.settings=[{name: t, backend: torch, padding: dynamic, session: {enable_cpu_mem_arena: false}}]"],
         r"benchmark.settings\[0\].session: onnxruntime session options need an ONNX backend"),
        (["benchmark.settings=[{name: o, backend: onnx_fp32, padding: dynamic, gated: true}]"],
         r"benchmark.gate.reference='onnx_fp32' is not a setting name \(have \['o'\]\)"),
        (["benchmark.reference=stock"], r"benchmark.reference='stock' is not a setting name"),
        (["precision=int8", "benchmark.settings=[{name: s, backend: onnx_int8_static, padding: dynamic}]"],
         r"backend=onnx_int8_static: .* only with precision.static=true"),
    ],
)
def test_bad_benchmark_configs_fail_before_any_work(make_cfg, overrides, message):
    cfg = make_cfg("stages=[finetune,export,benchmark]", *overrides)
    with pytest.raises(FastformersError, match=message):
        pipeline.run(cfg)
    assert not os.path.exists(cfg.paths.cache_dir)


def test_operator_times_sum_kernel_events_per_operator_type():
    events = [{"cat": "Session", "name": "model_run", "dur": 900},
              {"cat": "Node", "name": "Attention_0_kernel_time", "dur": 300, "args": {"op_name": "QAttention"}},
              {"cat": "Node", "name": "Attention_0_fence_before", "dur": 5, "args": {"op_name": "QAttention"}},
              {"cat": "Node", "name": "Attention_1_kernel_time", "dur": 200, "args": {"op_name": "QAttention"}},
              {"cat": "Node", "name": "LayerNorm_0_kernel_time", "dur": 700, "args": {"op_name": "SkipLayerNormalization"}}]
    assert operator_times(events) == {"SkipLayerNormalization": 0.7, "QAttention": 0.5}


def gate_rows(scores: dict[str, float], gated: set[str]) -> list[dict]:
    return [{"name": name, "gated": name in gated, "metrics": {"score": score}} for name, score in scores.items()]


def test_a_gated_lever_may_lose_at_most_max_drop_points_against_its_reference():
    rows = gate_rows({"onnx_fp32": 0.700, "lever_ok": 0.697, "lever_bad": 0.688, "stock": 0.600},
                     gated={"lever_ok", "lever_bad"})
    failed = apply_gate(rows, OmegaConf.create({"reference": "onnx_fp32", "max_drop": 0.5}))
    assert failed == ["lever_bad scores 1.20 points below onnx_fp32"]
    assert [r["metrics"].get("gate_passed") for r in rows] == [None, 1.0, 0.0, None]  # ungated rows are not held


GATED = ("benchmark.settings=[{name: onnx_fp32, backend: onnx_fp32, padding: dynamic},"
         "{name: lever, backend: onnx_fp32, padding: dynamic, gated: true,"
         " session: {session.intra_op.allow_spinning: '0', enable_cpu_mem_arena: false}}]")


def test_a_lever_that_fails_its_gate_fails_the_run_loudly_after_writing_its_table(make_cfg):
    # max_drop=-1: the lever must score a point above its reference, which an identical graph cannot
    cfg = make_cfg("stages=[finetune,export,benchmark]", "finetune.epochs=1", "benchmark.repeats=1",
                   "benchmark.latency_examples=0", GATED, "benchmark.gate.max_drop=-1")
    with pytest.raises(FastformersError, match=r"benchmark gate: lever scores -?0.00 points below onnx_fp32 "
                                               r"\(benchmark.gate.max_drop=-1 points; the table is logged"):
        pipeline.run(cfg)
    client, (run,) = mlflow_runs(cfg)
    assert run.info.status == "FAILED" and run.data.tags["cache.export"] == "miss"  # export's entry is kept
    table = client.download_artifacts(run.info.run_id, "benchmark/table.txt")
    table = open(table).read()
    rows = {line.split()[0]: line for line in table.splitlines() if line.startswith(("lever", "onnx_fp32"))}
    assert rows["lever"].endswith("GATE FAILED") and "GATE FAILED" not in rows["onnx_fp32"]


def test_session_options_and_the_profiler_reach_each_onnx_setting(make_cfg):
    results = pipeline.run(make_cfg("stages=[finetune,export,benchmark]", "finetune.epochs=1", "benchmark.repeats=1",
                                    "benchmark.latency_examples=0", GATED, "benchmark.gate.on_fail=mark",
                                    "benchmark.profile_examples=6", "benchmark.reference=onnx_fp32"))
    assert results["benchmark/lever/gate_passed"] == 1.0  # same graph, other session options: same predictions
    assert results["benchmark/lever/agreement_with_baseline"] == 1.0
    assert results["benchmark/onnx_fp32/vs_reference"] == 1.0 and results["benchmark/lever/vs_reference"] > 0
    _, (run,) = mlflow_runs(make_cfg())
    report = json.loads(open(f"{run.data.tags['cache.benchmark.path']}/benchmark.json").read())
    lever = report["rows"][1]
    assert lever["session"] == {"enable_cpu_mem_arena": False, "session.intra_op.allow_spinning": "0"}
    assert lever["profile"]["examples"] == 6 and "Attention" in lever["profile"]["kernel_ms"]
    assert 0 <= lever["profile"]["outside_kernels_pct"] < 100
    assert not list(Path(run.data.tags["cache.benchmark.path"]).glob("ort*"))  # the traces: summarized, removed
