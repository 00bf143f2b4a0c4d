#!/usr/bin/env bash
# Re-measures every figure of docs/results.md ("Measured on this machine"), in the order they were taken,
# into the default MLflow store (outputs/mlflow.db). About 4 hours on 2 CPU cores; stages already in
# outputs/cache are reused, timings are always taken afresh.
#   bash scripts/reproduce.sh            (the reports are written along the way, under outputs/reports/)
set -euo pipefail
cd "$(dirname "$0")/.."
ff=".venv/bin/fastformers"
cost=(hardware.tdp_watts=10 hardware.usd_per_hour=0.10)  # assumed, not measured: energy is a TDP estimate

$ff task=cb                                                                   # CB teacher
$ff task=rte mlflow.experiment_name=rte_kd                                    # RTE teacher
$ff task=rte student=minilm_l3 'stages=[finetune,distill,evaluate]' mlflow.experiment_name=rte_kd
$ff task=rte student=minilm_l3 'stages=[finetune,distill,evaluate]' distill.method=task_agnostic mlflow.experiment_name=rte_kd
$ff task=rte student=minilm_l3 'stages=[finetune,distill,evaluate]' distill.augment=2 mlflow.experiment_name=rte_kd
$ff task=rte student=minilm_l3 'stages=[finetune,distill,evaluate]' distill.hidden_weight=1 mlflow.experiment_name=rte_kd
$ff task=cb student=minilm_l3 'stages=[finetune,distill,evaluate]'
$ff task=cb student=minilm_l3 'stages=[finetune,distill,evaluate]' distill.method=task_agnostic
bottom=(student=minilm_l3 'student.layers=[0,1,2]' 'stages=[finetune,distill,evaluate]')  # = student=minilm_l3_bottom
$ff task=rte "${bottom[@]}" mlflow.experiment_name=rte_kd
$ff task=rte "${bottom[@]}" distill.method=task_agnostic mlflow.experiment_name=rte_kd
$ff task=cb "${bottom[@]}" mlflow.experiment_name=cb_kd
$ff experiment=benchmark task=rte "${cost[@]}" mlflow.experiment_name=rte_benchmark
$ff -m experiment=pruning_sweep "${cost[@]}"
$ff report --experiment pruning_sweep
$ff task=boolq 'stages=[finetune,evaluate]' mlflow.experiment_name=boolq_teacher   # BoolQ teacher (60% of val)
$ff experiment=speed "${cost[@]}"                                              # batch-1 int8 levers, profiles
$ff -m experiment=boolq_ablation +ablation=pruned_h50_f25 "${cost[@]}" benchmark.profile_examples=100  # full recipe
$ff experiment=boolq_ablation "${cost[@]}"                                     # Table 3: seven rows
$ff report --experiment boolq_ablation
$ff experiment=superglue_table "${cost[@]}"                                    # Table 4: seven tasks (ReCoRD skipped)
$ff report --experiment superglue_table
