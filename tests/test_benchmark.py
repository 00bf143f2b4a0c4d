"""The benchmark's machinery (core layouts, pinned spawned instances, ordered gathering, interleaving, energy
methods, the pick) and the benchmark stage through the pipeline. Behaviour only: no assertion depends on how
fast anything ran."""

import dataclasses
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from fastformers.bench.analysis import apply_gate, apply_memory_budget, eligible, pick
from fastformers.bench.energy import EnergyMeter, choose_meter
from fastformers.bench.gate import Labelled
from fastformers.bench.instances import (
    Backend,
    Instances,
    Work,
    layouts_filling,
    physical_cores,
    plan_layout,
    pss_mb,
    serve,
    usable_cores,
)
from fastformers.bench.timing import measure_interleaved, round_order
from fastformers.bench.workload import deal, make_batches, texts_of
from fastformers.data.loading import EncodedDataset, load_examples
from fastformers.data.tasks import TASKS
from fastformers.engines.onnx.convert import export_onnx
from fastformers.engines.onnx.optimize import optimize
from fastformers.engines.onnxruntime_engine import operator_times
from fastformers.engines.target import Target
from fastformers.errors import FastformersError
from fastformers.models.pruning import encoder_layers
from fastformers.run import pipeline
from tests.helpers import mlflow_runs, saved_tiny

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
    attention = encoder_layers(model)[0].attention.self
    fused, _ = optimize(
        export_onnx(model, tokenizer, folder / "model.onnx", 17), attention.num_attention_heads, attention.all_head_size
    )
    examples = load_examples(TASKS["cb"], superglue_root, "val")
    return fused, tokenizer, EncodedDataset(examples, tokenizer, 64)


ORT = (("_target_", "fastformers.engines.onnxruntime_engine.OnnxRuntimeEngine"),)


def ort_backend(path) -> Backend:
    return Backend(Target("onnxruntime"), ORT, str(path))


def shares(dataset, tokenizer, instances, batch_size, sort_by_length=False, fixed_length=None, bucket=None):
    batches = make_batches(dataset, range(len(dataset)), batch_size, tokenizer, fixed_length, sort_by_length, bucket)
    singles = make_batches(dataset, range(2 * instances), 1, tokenizer, fixed_length, False, bucket)
    return [
        Work(share, latency_share, warmup=1, repeats=2)
        for share, latency_share in zip(deal(batches, instances), deal(singles, instances))
    ]


@needs_two_cores
def test_two_pinned_instances_return_what_one_returns_in_the_same_order(graph_and_data):
    graph, tokenizer, dataset = graph_and_data
    backend = ort_backend(graph)
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
    assert 0 < one.peak_pss_mb <= one.peak_rss_mb  # a share of the pages it shares with the parent
    assert two.peak_pss_mb < two.peak_rss_mb  # pages the two share count once, not twice


@pytest.mark.parametrize("fixed_length", [64, None])
def test_the_end_to_end_pass_is_tokenized_in_the_instances_and_predicts_as_the_model_pass(
    graph_and_data, monkeypatch, fixed_length
):
    graph, tokenizer, dataset = graph_and_data
    from transformers import PreTrainedTokenizerBase

    def parent_tokenizes(*args, **kwargs):
        raise AssertionError("the parent tokenized during the passes")

    work = shares(dataset, tokenizer, 1, batch_size=4, sort_by_length=True, fixed_length=fixed_length)
    folder = str(graph.parent / "model")  # saved_tiny's folder: the tokenizer travels as a folder, not an object
    texts = [texts_of(w.batches, dataset, tokenizer, folder, 64, fixed_length is not None) for w in work]
    work = [dataclasses.replace(w, texts=t) for w, t in zip(work, texts)]
    assert all(isinstance(text, str) for rows in work[0].texts.batches for row in rows for text in row if text)
    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", parent_tokenizes)  # only the parent's copy
    served = serve(ort_backend(graph), plan_layout(1, 1), work, NO_ENERGY)

    assert len(served.e2e_seconds) == 1 and served.e2e_seconds[0] > 0
    assert sorted(served.e2e_rows) == list(range(len(dataset)))
    for index in range(len(dataset)):  # the instance's own tokenizing gives the batches the stage made
        np.testing.assert_allclose(served.e2e_rows[index], served.rows[index], atol=1e-5)
    # tokenizing adds work: the end-to-end pass is not faster than the fastest model-only pass, beyond noise
    assert served.e2e_seconds[0] > 0.5 * min(served.pass_seconds)


def test_instances_without_texts_time_no_end_to_end_pass(graph_and_data):
    graph, tokenizer, dataset = graph_and_data
    served = serve(ort_backend(graph), plan_layout(1, 1), shares(dataset, tokenizer, 1, batch_size=4), NO_ENERGY)
    assert served.e2e_seconds == [] and served.e2e_rows == {} and len(served.pass_seconds) == 2


def test_pss_is_read_for_a_live_process_and_none_for_a_gone_one():
    assert pss_mb(os.getpid()) > 0
    assert pss_mb(2**22 + 7) is None  # above the kernel's default pid_max


def test_fixed_padding_changes_the_shapes_not_the_outputs(graph_and_data):
    graph, tokenizer, dataset = graph_and_data
    backend, layout = ort_backend(graph), plan_layout(1, 1)
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
        serve(
            ort_backend(tmp_path / "nothing.onnx"),
            plan_layout(1, 1),
            shares(dataset, tokenizer, 1, batch_size=4),
            NO_ENERGY,
        )


def test_round_orders_let_every_row_lead_in_turn_and_vary_its_neighbours():
    orders = [round_order(6, r, seed=5) for r in range(12)]
    assert all(sorted(order) == list(range(6)) for order in orders)
    assert sorted(order[0] for order in orders[:6]) == list(range(6))  # each leads once in the first 6 rounds
    for row in range(6):
        before = {order[order.index(row) - 1] for order in orders if order.index(row) > 0}
        assert len(before) > 1  # no row always follows the same neighbour
    assert orders == [round_order(6, r, seed=5) for r in range(12)]  # seeded: the same run replays
    assert orders != [round_order(6, r, seed=6) for r in range(12)]


def test_interleaved_rounds_shuffle_the_order_and_keep_each_settings_outputs(graph_and_data):
    graph, tokenizer, dataset = graph_and_data
    orders = []
    layout = plan_layout(1, 1)
    starters = [
        lambda: Instances(ort_backend(graph), layout, shares(dataset, tokenizer, 1, batch_size=4), NO_ENERGY),
        lambda: Instances(
            ort_backend(graph), layout, shares(dataset, tokenizer, 1, batch_size=4, bucket=16), NO_ENERGY
        ),
    ]
    dynamic, bucketed = measure_interleaved(starters, repeats=3, on_order=orders.append)
    assert orders == [round_order(2, r) for r in range(3)] and {order[0] for order in orders} == {0, 1}
    assert len(dynamic.pass_seconds) == len(bucketed.pass_seconds) == 3
    assert len(dynamic.latencies) == len(bucketed.latencies) == 2 * 3  # the latency calls of every round
    for index in range(len(dataset)):  # bucket padding is masked: same logits
        np.testing.assert_allclose(dynamic.rows[index], bucketed.rows[index], atol=1e-5)
    # passes of the two settings never overlap: each ran alone on the machine
    spans = sorted(p for served in (dynamic, bucketed) for p in served.results[0].passes)
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(spans))


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


@pytest.mark.slow
@needs_two_cores
def test_benchmark_stage_measures_every_setting_with_its_accuracy(make_cfg):
    cfg = make_cfg(
        "stages=[finetune,export,benchmark]",
        "precision=int8",
        "finetune.learning_rate=5e-3",
        "benchmark.layouts=auto",
        "benchmark.repeats=2",
        "benchmark.latency_examples=4",
        "benchmark.warmup_batches=1",
        "hardware.tdp_watts=50",
        "hardware.usd_per_hour=0.5",
    )
    results = pipeline.run(cfg)

    rows = ["baseline", "dynamic_length", "onnx_fp32", "onnx_int8", f"onnx_int8_{len(usable_cores())}x1"]
    for row in rows:
        m = {k.split("/", 2)[2]: v for k, v in results.items() if k.startswith(f"benchmark/{row}/")}
        assert m["examples"] == 18 and m["throughput"] == pytest.approx(18 / m["wall_seconds"])
        assert m["wall_seconds_min"] <= m["wall_seconds"] <= m["wall_seconds_max"]
        assert m["latency_p50_ms"] <= m["latency_p90_ms"] <= m["latency_p99_ms"]
        assert m["energy_estimated"] == 1.0
        assert m["energy_joules"] > 0 and m["usd_per_100m_queries"] > 0 and m["peak_pss_mb"] > 0
        # measured in the instances, tokenizing included: never well above the model-only rate
        assert 0 < m["e2e_throughput"] < 2 * m["throughput_hi"] and m["e2e_agreement"] == 1.0
        assert m["e2e_throughput_lo"] <= m["e2e_throughput"] <= m["e2e_throughput_hi"]
    assert results["benchmark/baseline/speedup"] == 1.0 and results["benchmark/baseline/fixed_padding"] == 1.0
    assert results["benchmark/dynamic_length/agreement_with_baseline"] == 1.0
    assert results["benchmark/onnx_fp32/accuracy"] == results["benchmark/baseline/accuracy"]
    assert results[f"benchmark/{rows[-1]}/instances"] == len(usable_cores())
    assert "benchmark/pick/throughput" in results  # without a search: the last setting's best layout

    client, (run,) = mlflow_runs(cfg)
    assert run.data.tags["benchmark.energy_method"] == "tdp_estimate"
    assert run.data.tags["benchmark.pick"] in ("onnx_int8", rows[-1])
    assert run.data.tags["pick.engine"] == "onnxruntime" and run.data.tags["pick.precision"] == "int8"
    folder = run.data.tags["cache.benchmark.path"]
    report = json.loads(open(f"{folder}/benchmark.json").read())
    assert [r["name"] for r in report["rows"]] == rows
    assert report["interleaving"] == [[rows[i] for i in round_order(len(rows), r)] for r in range(2)]
    by_name = {r["name"]: r for r in report["rows"]}
    assert by_name["onnx_int8"]["predictions"] == by_name[rows[-1]]["predictions"]  # layouts agree, in order
    golds = [e.label for e in load_examples(TASKS["cb"], cfg.data.root, "val")]
    for row in rows:  # each row's accuracy is that of the predictions it wrote
        right = sum(p == g for p, g in zip(by_name[row]["predictions"], golds, strict=True))
        assert results[f"benchmark/{row}/accuracy"] == pytest.approx(right / len(golds)), row
    table = open(f"{folder}/table.txt").read()
    assert all(row in table for row in rows) and "ESTIMATE" in table and "<- PICK" in table
    assert "benchmark/table.txt" in {a.path for a in client.list_artifacts(run.info.run_id, "benchmark")}


@pytest.mark.slow
def test_the_search_times_every_engine_and_picks_a_gated_candidate_served_and_evaluated(make_cfg, monkeypatch):
    from fastformers.engines import openvino_engine, variants

    monkeypatch.setattr(openvino_engine, "cpu_capabilities", lambda ov: ["FP32", "INT8"])  # a CPU without bf16
    monkeypatch.setattr(variants, "cpu_flags", lambda: frozenset({"avx2"}))  # nor VNNI: the int8 variants it needs
    cfg = make_cfg(
        "stages=[finetune,export,benchmark,evaluate]",
        "precision=int8",
        "finetune.epochs=1",
        "evaluate.engine=pick",
        "benchmark.repeats=2",
        "benchmark.latency_examples=2",
        "benchmark.roofline_seconds=0",
        "benchmark.reference=onnx_int8_stock",
        "benchmark.gate.on_fail=mark",
        "precision.calibration_examples=16",
        "benchmark.settings=[${benchmark.baseline},"
        "{name: onnx_fp32, engine: onnxruntime, precision: fp32, padding: dynamic},"
        "{name: onnx_int8_stock, engine: onnxruntime, precision: int8_stock, padding: dynamic}]",
        "benchmark.search={engines: {onnxruntime: [int8], openvino: [int8, bf16]}, buckets: [null, 16],"
        " layouts: [1x1]}",
    )
    results = pipeline.run(cfg)
    _, (run,) = mlflow_runs(cfg)
    report = json.loads(open(f"{run.data.tags['cache.benchmark.path']}/benchmark.json").read())
    rows = {row["name"]: row for row in report["rows"]}
    assert set(rows) >= {
        "onnxruntime_int8_1x1",
        "openvino_int8_1x1",
        "openvino_int8_b16_1x1",
        "openvino_bf16_1x1",
        "openvino_bf16_b16_1x1",
        "onnx_int8_stock_1x1",
        "onnxruntime_int8_rr_1x1",
        "onnxruntime_int8_u8u8_1x1",
        "openvino_int8_of_1x1",
        "openvino_int8_ac_1x1",  # accuracy-controlled: built by the export on this (no-VNNI) CPU, and tried
    }
    assert "onnxruntime_int8_stock_1x1" not in rows  # the stock reference row is that candidate: timed once
    assert rows["onnx_int8_stock_1x1"]["candidate"] and rows["onnx_int8_stock_1x1"]["stock"]
    assert "gate_passed" in rows["onnx_int8_stock_1x1"]["metrics"]  # held to the same gate as the variants
    assert "onnxruntime_int8_b16_1x1" not in rows  # onnxruntime has dynamic shapes: no bucket rows
    assert rows["openvino_bf16_1x1"]["skipped"].startswith("this CPU offers no bf16 arithmetic")
    assert rows["openvino_bf16_1x1"]["metrics"] == {} and "benchmark/openvino_bf16_1x1/throughput" not in results
    assert rows["openvino_int8_b16_1x1"]["metrics"]["throughput"] > 0  # OpenVINO ran, static shapes per bucket
    assert report["reference"] in ("onnx_int8_stock", "onnx_int8_stock_1x1")
    chosen = rows[report["pick"]]
    assert chosen["candidate"] and chosen["metrics"]["within_memory"] == 1.0
    assert chosen["metrics"].get("gate_passed", 1.0) == 1.0  # gated and passed, or the gate's own fp32 reference
    assert rows["onnx_fp32"]["candidate"]  # the float reference keeps its score by definition: always a candidate
    passing = [row for row in rows.values() if row["name"] in {r["name"] for r in eligible(report["rows"])}]
    fastest = max(passing, key=lambda row: row["metrics"]["throughput"])
    if chosen is not fastest:  # only a stock row the fastest is not measurably faster than
        assert chosen["stock"] and fastest["metrics"]["throughput_lo"] <= chosen["metrics"]["throughput_hi"]
        assert "is not measurably faster than it" in report["pick_note"]
    assert run.data.tags["pick.engine"] == chosen["engine"] and run.data.tags["served.engine"] in (
        "onnxruntime",
        "openvino",
    )
    evaluated = json.loads(open(f"{run.data.tags['cache.evaluate.path']}/evaluated.json").read())
    assert (evaluated["engine"], evaluated["precision"]) == (chosen["engine"], chosen["precision"])
    assert results["evaluate/val/score"] == pytest.approx(chosen["metrics"]["score"])  # the same 18 examples
    table = open(f"{run.data.tags['cache.benchmark.path']}/table.txt").read()
    assert "skipped: this CPU offers no bf16" in table and "<- PICK" in table and "<- reference" in table


def rows_for_pick(**rows: tuple[float, float, float | None, bool]) -> list[dict]:
    """name -> (throughput, peak MB, gate_passed or None for ungated, candidate)."""
    made = []
    for name, (throughput, peak, passed, candidate) in rows.items():
        metrics = {"throughput": throughput, "peak_pss_mb": peak}
        if passed is not None:
            metrics["gate_passed"] = passed
        made.append({"name": name, "candidate": candidate, "skipped": None, "metrics": metrics})
    return made


def test_the_pick_never_takes_a_gated_out_row_nor_one_over_the_memory_budget():
    rows = rows_for_pick(
        fast_but_wrong=(900, 100, 0.0, True),
        fast_but_big=(800, 5000, 1.0, True),
        not_a_candidate=(700, 100, None, False),
        good=(500, 150, 1.0, True),
        slow=(100, 90, 1.0, True),
    )
    apply_memory_budget(rows, 1000)
    assert [row["metrics"]["within_memory"] for row in rows] == [1.0, 0.0, 1.0, 1.0, 1.0]
    assert pick(rows).row["name"] == "good"
    assert pick(rows_for_pick(wrong=(900, 100, 0.0, True))).row is None


def speed_rows(**rows: tuple[float, float, bool, float]) -> list[dict]:
    """name -> (slowest pass ex/s, fastest pass ex/s, stock, gate_passed): gated candidates within memory."""
    made = []
    for name, (lo, hi, stock, passed) in rows.items():
        metrics = {"throughput": (lo + hi) / 2, "throughput_lo": lo, "throughput_hi": hi, "gate_passed": passed}
        row = {"name": name, "engine": "onnxruntime", "precision": "int8_stock" if stock else "int8", "stock": stock}
        made.append(row | {"candidate": True, "skipped": None, "metrics": metrics})
    return made


def test_the_pick_is_the_stock_row_unless_a_faster_one_is_measurably_faster():
    overlapping = pick(speed_rows(stock=(100, 120, True, 1.0), ours=(110, 140, False, 1.0)))
    assert overlapping.row["name"] == "stock" and overlapping.fastest["name"] == "ours"
    assert "ours (110.00-140.00 ex/s), is not measurably faster than it (100.00-120.00 ex/s)" in overlapping.note
    clear = pick(speed_rows(stock=(100, 120, True, 1.0), ours=(130, 140, False, 1.0)))
    assert clear.row["name"] == "ours" and clear.note is None
    itself = pick(speed_rows(stock=(150, 160, True, 1.0), ours=(100, 140, False, 1.0)))
    assert itself.row["name"] == "stock" and "itself the fastest that passed" in itself.note
    assert "onnxruntime's stock int8 recipe, int8_stock" in itself.note  # the recipe is named, not just the row
    failed_stock = pick(speed_rows(stock=(100, 200, True, 0.0), ours=(110, 140, False, 1.0)))
    assert failed_stock.row["name"] == "ours"  # only a stock row that passes the same gate holds the pick back


@pytest.mark.slow
def test_benchmark_is_measured_afresh_in_every_run(make_cfg):
    only_onnx = [
        "stages=[finetune,export,benchmark]",
        "finetune.epochs=1",
        "benchmark.repeats=1",
        "benchmark.latency_examples=0",
        "benchmark.settings=[{name: onnx, engine: onnxruntime, precision: fp32, padding: dynamic}]",
    ]
    first = pipeline.run(make_cfg(*only_onnx))
    pipeline.run(make_cfg(*only_onnx))
    _, runs = mlflow_runs(make_cfg())
    tags = [(r.data.tags["cache.export"], r.data.tags["cache.benchmark"]) for r in runs]
    assert tags == [("miss", "miss"), ("hit", "miss")]
    assert runs[0].data.tags["cache.benchmark.path"] != runs[1].data.tags["cache.benchmark.path"]
    assert "benchmark/onnx/latency_p50_ms" not in first and "benchmark/onnx/energy_joules" not in first


@pytest.mark.slow
def test_a_setting_can_time_the_teacher_beside_the_distilled_student(make_cfg):
    settings = (
        "benchmark.settings=[{name: teacher, engine: torch, padding: fixed, model: teacher},"
        "{name: student, engine: torch, padding: dynamic}]"
    )
    results = pipeline.run(
        make_cfg(
            "stages=[finetune,evaluate,distill,benchmark]",
            "student=tiny_random",
            "distill.epochs=1",
            "benchmark.repeats=1",
            "benchmark.latency_examples=0",
            settings,
        )
    )
    assert results["benchmark/teacher/score"] == results["evaluate/val/score"]  # evaluate ran on the teacher
    assert results["benchmark/student/score"] == pytest.approx(results["distill/best_val_score"])
    assert results["benchmark/teacher/speedup"] == 1.0 and results["benchmark/student/speedup"] > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["benchmark.settings=[{name: t, engine: onnxruntime, padding: dynamic, model: teacher}]"],
            r"benchmark.settings\[0\]: model=teacher runs on engine torch only",
        ),
        (
            ["hardware.instances=64", "hardware.threads_per_instance=2"],
            r"hardware.instances=64 x "
            r"hardware.threads_per_instance=2 = 128 threads",
        ),
        (["benchmark.layouts=[2by1]"], "benchmark.layouts: '2by1' is not <instances>x<threads>"),
        (
            ["benchmark.settings=[{name: q, engine: onnxruntime, precision: int8, padding: dynamic}]"],
            r"benchmark.settings\[0\].precision=int8: .* run with precision=int8",
        ),
        (
            ["benchmark.settings=[{name: t, engine: torch, padding: sometimes}]"],
            r"benchmark.settings\[0\].padding='sometimes' must be one of",
        ),
        (
            ["benchmark.settings=[{name: t, engine: tensorflow, padding: dynamic}]"],
            r"engine 'tensorflow' is not configured; choose from \['onnxruntime', 'openvino', 'torch'\]",
        ),
        (
            ["benchmark.settings=[{name: t, engine: openvino, precision: fp8, padding: dynamic}]"],
            r"benchmark.settings\[0\].precision: engine openvino runs precisions \['fp32', 'bf16', .*\], not 'fp8'",
        ),
        (
            ["benchmark.settings=[{name: t, engine: torch, padding: dynamic, backend: torch}]"],
            r"benchmark.settings\[0\]: unknown key 'backend'",
        ),
        (
            ["benchmark.settings=[{name: t, engine: openvino, padding: dynamic, bucket: 30}]"],
            r"benchmark.settings\[0\].bucket: bucket 30 must be a positive integer that divides task.max_seq_length",
        ),
        (
            ["benchmark.search={engines: {openvino: [int4]}}"],
            r"benchmark.search.engines.openvino: engine openvino runs precisions",
        ),
        (["benchmark.repeats=0"], "benchmark.repeats=0 must be a positive integer"),
        (["benchmark.max_memory_mb=0"], "benchmark.max_memory_mb=0 must be a positive number"),
        (["hardware.usd_per_hour=-1"], "hardware.usd_per_hour=-1"),
        (
            ["benchmark.settings=[{name: o, engine: onnxruntime, padding: dynamic, options: {spin_fast: 1}}]"],
            r"benchmark.settings\[0\].options: 'spin_fast' is not an onnxruntime SessionOptions attribute",
        ),
        (
            ["benchmark.settings=[{name: t, engine: torch, padding: dynamic, options: {enable_cpu_mem_arena: false}}]"],
            r"benchmark.settings\[0\].options: engine torch takes only device: cpu \| cuda",
        ),
        (
            ["benchmark.settings=[{name: o, engine: openvino, padding: dynamic, options: {turbo: true}}]"],
            r"benchmark.settings\[0\].options: engine openvino takes options",
        ),
        (
            ["benchmark.settings=[{name: o, engine: onnxruntime, padding: dynamic, gated: true}]"],
            r"benchmark.gate.reference='onnx_fp32' is not a setting name \(have \['o'\]\)",
        ),
        (["benchmark.reference=stock"], r"benchmark.reference='stock' is not a setting name"),
        (
            [
                "precision=int8",
                "benchmark.settings=[{name: s, engine: onnxruntime, precision: int8_static, padding: dynamic}]",
            ],
            r"precision=int8_static: .* engines.onnxruntime.precisions.int8_static.built=true",
        ),
    ],
)
def test_bad_benchmark_configs_fail_before_any_work(make_cfg, overrides, message):
    cfg = make_cfg("stages=[finetune,export,benchmark]", *overrides)
    with pytest.raises(FastformersError, match=message):
        pipeline.run(cfg)
    assert not os.path.exists(cfg.paths.cache_dir)


def test_operator_times_sum_kernel_events_per_operator_type():
    events = [
        {"cat": "Session", "name": "model_run", "dur": 900},
        {"cat": "Node", "name": "Attention_0_kernel_time", "dur": 300, "args": {"op_name": "QAttention"}},
        {"cat": "Node", "name": "Attention_0_fence_before", "dur": 5, "args": {"op_name": "QAttention"}},
        {"cat": "Node", "name": "Attention_1_kernel_time", "dur": 200, "args": {"op_name": "QAttention"}},
        {"cat": "Node", "name": "LayerNorm_0_kernel_time", "dur": 700, "args": {"op_name": "SkipLayerNormalization"}},
    ]
    assert operator_times(events) == {"SkipLayerNormalization": 0.7, "QAttention": 0.5}


GATE = OmegaConf.create(
    {"reference": "onnx_fp32", "max_disagreement": 0.05, "alpha": 0.05, "permutations": 200, "bootstrap": 50, "seed": 0}
)


def gate_row(name: str, preds: list[int], gated: bool, precision: str = "int8") -> dict:
    return {"name": name, "gated": gated, "precision": precision, "skipped": None, "predictions": preds,
            "metrics": {"score": 0.0}}  # fmt: skip


def test_the_gate_fails_a_clear_loss_or_a_wide_disagreement_never_a_few_moved_examples():
    golds = [0, 1] * 28  # 56 labelled examples, as CB's val
    reference = list(golds)
    two_moved = [1 - g if i < 2 else g for i, g in enumerate(golds)]  # the CB row: 2 of 56 differ
    ten_lost = [1 - g if i < 10 else g for i, g in enumerate(golds)]
    pool = list(range(1000))
    rows = [
        gate_row("onnx_fp32", reference, False, "fp32"),
        gate_row("few_moved", two_moved, True),
        gate_row("clear_loss", ten_lost, True),
        gate_row("wide_disagreement", reference, True),
        gate_row("stock", ten_lost, False),
    ]
    pools = {"onnx_fp32": pool, "few_moved": pool[:970] + [-1] * 30, "clear_loss": pool,
             "wide_disagreement": pool[:900] + [-1] * 100, "stock": pool}  # fmt: skip
    sample = Labelled(
        golds, [2] * 56, [[i] for i in range(56)], lambda pos, preds: sum(preds[i] == golds[i] for i in pos) / len(pos)
    )
    failed = apply_gate(rows, GATE, sample, pools)
    assert [name.split(":")[0] for name in failed] == ["clear_loss", "wide_disagreement"]
    assert "p=0.000977 < alpha" in failed[0] and "95% lower bound" in failed[1]
    assert [r["metrics"].get("gate_passed") for r in rows] == [None, 1.0, 0.0, 0.0, None]  # the stock row: shown
    assert rows[4]["gate"]["score_passed"] == 0.0 and "gate" not in rows[0]
    assert rows[1]["gate"]["differing_units"] == 2 and rows[1]["gate"]["gate_margin"] >= 1


GATED = (
    "benchmark.settings=[{name: onnx_fp32, engine: onnxruntime, precision: fp32, padding: dynamic},"
    "{name: lever, engine: onnxruntime, precision: fp32, padding: dynamic, gated: true,"
    " options: {session.intra_op.allow_spinning: '0', enable_cpu_mem_arena: false}}]"
)


@pytest.mark.slow
def test_a_lever_that_fails_its_gate_fails_the_run_loudly_after_writing_its_table(make_cfg, monkeypatch):
    # an identical graph agrees everywhere: the agreement test is told it failed, to follow the error path
    monkeypatch.setattr("fastformers.bench.gate.agreement_fails", lambda d, n, limit: True)
    cfg = make_cfg(
        "stages=[finetune,export,benchmark]",
        "finetune.epochs=1",
        "benchmark.repeats=1",
        "benchmark.latency_examples=0",
        GATED,
    )
    with pytest.raises(
        FastformersError,
        match=r"benchmark gate: lever: disagrees with onnx_fp32 on 0.0% of 27 pool examples .*"
        r"\(benchmark.gate; the table is logged",
    ):
        pipeline.run(cfg)
    client, (run,) = mlflow_runs(cfg)
    assert run.info.status == "FAILED" and run.data.tags["cache.export"] == "miss"  # export's entry is kept
    table = client.download_artifacts(run.info.run_id, "benchmark/table.txt")
    table = open(table).read()
    rows = {line.split()[0]: line for line in table.splitlines() if line.startswith(("lever", "onnx_fp32"))}
    assert "gate failed" in rows["lever"] and "gate failed" not in rows["onnx_fp32"]


@pytest.mark.slow
def test_session_options_reach_each_setting_and_the_profiler_the_pick_and_reference(make_cfg):
    results = pipeline.run(
        make_cfg(
            "stages=[finetune,export,benchmark]",
            "finetune.epochs=1",
            "benchmark.repeats=1",
            "benchmark.latency_examples=0",
            GATED,
            "benchmark.gate.on_fail=mark",
            "benchmark.profile_examples=6",
            "benchmark.reference=onnx_fp32",
        )
    )
    assert results["benchmark/lever/gate_passed"] == 1.0  # same graph, other session options: same predictions
    assert results["benchmark/lever/agreement"] == 1.0
    assert results["benchmark/onnx_fp32/vs_reference"] == 1.0 and results["benchmark/lever/vs_reference"] > 0
    _, (run,) = mlflow_runs(make_cfg())
    report = json.loads(open(f"{run.data.tags['cache.benchmark.path']}/benchmark.json").read())
    reference, lever = report["rows"]
    assert report["pick"] == "lever"  # the last setting is the only candidate without a search
    assert lever["options"] == {"enable_cpu_mem_arena": False, "session.intra_op.allow_spinning": "0"}
    for row in (reference, lever):
        assert row["profile"]["examples"] == 6 and "Attention" in row["profile"]["kernel_ms"]
        assert sum(row["profile"]["kernel_ms"].values()) <= row["profile"]["wall_ms"]
    assert not list(Path(run.data.tags["cache.benchmark.path"]).glob("ort*"))  # the traces: summarized, removed


@pytest.mark.slow
def test_a_profiler_crash_keeps_the_timings_written_before_it_and_the_stage_succeeds(make_cfg, monkeypatch):
    from fastformers.engines.onnxruntime_engine import OnnxRuntimeEngine

    seen_before: list[dict] = []

    def crashing_profile(self, path, precision, threads, options, batches, out, bucket):
        seen_before.append(json.loads((out / "benchmark.json").read_text()))
        raise RuntimeError("profiler trace unreadable\nsecond line")

    monkeypatch.setattr(OnnxRuntimeEngine, "profile", crashing_profile)
    results = pipeline.run(
        make_cfg(
            "stages=[finetune,export,benchmark]",
            "finetune.epochs=1",
            "benchmark.repeats=1",
            "benchmark.latency_examples=0",
            "benchmark.profile_examples=4",
            "benchmark.settings=[{name: onnx_fp32, engine: onnxruntime, precision: fp32, padding: dynamic}]",
        )
    )
    assert results["benchmark/onnx_fp32/throughput"] > 0
    (before,) = seen_before  # the pick, profiled once; its timings were on disk when the profiler started
    assert before["rows"][0]["metrics"]["throughput"] > 0 and before["pick"] == "onnx_fp32"
    _, (run,) = mlflow_runs(make_cfg())
    folder = Path(run.data.tags["cache.benchmark.path"])
    report = json.loads((folder / "benchmark.json").read_text())
    assert report["profile_errors"] == {"onnx_fp32": "RuntimeError: profiler trace unreadable"}
    assert report["rows"][0]["metrics"] == before["rows"][0]["metrics"] and "profile" not in report["rows"][0]
    assert "profile of onnx_fp32 failed (RuntimeError: profiler trace unreadable)" in (folder / "table.txt").read_text()


@pytest.mark.slow
def test_the_paper_baseline_shape_is_timed_beside_the_rows_and_every_row_gets_its_speed_up_over_it(make_cfg):
    """A tiny stand-in for BERT-base (the shape is configurable), randomly initialised, fixed padding: it is a row
    of the table with its label, never scored, and the CPU's features are in the header and the run's tags."""
    cfg = make_cfg(
        "stages=[finetune,benchmark]",
        "benchmark.repeats=1",
        "benchmark.latency_examples=0",
        "benchmark.settings=[${benchmark.baseline}]",
        "benchmark.paper_baseline.enabled=true",
        "benchmark.paper_baseline.examples=3",
        "benchmark.paper_baseline.max_length=40",
        "benchmark.paper_baseline.shape={layers: 1, hidden: 32, heads: 2, ffn: 64}",
    )
    results = pipeline.run(cfg)

    paper = {k.split("/", 2)[2]: v for k, v in results.items() if k.startswith("benchmark/paper_baseline/")}
    assert paper["examples"] == 3 and paper["throughput"] > 0 and "accuracy" not in paper
    assert paper["gmacs_per_example"] * 1e9 == pytest.approx(40 * 32 * (4 * 32 + 2 * 64) + 2 * 40 * 40 * 32)
    assert paper["vs_paper"] == 1.0
    assert results["benchmark/baseline/vs_paper"] == pytest.approx(
        results["benchmark/baseline/throughput"] / paper["throughput"]
    )
    assert results["benchmark/baseline/gmacs_per_example"] > 0
    _, (run,) = mlflow_runs(cfg)
    assert {"cpu.model", "cpu.avx2", "cpu.avx512", "cpu.vnni", "cpu.amx", "cpu.bf16"} <= set(run.data.tags)
    assert run.data.tags["cpu.avx2"] in ("true", "false")
    table = open(f"{run.data.tags['cache.benchmark.path']}/table.txt").read()
    row = next(line for line in table.splitlines() if line.startswith("paper_baseline "))
    assert "<- the paper's baseline shape, randomly initialised" in row
    assert "speed-up over the paper's baseline shape, measured here: baseline" in table and "233.9x" in table
    assert "GMAC/ex" in table and "%peak" in table and "nominal peak:" in table
    assert ("-AVX2" in table) != (run.data.tags["cpu.avx2"] == "true")


@pytest.mark.parametrize(
    "override, message",
    [
        ("benchmark.paper_baseline.examples=0", r"benchmark.paper_baseline.examples=0 must be"),
        ("benchmark.paper_baseline.shape.hidden=30", r"hidden=30 is not a multiple of heads=12"),
        ("+benchmark.paper_baseline.shape.depth=3", r"benchmark.paper_baseline.shape: unknown key 'depth'"),
    ],
)
def test_a_bad_paper_baseline_fails_before_any_work(make_cfg, override, message):
    with pytest.raises(FastformersError, match=message):
        pipeline.run(make_cfg("stages=[finetune,benchmark]", "benchmark.paper_baseline.enabled=true", override))
