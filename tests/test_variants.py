"""int8 variants as data: parsed from the engines' yaml, chosen by the CPU's flags, expanded into benchmark rows."""

import pytest

from fastformers.bench.settings import plan_settings
from fastformers.engines import get_engine, variants
from fastformers.engines.onnx.quantize import Int8Options
from fastformers.engines.variants import int8_features, selected
from fastformers.errors import FastformersError

AVX2_ONLY = frozenset({"avx", "avx2", "fma", "avx512f", "avx512bw"})  # e.g. Skylake-SP: AVX-512 without VNNI
VNNI = AVX2_ONLY | {"avx512_vnni"}


def test_the_stock_preset_is_per_channel_signed_full_range_and_a_bad_weight_type_is_named():
    assert Int8Options.stock() == Int8Options("QInt8", per_channel=True, reduce_range=False)
    with pytest.raises(FastformersError, match=r"weight_type='QInt4' must be one of \['QInt8', 'QUInt8'\]"):
        Int8Options("QInt4")


@pytest.mark.parametrize(
    "flags, onnxruntime, openvino",
    [
        (AVX2_ONLY, ["int8", "int8_stock", "int8_rr", "int8_u8u8"], ["int8", "int8_of", "int8_ac"]),
        (VNNI, ["int8", "int8_stock"], ["int8"]),
        (frozenset({"avx2", "avx_vnni"}), ["int8", "int8_stock"], ["int8"]),  # AVX-VNNI (Alder Lake) counts
    ],
)
def test_the_variants_a_cpu_needs_follow_its_vnni_flag(make_cfg, flags, onnxruntime, openvino):
    cfg = make_cfg()
    features = int8_features(flags)
    assert selected(get_engine("onnxruntime", cfg.engines).variants, "needed", features) == onnxruntime
    assert selected(get_engine("openvino", cfg.engines).variants, "needed", features) == openvino
    every = selected(get_engine("onnxruntime", cfg.engines).variants, "all", features)
    assert every == ["int8", "int8_stock", "int8_rr", "int8_u8u8"]  # benchmark.search.variants=all


@pytest.mark.parametrize(
    "flags, extra", [(AVX2_ONLY, {"onnxruntime_int8_rr_1x1", "onnxruntime_int8_u8u8_1x1"}), (VNNI, set())]
)
def test_the_search_expands_int8_into_the_rows_this_cpu_needs_the_stock_reference_among_them(
    make_cfg, monkeypatch, flags, extra
):
    monkeypatch.setattr(variants, "cpu_flags", lambda: flags)
    cfg = make_cfg(
        "precision=int8",
        "hardware.cores=1",
        "benchmark.reference=onnx_int8_stock",
        "benchmark.settings=[${benchmark.baseline},"
        "{name: onnx_fp32, engine: onnxruntime, precision: fp32, padding: dynamic, instances: 1,"
        " threads_per_instance: 1},"
        "{name: onnx_int8_stock, engine: onnxruntime, precision: int8_stock, padding: dynamic, instances: 1,"
        " threads_per_instance: 1}]",
        "benchmark.search={engines: {onnxruntime: [int8]}, layouts: [1x1]}",
    )
    rows = {row.name: row for row in plan_settings(cfg)}
    candidates = {name for name, row in rows.items() if row.candidate}
    assert candidates == {"onnxruntime_int8_1x1", "onnx_int8_stock"} | extra
    stock = rows["onnx_int8_stock"]
    assert stock.gated and stock.stock and not rows["onnxruntime_int8_1x1"].stock


def test_a_variant_needs_a_known_cpu_condition_and_exactly_one_stock_recipe(make_cfg):
    cfg = make_cfg("+engines.openvino.int8.int8_x={stock: true}")
    with pytest.raises(FastformersError, match=r"engines.openvino.int8: exactly one variant must be stock: true"):
        get_engine("openvino", cfg.engines)
    cfg = make_cfg("+engines.onnxruntime.int8.fast={weight_type: QInt8}")
    with pytest.raises(FastformersError, match=r"engines.onnxruntime.int8.fast: a variant's name starts with int8"):
        get_engine("onnxruntime", cfg.engines)


def test_an_export_entry_built_on_a_vnni_cpu_is_not_read_on_an_avx2_one(make_cfg, monkeypatch):
    """The accuracy-controlled OpenVINO variant is built only where VNNI is missing, so the export's cache key
    names what this CPU builds: a VNNI machine's entry (without int8_ac) is never read on an AVX2 machine."""
    pytest.importorskip("nncf")
    from fastformers.run.pipeline import stage_payload
    from fastformers.stages import export

    cfg = make_cfg("precision=int8", "export.engines=[onnxruntime,openvino]")
    payloads = {}
    for vnni in (True, False):
        monkeypatch.setattr(variants, "int8_features", lambda flags=None, vnni=vnni: {"vnni": vnni})
        payloads[vnni] = stage_payload(cfg, "export", export, "data", {})
    assert "int8_ac" in payloads[False]["machine"]["openvino"]
    assert "int8_ac" not in payloads[True]["machine"]["openvino"]
    assert payloads[True] != payloads[False]
    fp32 = make_cfg("precision=fp32")
    assert "machine" not in stage_payload(fp32, "export", export, "data", {})  # other keys are unchanged
