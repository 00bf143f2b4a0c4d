"""Roofline arithmetic: FLOP counts of known shapes by hand, a pruned shape read from its config, and this
machine's GEMM rates measured as positive, finite numbers."""

import math

from transformers import BertConfig

from fastformers.roofline import Peaks, Shape, bound_seconds, flops, measure_peaks

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
