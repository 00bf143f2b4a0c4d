"""The stages a run can chain, by name. Each module has one entry, `run(cfg, inputs, out) -> metrics`,
and declares what it provides (e.g. a model), what it uses, and which config keys define its output."""
from fastformers.errors import FastformersError
from fastformers.stages import benchmark, distill, evaluate, export, finetune, prune

STAGES = {"finetune": finetune, "distill": distill, "prune": prune, "export": export, "evaluate": evaluate,
          "benchmark": benchmark}


def get_stage(name: str):
    if name not in STAGES:
        raise FastformersError(f"stages: unknown stage {name!r}; choose from {list(STAGES)}")
    return STAGES[name]
