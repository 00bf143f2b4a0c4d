"""What runs, as one value: an engine, the precision it runs, a shape bucket and per-setting engine options. A
benchmark setting, an instance's backend, pick.json, evaluate's evaluated.json, the served model's config and
the export's parity list all carry this one value, so they cannot drift apart."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastformers.errors import FastformersError

KEYS = ("engine", "precision", "bucket", "options")  # the keys of its dict: pick.json's and served configs' since v1


@dataclass(frozen=True)
class Target:
    """An engine running a precision, inputs padded to a multiple of `bucket` tokens (None: dynamic shapes),
    with engine options as sorted pairs (hashable: rows that differ only in layout compare equal)."""

    engine: str
    precision: str = "fp32"
    bucket: int | None = None
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(
        cls, engine: str, precision: str = "fp32", bucket: int | None = None, options: Mapping | None = None
    ) -> Target:
        """A target from plain values; options as a mapping (a config node or a dict)."""
        return cls(str(engine), str(precision), bucket, tuple(sorted((str(k), v) for k, v in (options or {}).items())))

    @property
    def label(self) -> str:
        """e.g. `openvino/int8 b32`: what a log line or a table names."""
        return f"{self.engine}/{self.precision}" + (f" b{self.bucket}" if self.bucket else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "precision": self.precision,
            "bucket": self.bucket,
            "options": dict(self.options),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str) -> Target:
        """Reads what `to_dict` wrote, and what pick.json, evaluated.json and served model configs held before
        this class (the same four keys; `bucket` and `options` absent in the oldest)."""
        if not isinstance(data, Mapping) or not data.get("engine"):
            raise FastformersError(f"{source}: names no engine (expected keys {list(KEYS)}, got {data!r})")
        return cls.of(data["engine"], data.get("precision") or "fp32", data.get("bucket"), data.get("options"))
