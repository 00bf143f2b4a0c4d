"""Stage outputs cached by the config that produced them.

An entry is a folder `<root>/<stage>/<key>/`; the key hashes the stage's own config, the data's
fingerprint and the keys of the stages it read from, so a changed upstream setting invalidates it.
A stage builds into a temporary folder that is renamed into place only after `manifest.json` (sizes and
sha256 of every file) is written: a half-written or corrupted entry is detected and rebuilt, never loaded.
The scratch folder's name carries its builder's pid and host (`.<key>.<id>.<pid>@<host>.tmp`): one left by a
killed process (kill -9 gives it no chance to clean up) is removed the next time a stage of that kind looks up
or builds an entry; a live builder's, another host's, and the older names without a pid are left alone.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SCRATCH = re.compile(r"^\.(?P<key>[^.]+)\.(?P<id>[0-9a-f]+)\.(?P<pid>\d+)@(?P<host>[^.]*)\.tmp$")


def this_host() -> str:
    """The host name as a scratch folder's name holds it (no dots: they separate the name's parts)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())


def process_gone(pid: int) -> bool:
    """Whether no process `pid` exists on this host (one of another user still exists: PermissionError)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


LIBRARIES = ("torch", "transformers", "lightning", "onnx", "onnxruntime", "openvino", "nncf")  # shape outputs too


def code_fingerprint(*modules: str) -> str:
    """A hash of the code a stage runs: its module and every fastformers module it imports, transitively, each
    as its syntax tree without docstrings, so editing code rebuilds the entries it made, while comments,
    docstrings and formatting do not. Cost: one parse of ~40 files per process (tens of ms); a change to a
    shared module (models.py, training.py) rebuilds every stage that imports it."""
    digest = hashlib.sha256()
    for name in sorted(set().union(*(_imported_modules(module) for module in modules))):
        digest.update(name.encode() + _code_of(name).encode())
    return digest.hexdigest()[:16]


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


PACKAGE_ROOT = Path(__file__).resolve().parent  # fastformers/


def _source(module: str) -> Path | None:
    """The file of a fastformers module, found on disk without importing anything."""
    parts = module.split(".")[1:]
    base = PACKAGE_ROOT.joinpath(*parts)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if (parts and path.is_file()) or (not parts and path.name == "__init__.py" and path.is_file()):
            return path
    return None


@functools.cache
def _code_of(module: str) -> str:
    path = _source(module)
    if path is None:
        return ""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
    return ast.dump(tree)


@functools.cache
def _imported_modules(module: str) -> frozenset[str]:
    """`module` and the fastformers modules it imports, transitively (imports inside functions included)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = _source(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names if alias.name.startswith("fastformers")]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastformers"):
                todo.append(node.module)  # `from fastformers import x`: x may be a module of the package
                todo += [f"{node.module}.{alias.name}" for alias in node.names]
    return frozenset(seen)


def cache_key(payload: dict) -> str:
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_table(folder: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


class StageCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lookup(self, stage: str, key: str) -> dict | None:
        """The manifest of a complete, intact entry; a damaged one is removed so it gets rebuilt."""
        self.remove_orphans(stage)
        folder = self.entry(stage, key)
        if not folder.exists():
            return None
        problem = self._problem(folder)
        if problem is None:
            return json.loads((folder / MANIFEST).read_text())
        log.warning("cache entry %s is damaged (%s): rebuilding it", folder, problem)
        shutil.rmtree(folder, ignore_errors=True)
        return None

    @staticmethod
    def _problem(folder: Path) -> str | None:
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            return "no readable manifest"
        if _file_table(folder) != manifest.get("files"):
            return "files differ from the manifest"
        return None

    @contextmanager
    def build(self, stage: str, key: str, info: dict) -> Iterator[Path]:
        """Yields a scratch folder; on success it becomes the entry, on failure it is deleted."""
        self.remove_orphans(stage)
        final = self.entry(stage, key)
        scratch = final.with_name(f".{key}.{uuid.uuid4().hex[:8]}.{os.getpid()}@{this_host()}.tmp")
        scratch.mkdir(parents=True)
        try:
            yield scratch
            manifest = {**info, "stage": stage, "key": key, "files": _file_table(scratch)}
            (scratch / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
            try:
                os.rename(scratch, final)
            except OSError:  # a parallel job finished the same entry first: keep theirs
                if self._problem(final) is not None:
                    raise
                shutil.rmtree(scratch, ignore_errors=True)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise

    def remove_orphans(self, stage: str) -> list[Path]:
        """Removes the stage's scratch folders whose builder process on this host is gone; returns them."""
        folder = self.root / stage
        if not folder.is_dir():
            return []
        removed = []
        host = this_host()
        for scratch in sorted(folder.glob(".*.tmp")):
            match = SCRATCH.match(scratch.name)
            if match is None or match["host"] != host or not process_gone(int(match["pid"])):
                continue  # an older name without a pid, another host's, or a live build
            shutil.rmtree(scratch, ignore_errors=True)
            log.warning("cache: removed %s, the scratch folder of process %s, which is gone", scratch, match["pid"])
            removed.append(scratch)
        return removed
