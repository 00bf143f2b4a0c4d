"""`fastformers`: the Hydra entry point. It only composes the config and hands it to the pipeline."""
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fastformers.errors import FastformersError

log = logging.getLogger("fastformers")

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")  # the repo's top-level conf/


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Returns the run's main metric, so Hydra sweepers can optimise it."""
    from fastformers import pipeline  # here, not at the top: spawned benchmark instances re-import this module

    try:
        results = pipeline.run(cfg)
    except FastformersError as err:
        log.error("%s", err)
        print(f"fastformers: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return pipeline.main_metric(cfg, results)


if __name__ == "__main__":
    main()
