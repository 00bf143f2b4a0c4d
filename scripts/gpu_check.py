"""GPU smoke check of the hardware=gpu path (Lightning on CUDA, 16-mixed) for finetune and distill, on fixture data
with tiny random models, beside hardware=cpu: `python scripts/gpu_check.py [gpu] [cpu]`.

Written for the lent GPU machines, whose image has torch, lightning and transformers but not mlflow or hydra:
hydra/omegaconf/antlr4 travel as copied packages in `.gpu/site` (put on sys.path when present), mlflow is stubbed
and the Lightning logger is off, so this checks training on the device, not tracking."""

import importlib.machinery
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / ".gpu" / "site"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for name in (
    "mlflow",
    "mlflow.exceptions",
    "mlflow.protos",
    "mlflow.protos.databricks_pb2",
    "mlflow.tracking",
    "mlflow.pyfunc",
):
    sys.modules[name] = mock.MagicMock(__spec__=importlib.machinery.ModuleSpec(name, None))

import torch
from hydra import compose, initialize_config_dir

from fastformers.data.fixtures import write_superglue
from fastformers.run.cli import CONF_DIR
from fastformers.stages import distill, finetune
from fastformers.tracking import runs as tracking

tracking.lightning_logger = lambda cfg: False
print(
    "torch",
    torch.__version__,
    "cuda",
    torch.cuda.is_available(),
    torch.cuda.is_available() and torch.cuda.get_device_name(0),
)
tmp = Path(tempfile.mkdtemp())
root = write_superglue(tmp / "data")
for hw in sys.argv[1:] or ("gpu", "cpu"):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"hardware={hw}",
                "teacher=tiny_bert",
                "student=tiny_random",
                "task=cb",
                f"data.root={root}",
                f"paths.output_dir={tmp / hw}",
                "finetune.epochs=3",
                "distill.epochs=3",
                "finetune.batch_size=8",
            ],
        )
    print(f"== hardware={hw}: accelerator={cfg.hardware.accelerator} precision={cfg.hardware.train_precision}")
    finetune.validate(cfg)
    t = time.perf_counter()
    ft = finetune.run(cfg, {}, tmp / hw / "ft")
    print("finetune", {k: round(v, 4) for k, v in ft.items()}, f"{time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    ds = distill.run(cfg, {"teacher": tmp / hw / "ft", "model": tmp / hw / "ft"}, tmp / hw / "ds")
    print("distill", {k: round(v, 4) for k, v in ds.items()}, f"{time.perf_counter() - t:.1f} s")
    assert ft["best_val_score"] >= 0 and ds["best_val_score"] >= 0
print("GPU CHECK OK")
