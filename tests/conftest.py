"""The tests' pytest fixtures: fixture data in the official SuperGLUE shapes (fastformers/data/fixtures.py) and the
real config tree shrunk for one test. The functions several test files share are in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastformers.data.fixtures import write_superglue
from tests.helpers import compose_cfg


@pytest.fixture(scope="session")
def superglue_root(tmp_path_factory) -> Path:
    return write_superglue(tmp_path_factory.mktemp("superglue"))


@pytest.fixture
def make_cfg(superglue_root, tmp_path):
    """`compose_cfg` for one test, with its own output folder."""

    def make(*overrides: str, data_root: Path | None = None):
        return compose_cfg(data_root or superglue_root, tmp_path / "outputs", *overrides)

    return make
