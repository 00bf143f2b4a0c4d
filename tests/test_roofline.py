"""Roofline arithmetic: multiply-add counts of known shapes by hand, a pruned shape read from its config, this
machine's GEMM rates measured as positive, finite numbers, the CPU's features read from /proc/cpuinfo text and
the nominal peak of its family (n/a for one the table does not know)."""

import math

import pytest
from transformers import BertConfig

from fastformers.bench.roofline import (
    FAMILIES,
    Peaks,
    Shape,
    bound_seconds,
    family_of,
    flops,
    macs,
    measure_peaks,
    parse_cpuinfo,
    peak_seconds,
)

BERT_BASE = Shape(layers=12, hidden=768, heads=12, head_size=64, ffn=3072)


def test_bert_base_flops_at_128_tokens_match_the_hand_count():
    projections, attention = flops(BERT_BASE, 128)
    # per layer: 2 x 128 tokens x 768 x (Q,K,V 3x768 + output 768 + FFN 2x3072 = 9216), 12 layers
    assert projections == 2 * 128 * 768 * 9216 * 12 == 21_743_271_936
    # per layer: Q·Kᵀ and probabilities·V, each 2 x 128 x 128 x 768
    assert attention == 4 * 128 * 128 * 768 * 12 == 603_979_776


def test_a_pruned_shape_comes_from_its_config_and_counts_only_what_is_kept():
    config = BertConfig(num_hidden_layers=3, hidden_size=384, num_attention_heads=12, intermediate_size=384)
    config.attention_heads_kept = 6  # what the prune stage writes
    shape = Shape.of(config)
    assert shape == Shape(layers=3, hidden=384, heads=6, head_size=32, ffn=384)
    projections, attention = flops(shape, 100)
    assert projections == 2 * 100 * 384 * (4 * 192 + 2 * 384) * 3 == 353_894_400
    assert attention == 4 * 100 * 100 * 192 * 3 == 23_040_000
    assert Shape.of(BertConfig()).heads == 12  # unpruned: every head


def test_the_int8_bound_is_shorter_when_int8_gemms_are_faster():
    peaks = Peaks(fp32_gflops=100.0, int8_gops=400.0)
    fp32, int8 = bound_seconds(BERT_BASE, [128, 64], peaks, False), bound_seconds(BERT_BASE, [128, 64], peaks, True)
    projections = flops(BERT_BASE, 128)[0] + flops(BERT_BASE, 64)[0]
    assert math.isclose(fp32 - int8, projections / 100e9 - projections / 400e9)


def test_measured_peaks_are_positive_and_finite():
    peaks = measure_peaks(threads=1, seconds=0.05, m=32, k=64, n=128)
    assert all(math.isfinite(v) and v > 0 for v in (peaks.fp32_gflops, peaks.int8_gops))


def test_bert_base_multiply_adds_at_512_tokens_match_the_hand_count():
    projections, attention = macs(BERT_BASE, 512)
    # per layer: 512 tokens x 768 x (Q,K,V 3x768 + output 768 + FFN 2x3072 = 9216), 12 layers
    assert projections == 512 * 768 * 9216 * 12 == 43_486_543_872
    # per layer: Q·Kᵀ and probabilities·V, each 512 x 512 x 768
    assert attention == 2 * 512 * 512 * 768 * 12 == 4_831_838_208
    assert flops(BERT_BASE, 512) == (2 * projections, 2 * attention)


def test_a_pruned_shape_does_fewer_multiply_adds():
    pruned = Shape(layers=12, hidden=768, heads=6, head_size=64, ffn=1536)
    assert sum(macs(pruned, 128)) < 0.6 * sum(macs(BERT_BASE, 128))


def cpuinfo(model: str, flags: str) -> str:
    """Two processor blocks as /proc/cpuinfo prints them; only the first is read."""
    block = f"processor\t: {{n}}\nvendor_id\t: X\nmodel name\t: {model}\nflags\t\t: {flags}\n"
    return block.format(n=0) + "\n" + block.format(n=1).replace(flags, "fpu")


AVX2 = "fpu sse sse2 avx fma avx2"
ZEN4 = AVX2 + " avx512f avx512bw avx512_vnni avx512_bf16"
SAPPHIRE = AVX2 + " avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8"


@pytest.mark.parametrize(
    "model, flags, family, features",
    [
        ("AMD EPYC 7R13 Processor", AVX2, "epyc_avx2", "AVX2 -AVX512 -VNNI -AMX -BF16"),
        ("AMD EPYC 9R14", ZEN4, "epyc_zen4", "AVX2 AVX512 VNNI -AMX BF16"),
        ("AMD EPYC", ZEN4 + " avx512_vp2intersect", "epyc_zen5", "AVX2 AVX512 VNNI -AMX BF16"),
        ("Intel(R) Xeon(R) Platinum 8488C", SAPPHIRE, "xeon_amx", "AVX2 AVX512 VNNI AMX BF16"),
        ("Neoverse-V1", "fp asimd sve", None, "-AVX2 -AVX512 -VNNI -AMX -BF16"),
    ],
)
def test_the_cpus_features_and_nominal_family_come_from_its_cpuinfo(model, flags, family, features):
    cpu = parse_cpuinfo(cpuinfo(model, flags))
    assert cpu.model == model and cpu.feature_label() == features
    assert family_of(cpu) == (FAMILIES[family] if family else None)


def test_int8_and_bf16_rows_are_held_to_their_own_nominal_peak():
    zen4 = FAMILIES["epyc_zen4"]
    assert zen4.peak_gmacs("fp32", 2) == pytest.approx(16 * 2.4 * 2)
    assert zen4.peak_gmacs("int8_stock", 2) == 4 * zen4.peak_gmacs("fp32", 2)
    assert zen4.peak_gmacs("bf16", 1) == 2 * zen4.peak_gmacs("fp32", 1)
    fp32, int8 = (peak_seconds(BERT_BASE, [128], zen4, precision, 2) for precision in ("fp32", "int8"))
    projections, attention = macs(BERT_BASE, 128)
    assert fp32 == pytest.approx((projections + attention) / (16 * 2.4e9 * 2))
    assert int8 == pytest.approx(projections / (64 * 2.4e9 * 2) + attention / (16 * 2.4e9 * 2))
