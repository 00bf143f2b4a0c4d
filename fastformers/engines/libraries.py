"""The libraries whose kernels and exporters shape a stage's output, and their installed versions: they travel in
every cache key and in the benchmark table's header. The engines' own come from their configs."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from fastformers.engines import configured_libraries

CORE_LIBRARIES = ("torch", "transformers", "lightning")  # what trains and exports every model
ENGINES_CONF = Path(__file__).resolve().parents[2] / "conf" / "engines"  # the packaged engine configs


def engine_libraries(folder: Path = ENGINES_CONF) -> tuple[str, ...]:
    """The libraries the configured engines declare (each `conf/engines/<name>.yaml`'s class says its own)."""
    engines: dict = {}
    for path in sorted(folder.glob("*.yaml")):
        engines |= dict(OmegaConf.load(path))
    return configured_libraries(engines)


# the libraries whose kernels and exporters shape a stage's output: they travel in every cache key
LIBRARIES = tuple(dict.fromkeys(CORE_LIBRARIES + engine_libraries()))


def library_versions() -> dict[str, str | None]:
    """The versions of the libraries whose kernels and exporters shape a stage's output."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found
