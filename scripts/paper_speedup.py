"""The chosen model's batch-1 speed-up over the paper's baseline, on BoolQ's inputs as the paper timed it.

`fastformers experiment=compress` prints this ratio on its own task's inputs; the paper's 233.9x is BoolQ's (a
question and a long passage, ~2x CB's tokens), so a model's speed-up there is the comparable one. This times, side
by side in interleaved rounds on this machine: the chosen student's int8 ONNX graph (the compress run's export,
dynamic length, batch 1) on the first --examples BoolQ val inputs, and the paper's baseline shape (BERT-base,
random weights: timing does not depend on them) padded to 512 in PyTorch fp32 at batch 1 on the first
--baseline-examples of them (every one costs the same at a fixed length).

    .venv/bin/python scripts/paper_speedup.py                   # the newest compress run's chosen model
    .venv/bin/python scripts/paper_speedup.py --run <parent run id> --task cb   # its own inputs, to cross-check
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

from fastformers.bench.instances import usable_cores
from fastformers.bench.options import BenchOptions
from fastformers.bench.paper import PAPER_SPEEDUP, save_model
from fastformers.bench.table import machine
from fastformers.bench.workload import make_batches
from fastformers.data.loading import EncodedDataset, load_examples
from fastformers.data.task_config import task_of
from fastformers.engines import artifact_path, get_engine, tokenizer_folder

ROOT = Path(__file__).resolve().parents[1]


def chosen_export(tracking_uri: str, run_id: str | None) -> tuple[Path, str]:
    """The export folder of a compress run's chosen model (the newest run that chose one, unless named)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    if run_id:
        parent = client.get_run(run_id)
    else:
        experiment = client.get_experiment_by_name("compress")
        runs = (
            client.search_runs(
                [experiment.experiment_id], "tags.`compress.chosen_run` != ''", order_by=["attributes.start_time DESC"]
            )
            if experiment
            else []
        )
        if not runs:
            sys.exit(f"paper_speedup: no compress run at {tracking_uri} chose a model")
        parent = runs[0]
    chosen = client.get_run(parent.data.tags["compress.chosen_run"])
    about = f"compress run {parent.info.run_id}, study {parent.data.tags.get('compress.study')}, {chosen.info.run_name}"
    return Path(chosen.data.tags["cache.export.path"]), about


def calls_ms(call, batches) -> list[float]:
    """Each batch's wall time, one call each, in milliseconds."""
    times = []
    for batch in batches:
        started = time.perf_counter()
        call(batch.inputs)
        times.append(1000 * (time.perf_counter() - started))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'outputs' / 'mlflow.db'}")
    parser.add_argument("--run", help="the compress parent run (default: the newest that chose a model)")
    parser.add_argument("--export", type=Path, help="an export stage's folder to time instead of a run's choice")
    parser.add_argument("--task", default="boolq", help="whose val inputs are timed (default: BoolQ, the paper's)")
    parser.add_argument("--examples", type=int, default=100, help="student: the first N inputs, one call each")
    parser.add_argument("--baseline-examples", type=int, default=5, help="baseline: the first N (BERT-base at 512)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median round is reported")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=[f"task={args.task}"])
    task, paper = task_of(cfg), BenchOptions.of(cfg).paper
    export, about = (args.export, str(args.export)) if args.export else chosen_export(args.tracking_uri, args.run)
    engine = get_engine("onnxruntime", cfg.engines)
    graph = artifact_path(export, engine, "int8")
    cores = len(usable_cores())  # the student at 1 thread and at all of them: a ~1 ms graph can lose to thread sync
    students = {threads: engine.open(graph, "int8", threads) for threads in sorted({1, cores})}
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(export))
    examples = load_examples(task, ROOT / cfg.data.root, "val")  # an absolute SUPERGLUE_DIR stays as it is
    args.examples, args.baseline_examples = (min(n, len(examples)) for n in (args.examples, args.baseline_examples))
    dataset = EncodedDataset(examples[: max(args.examples, args.baseline_examples)], tokenizer, paper.max_length)
    singles = make_batches(dataset, range(args.examples), 1, tokenizer, None, False)
    padded = make_batches(dataset, range(args.baseline_examples), 1, tokenizer, paper.max_length, False)
    with tempfile.TemporaryDirectory() as folder:
        baseline = BertForSequenceClassification.from_pretrained(save_model(paper, tokenizer, 2, Path(folder))).eval()

    def run_baseline(inputs):
        with torch.inference_mode():
            return baseline(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits

    runs = [(f"student {t} thread(s)", call, singles) for t, call in students.items()]
    runs.append(("baseline", run_baseline, padded))
    for _, call, batches in runs:  # warm-up, untimed
        calls_ms(call, batches[:3])
    rounds: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    for round_ in range(args.rounds):  # the leader rotates, so a slow spell falls on each alike
        for name, call, batches in runs[round_ % len(runs) :] + runs[: round_ % len(runs)]:
            times = calls_ms(call, batches)
            rounds[name].append(statistics.mean(times) if name == "baseline" else statistics.median(times))
        print(f"round {round_ + 1}: " + ", ".join(f"{name} {values[-1]:.3f} ms" for name, values in rounds.items()))
    baseline_ms = statistics.median(rounds.pop("baseline"))
    best = min(rounds, key=lambda name: statistics.median(rounds[name]))
    student_ms = statistics.median(rounds[best])
    lengths = [len(row["input_ids"]) for rows in dataset.rows[: args.examples] for row in rows]
    facts = machine()
    print(f"machine: {facts['cpu']} ({facts['cpu_feature_label']}), {facts['logical_cpus']} logical CPUs")
    print(f"model: {about}; int8 graph {graph.name}")
    print(
        f"inputs: {task.name} val, the first {args.examples} (mean {np.mean(lengths):.0f} tokens, at most "
        f"{paper.max_length}); baseline on the first {args.baseline_examples}, padded to {paper.max_length}"
    )
    print(
        f"batch 1: {best} p50 {student_ms:.3f} ms, baseline {baseline_ms:.1f} ms/example (median of {args.rounds} "
        f"rounds): {baseline_ms / student_ms:.1f}x the paper's baseline on {task.name}'s inputs "
        f"(the paper: {PAPER_SPEEDUP}x on BoolQ, its hardware)"
    )


if __name__ == "__main__":
    main()
