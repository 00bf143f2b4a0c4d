"""Stage outputs cached by the config that produced them.

An entry is a folder `<root>/<stage>/<key>/`; the key hashes the stage's own config, the data's
fingerprint and the keys of the stages it read from, so a changed upstream setting invalidates it.
A stage builds into a temporary folder that is renamed into place only after `manifest.json` (sizes and
sha256 of every file) is written: a half-written or corrupted entry is detected and rebuilt, never loaded.
The scratch folder's name carries its builder's pid and host (`.<key>.<id>.<pid>@<host>.tmp`): one left by a
killed process (kill -9 gives it no chance to clean up) is removed the next time a stage of that kind looks up
or builds an entry; a live builder's, another host's, and the older names without a pid are left alone.

Parallel jobs (a joblib or SLURM sweep) build each entry once: the builder holds `.<key>.lock`, created with
O_EXCL (atomic on local disks and NFSv3+/Lustre, so it works between nodes), holding its host, pid and a token,
its mtime refreshed every HEARTBEAT seconds; the others wait for the entry and then read it. A lock is stale when
its holder on this host is gone, or its heartbeat is older than STALE seconds (a dead node): it is taken over.
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
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from fastformers.errors import FastformersError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
HEARTBEAT = 30.0  # seconds between a builder's touches of its lock
STALE = 300.0  # another host's lock untouched this long belongs to a dead builder
POLL = 2.0  # seconds between a waiting job's looks at the entry
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

    @contextmanager
    def claimed(self, stage: str, key: str) -> Iterator[bool]:
        """True: this process holds the entry's build lock and builds it. False: another process built the entry
        while this one waited (read it). A lock whose holder is dead is taken over (see the module's notes)."""
        lock = self.root / stage / f".{key}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        waiting_for = None
        while self.lookup(stage, key) is None:
            token = _try_lock(lock)
            if token is not None:
                break
            holder = _holder(lock)
            if holder is not None and _stale(lock, holder):
                _take_over(lock, holder)
                continue
            if holder is None and _age(lock) > STALE:  # its creator died before writing who it was
                lock.unlink(missing_ok=True)
                continue
            if holder is not None and holder != waiting_for:
                waiting_for = holder
                print(f"stage {stage}: waiting for {holder['pid']}@{holder['host']}, which is building it", flush=True)
            time.sleep(POLL)
        else:
            yield False
            return
        if self.lookup(stage, key) is not None:  # finished by another job between the look and the lock
            lock.unlink(missing_ok=True)
            yield False
            return
        beating = threading.Event()
        heart = threading.Thread(target=_heartbeat, args=(lock, beating), daemon=True)
        heart.start()
        try:
            yield True
        finally:
            beating.set()
            if (_holder(lock) or {}).get("token") == token:
                lock.unlink(missing_ok=True)

    def wait_for(self, stage: str, key: str, idle_timeout: float) -> Path:
        """The entry another process (DDP's rank 0) writes: waits while its lock is held, or up to
        `idle_timeout` seconds for a build to start."""
        lock, idle_since = self.root / stage / f".{key}.lock", time.monotonic()
        while self.lookup(stage, key) is None:
            holder = _holder(lock)
            if holder is not None and not _stale(lock, holder):
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > idle_timeout:
                raise FastformersError(
                    f"stage {stage}: entry {self.entry(stage, key)} was not written within {idle_timeout:.0f} s "
                    "and nobody is building it (did rank 0 fail?)"
                )
            time.sleep(POLL)
        return self.entry(stage, key)


def _try_lock(lock: Path) -> str | None:
    """Creates the lock file atomically; its token, or None when another process holds it."""
    token = uuid.uuid4().hex
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w") as stream:
        json.dump({"host": this_host(), "pid": os.getpid(), "token": token, "since": time.time()}, stream)
    return token


def _holder(lock: Path) -> dict | None:
    """Who holds the lock (None: nobody, or a holder still writing it: looked at again next time)."""
    try:
        return json.loads(lock.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _age(lock: Path) -> float:
    """Seconds since the lock's last heartbeat (0 when it is gone)."""
    try:
        return time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _stale(lock: Path, holder: dict) -> bool:
    """Its holder is gone (this host), or has not touched it for STALE seconds (any host: a dead node, or a
    reused pid)."""
    gone_here = holder.get("host") == this_host() and process_gone(int(holder.get("pid", 0)))
    return gone_here or _age(lock) > STALE


def _take_over(lock: Path, holder: dict) -> None:
    """Moves a dead holder's lock aside; one moved by mistake (a new holder's, taken in between) is put back."""
    aside = lock.with_name(f"{lock.name}.{uuid.uuid4().hex[:8]}.stale")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    if (_holder(aside) or {}).get("token") != holder.get("token"):
        with suppress(FileExistsError):
            os.link(aside, lock)
    else:
        log.warning("cache: took over %s from %s@%s, which is gone", lock, holder.get("pid"), holder.get("host"))
    aside.unlink(missing_ok=True)


def _heartbeat(lock: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT):
        try:
            os.utime(lock)
        except FileNotFoundError:
            return
