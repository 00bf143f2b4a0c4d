"""How often a 12-trial compress search finds the smallest student that keeps the score, with and without
`compress.monotone`: the real search (fastformers/run/compress.py: the covering design, NSGA-II, skipped points)
on a scripted score, no training, a few seconds a search.

The script's score is shaped after the CB students measured on 2026-12-06 (docs/recipes.md): 4-layer students keep
the teacher's score unless both heads and FFN are cut to a quarter, 3-layer ones seeded from every other teacher
layer keep it from half the heads and half the FFN up, every other student is at the majority class. What it
measures is the search's use of its trials, not any model's accuracy.

    .venv/bin/python scripts/search_efficiency.py --searches 30
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
import warnings
from pathlib import Path

import optuna
from hydra import compose, initialize_config_dir

from fastformers.bench.roofline import Shape, gmacs_per_example
from fastformers.run import compress

CONF = str(Path(__file__).resolve().parents[1] / "conf")
TEACHER = Shape(layers=6, hidden=384, heads=12, head_size=32, ffn=1536)  # MiniLM-L6-H384
TOKENS = [90]  # about CB's mean tokens per example: the ratios barely depend on it
TEACHER_SCORE, KEPT, LOST = 0.7758, 0.80, 0.64  # CB val[:50%]: the teacher, a student that keeps it, the majority


def keeps_score(p: dict) -> bool:
    if p["layers"] >= 4:
        return not (p["heads"] == 0.25 and p["ffn"] == 0.25)
    return p["layers"] == 3 and p["seeding"] == "every_other" and p["heads"] >= 0.5 and p["ffn"] >= 0.5


gmacs = functools.partial(compress.point_gmacs, TEACHER, TOKENS)  # what the search itself costs points by


def scripted(params: dict, number: int) -> compress.Point:
    score = KEPT if keeps_score(params) else LOST
    return compress.Point(score=score, gmacs=gmacs(params), shape={}, folder=Path("."), run_id="scripted")


def search_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=["experiment=compress", *overrides])


def best_in_space() -> float:
    """The reduction of the smallest student of the default space that keeps the score: what a search can find."""
    points = compress.space_points(search_cfg().compress.space, TEACHER.layers)
    return gmacs_per_example(TEACHER, TOKENS) / min(gmacs(p) for p in points if keeps_score(p))


def one_search(seed: int, monotone: bool, trials: int) -> float:
    """The teacher's multiply-adds over those of the smallest student the search found within the budget."""
    with tempfile.TemporaryDirectory() as out:
        cfg = search_cfg(
            f"paths.output_dir={out}",
            f"compress.seed={seed}",
            f"compress.monotone={monotone}",
            f"compress.trials={trials}",
        )
        budget = compress.Budget(TEACHER_SCORE, cfg.compress.max_drop)
        study = compress.open_study(cfg)
        done = compress.search(cfg, study, scripted, budget, time.monotonic() + 600, TEACHER.layers, gmacs)
        fits = [t.user_attrs["gmacs"] for t in done if budget.keeps(t.user_attrs)]
        return gmacs_per_example(TEACHER, TOKENS) / min(fits) if fits else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--searches", type=int, default=30, help="seeds 0..N-1 of each setting")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--target", type=float, default=4.0, help="the reduction counted as found")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    print(f"the space's best: {best_in_space():.2f}x fewer multiply-adds than the teacher", flush=True)
    for monotone in (False, True):
        found = [one_search(seed, monotone, args.trials) for seed in range(args.searches)]
        hits = sum(r >= args.target - 1e-6 for r in found)
        print(
            f"compress.monotone={str(monotone).lower()}: {hits} of {args.searches} searches of {args.trials} trials "
            f"found >= {args.target}x fewer multiply-adds; mean best {sum(found) / len(found):.2f}x, "
            f"found {sorted(round(r, 2) for r in found)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
