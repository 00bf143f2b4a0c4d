"""Where training runs: one process, or Lightning's DDP over `hardware.devices` x `hardware.num_nodes`
(conf/hardware/ddp.yaml). Every rank runs the pipeline; rank 0 alone writes cache entries and the MLflow run,
the others join each training stage's fit and read rank 0's entries (pipeline.run_worker)."""

from __future__ import annotations

import os

from omegaconf import DictConfig

from fastformers.checks import require_number
from fastformers.errors import FastformersError

STRATEGIES = ("auto", "ddp")


def world_size(hardware: DictConfig) -> int:
    return int(hardware.get("devices") or 1) * int(hardware.get("num_nodes") or 1)


def global_rank(hardware: DictConfig) -> int:
    """This process's rank, from what its launcher set: torchrun (RANK), SLURM (SLURM_PROCID), or Lightning's
    own launcher, which starts ranks 1.. of each node with LOCAL_RANK and NODE_RANK."""
    if world_size(hardware) == 1:
        return 0
    for name in ("RANK", "SLURM_PROCID"):
        if name in os.environ:
            return int(os.environ[name])
    return int(os.environ.get("NODE_RANK", "0")) * int(hardware.devices) + int(os.environ.get("LOCAL_RANK", "0"))


def is_worker(hardware: DictConfig) -> bool:
    """A DDP rank other than 0: it trains alongside rank 0 but writes nothing of its own."""
    return global_rank(hardware) != 0


def trainer_placement(hardware: DictConfig) -> dict:
    """Lightning Trainer arguments: the accelerator, how many devices and nodes, and the strategy."""
    strategy: object = hardware.get("strategy") or "auto"
    if strategy == "ddp" and hardware.get("process_group_backend"):
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend=hardware.process_group_backend)
    return {
        "accelerator": hardware.accelerator,
        "devices": int(hardware.get("devices") or 1),
        "num_nodes": int(hardware.get("num_nodes") or 1),
        "strategy": strategy,
    }


def check_placement(cfg: DictConfig, blocks: tuple[str, ...]) -> None:
    """Devices, nodes and strategy, and that each training block's global batch splits evenly over the ranks."""
    require_number(cfg, "hardware.devices", 1, integer=True, null="1")
    require_number(cfg, "hardware.num_nodes", 1, integer=True, null="1")
    strategy = cfg.hardware.get("strategy") or "auto"
    if strategy not in STRATEGIES:
        raise FastformersError(f"hardware.strategy={strategy!r} must be one of {list(STRATEGIES)}")
    world = world_size(cfg.hardware)
    if world > 1 and strategy != "ddp":
        raise FastformersError(
            f"hardware.devices x hardware.num_nodes = {world} needs hardware.strategy=ddp (or hardware=ddp)"
        )
    for block in blocks:
        if cfg[block].batch_size % world:
            raise FastformersError(
                f"{block}.batch_size={cfg[block].batch_size} is the global batch: it must split evenly over the "
                f"{world} training processes (hardware.devices x hardware.num_nodes)"
            )
