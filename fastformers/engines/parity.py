"""Every artifact of the export, loaded through its engine, against PyTorch on real inputs: float artifacts
must match closely, the run's precision on onnxruntime must agree on enough predictions; the rest (bf16,
other engines' int8) is recorded for the benchmark's accuracy gate to judge."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastformers.engines import Engine, EngineModel
from fastformers.engines.target import Target
from fastformers.errors import FastformersError
from fastformers.models.loading import example_scores, model_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Compared:
    """One thing to compare: an engine (built from the run's config) running an artifact as `target` says."""

    label: str  # e.g. onnxruntime/int8, openvino/bf16
    engine: Engine
    target: Target
    path: Path
    is_float: bool


@torch.no_grad()
def batch_logits(model, loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, group_sizes) of every batch; batches of differing size and length exercise the dynamic axes."""
    model.eval()
    return [(model(**model_inputs(batch)).logits.float(), batch["group_sizes"]) for batch in loader]


def compare(reference, candidate, loader) -> dict[str, float]:
    """Largest logit difference, and the share of examples whose prediction is the same."""
    candidate_scoring = loader.collate_fn.candidate_scoring
    diffs, same = [], []
    for (ref, sizes), (got, _) in zip(reference, candidate, strict=True):
        diffs.append(float((ref - got).abs().max()))
        same.extend(
            (
                example_scores(ref, sizes, candidate_scoring).argmax(1)
                == example_scores(got, sizes, candidate_scoring).argmax(1)
            ).tolist()
        )
    return {"max_abs_diff": max(diffs), "agreement": float(np.mean(same)), "examples": len(same)}


def check(
    model, loader, targets: list[Compared], max_abs_diff: float, gated: str, min_agreement: float
) -> dict[str, dict[str, float]]:
    """Compares every target with `model`; raises when a float one drifts or the `gated` one disagrees."""
    reference = batch_logits(model, loader)
    results = {}
    for target in targets:
        run = target.target
        engine_model = EngineModel(target.engine.open(target.path, run.precision, None, dict(run.options), run.bucket))
        results[target.label] = compare(reference, batch_logits(engine_model, loader), loader)
        log.info("parity %s: %s", target.label, results[target.label])
        if target.is_float and results[target.label]["max_abs_diff"] > max_abs_diff:
            raise FastformersError(
                f"parity: the {target.label} graph's logits differ from PyTorch's by "
                f"{results[target.label]['max_abs_diff']:.3g} > export.fp32_max_abs_diff="
                f"{max_abs_diff} on {results[target.label]['examples']} examples"
            )
    if gated in results and results[gated]["agreement"] < min_agreement:
        raise FastformersError(
            f"parity: {gated} predicts like PyTorch on only {results[gated]['agreement']:.1%} "
            f"of {results[gated]['examples']} examples < precision.min_agreement={min_agreement}"
        )
    return results
