"""Stage outputs cached by the config that produced them.

An entry is a folder `<root>/<stage>/<key>/`; the key hashes the stage's own config, the data's
fingerprint and the keys of the stages it read from, so a changed upstream setting invalidates it.
A stage builds into a scratch folder that is renamed into place only after `manifest.json` (size and sha256 of
every file, and the manifest's own sha256) is written. A lookup checks the manifest's own hash and every file's
size (FASTFORMERS_CACHE_VERIFY=full: every file's sha256 too); only a proven problem (a manifest that is not valid
JSON or not what it hashed, a listed file missing or of another size or content) gets the entry deleted and
rebuilt. An error reading it (a permission, an NFS hiccup) is retried, then raised as a FastformersError: the
entry is kept.

Nothing finished is lost: a build that fails (an exception, Ctrl-C, SIGTERM) keeps its scratch folder as
`.<key>.failed-<UTC time>-<id>`, and the next build of that key starts from it (the folder is renamed to its
scratch folder), so a stage can resume from what it holds; a successful build removes the key's failed folders,
and a key keeps at most one (the newest). A scratch folder's name carries its builder's identity (pid, process
start time, pid namespace and host: `.<key>.<id>.<pid>-<start>-<pidns>@<host>.tmp`); one whose builder is provably
gone (same host and pid namespace, pid gone or reused) was killed (kill -9) and is kept as a failed folder the
same way, the next time a stage of that kind looks up or builds an entry. Other builders' folders (a live one,
another host's or container's, the older names) are left alone.

Parallel jobs (a joblib or SLURM sweep) build each entry once: the builder holds the entry's build lock
`.<key>.lock`, a flufl.lock (NFS-safe: a hard link to a claim file) held as a lease of LEASE seconds that a
heartbeat thread refreshes every HEARTBEAT seconds; the others wait for the entry and then read it. Beside the
claim file the holder writes its identity (`<claim>.owner`), so waiters can say who builds. The lock is taken
over when its lease expired (flufl breaks it: a dead node, or a builder stalled for LEASE seconds), or at once when
its holder is provably gone (same host and pid namespace); a holder in another pid namespace (a container with the
same host name) or on another host is only judged by its lease. Releasing is flufl's unlock of a lock whose lease
the release itself refreshes, so no other process may break it in between.
"""

from __future__ import annotations

import ast
import errno
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import psutil
from flufl.lock import SEP, Lock, NotLockedError, TimeOutError

from fastformers.errors import FastformersError

log = logging.getLogger(__name__)
logging.getLogger("flufl.lock").setLevel(logging.CRITICAL)  # it logs breaking an expired lease as an error: ours warns

MANIFEST = "manifest.json"
LEASE = 180.0  # seconds a build lock lives unless refreshed: an expired lease belongs to a dead (or stalled) builder
HEARTBEAT = 30.0  # seconds between a builder's refreshes of its lease
POLL = 2.0  # seconds a waiting job tries the lock before it looks at the entry and the holder again
TRIES = 3  # reads of an entry before an OSError is reported (a network file system's hiccup passes)
RETRY_WAIT = 1.0  # seconds before the second read, doubled before each further one
VERIFY_ENV = "FASTFORMERS_CACHE_VERIFY"  # `sizes` (default): sizes and the manifest's hash; `full`: every file's sha256
OWNER_SUFFIX = ".owner"
SCRATCH = re.compile(
    r"^\.(?P<key>[^.]+)\.(?P<id>[0-9a-f]+)\.(?P<pid>\d+)-(?P<start>\d+)-(?P<ns>\d+)@(?P<host>[^.]*)\.tmp$"
)
FAILED = re.compile(r"^\.(?P<key>[^.]+)\.failed-(?P<when>\d{8}T\d{6}Z)-[0-9a-f]+$")
T = TypeVar("T")


def this_host() -> str:
    """The host name as a scratch folder's name holds it (no dots: they separate the name's parts)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())


def pid_namespace() -> int:
    """This process's pid namespace (containers sharing a host name have their own): pids compare only within one.
    0 where there is no /proc (not Linux): then only processes of that same kind of host are judged."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def start_time(pid: int) -> float | None:
    """When process `pid` started (None: it is gone), what tells a live process from a reused pid."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:  # a zombie too: it has exited
        return None


def owner_identity() -> dict:
    """Who this process is, in a form another process can check: host, pid namespace, pid, start time."""
    pid = os.getpid()
    return {"host": this_host(), "pid_ns": pid_namespace(), "pid": pid, "started": start_time(pid)}


def owner_gone(owner: dict) -> bool:
    """Whether `owner` is provably dead: on this host, in this pid namespace, its pid gone or now another process's.
    Another host's or namespace's owner is never provably gone (its pids are not ours to look at)."""
    if owner.get("host") != this_host() or owner.get("pid_ns") != pid_namespace():
        return False
    started = start_time(int(owner.get("pid", 0)))
    return started is None or (owner.get("started") is not None and abs(started - owner["started"]) > 0.05)


def owner_tag(owner: dict) -> str:
    """The owner as a scratch folder's name holds it: `<pid>-<start in 10 ms>-<pid namespace>@<host>`."""
    return f"{owner['pid']}-{round((owner['started'] or 0) * 100)}-{owner['pid_ns']}@{owner['host']}"


def owner_of_scratch(name: str) -> dict | None:
    """The builder a scratch folder's name records (None: an older name, without its start and namespace)."""
    match = SCRATCH.match(name)
    if match is None:
        return None
    return {"host": match["host"], "pid_ns": int(match["ns"]), "pid": int(match["pid"]),
            "started": int(match["start"]) / 100}  # fmt: skip


def code_fingerprint(*modules: str) -> str:
    """A hash of the code a stage runs: its module and every fastformers module it imports, transitively, each
    as its syntax tree without docstrings, so editing code rebuilds the entries it made, while comments,
    docstrings and formatting do not. Cost: one parse of ~40 files per process (tens of ms); a change to a
    shared module (models/loading.py, training/fit.py) rebuilds every stage that imports it."""
    digest = hashlib.sha256()
    for name in sorted(set().union(*(_imported_modules(module) for module in modules))):
        digest.update(name.encode() + _code_of(name).encode())
    return digest.hexdigest()[:16]


PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # fastformers/


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
    """`module` and the fastformers modules it imports, transitively (imports inside functions included, those
    for type checking only not)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = _source(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names if alias.name.startswith("fastformers")]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastformers"):
                todo.append(node.module)  # `from fastformers import x`: x may be a module of the package
                todo += [f"{node.module}.{alias.name}" for alias in node.names]
    return frozenset(seen)


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of a module except the bodies of `if TYPE_CHECKING:`: an import for type hints runs no code."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in ast.walk(child))
            continue
        yield node
        yield from _runtime_nodes(node)


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


def manifest_digest(manifest: dict) -> str:
    """The sha256 of a manifest without its own `manifest_sha256` field: a changed byte in it is proven damage."""
    rest = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()


def verify_mode() -> str:
    """How much a lookup checks: `sizes` (cheap: sizes and the manifest's hash) or `full` (every file's sha256)."""
    mode = os.environ.get(VERIFY_ENV, "sizes") or "sizes"
    if mode not in ("sizes", "full"):
        raise FastformersError(f"{VERIFY_ENV}={mode!r}: expected 'sizes' (the default) or 'full'")
    return mode


def patiently(read: Callable[[], T], entry: Path) -> T:
    """`read()`, retried TRIES times on an OSError (a transient NFS or permission problem proves nothing about the
    entry), then reported as a FastformersError that keeps the entry."""
    for attempt in range(TRIES):
        try:
            return read()
        except OSError as err:
            if attempt == TRIES - 1:
                raise FastformersError(
                    f"cache entry {entry}: could not read it after {TRIES} tries ({err}); it is kept, not rebuilt: "
                    "check the cache folder's permissions and file system, then run again"
                ) from err
            time.sleep(RETRY_WAIT * 2**attempt)
    raise AssertionError("unreachable")


def inspect_entry(folder: Path, full: bool) -> tuple[dict | None, str | None]:
    """(manifest, None) for an intact entry, (None, None) when there is none, (None, problem) for one proven damaged;
    an OSError when it could not be read."""
    if not folder.exists():
        return None, None
    try:
        manifest = json.loads((folder / MANIFEST).read_bytes())
    except FileNotFoundError:
        return None, "it has no manifest"
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return None, "its manifest is not valid JSON"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None, "its manifest has no file table"
    if "manifest_sha256" in manifest and manifest["manifest_sha256"] != manifest_digest(manifest):
        return None, "its manifest differs from its own sha256"
    for name, expected in manifest["files"].items():
        path = folder / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None, f"{name} is missing"
        if size != expected.get("size"):
            return None, f"{name} has {size} bytes, the manifest says {expected.get('size')}"
        if full and _sha256(path) != expected.get("sha256"):
            return None, f"{name}'s content differs from its sha256 in the manifest"
    return manifest, None


def failed_name(key: str) -> str:
    return f".{key}.failed-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


class StageCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lookup(self, stage: str, key: str) -> dict | None:
        """The manifest of a complete, intact entry; one proven damaged is deleted (so it gets rebuilt), one that
        cannot be read raises a FastformersError and is kept."""
        self.remove_orphans(stage)
        folder = self.entry(stage, key)
        full = verify_mode() == "full"
        manifest, problem = patiently(lambda: inspect_entry(folder, full), folder)
        if problem is not None:
            log.warning("cache entry %s is damaged (%s): deleted, it is rebuilt", folder, problem)
            shutil.rmtree(folder, ignore_errors=True)
        return manifest

    @contextmanager
    def build(self, stage: str, key: str, info: dict) -> Iterator[Path]:
        """Yields a scratch folder, holding the files of the key's last failed build if there was one; on success
        it becomes the entry, on failure (Ctrl-C and SIGTERM included) it is kept as the key's failed folder."""
        self.remove_orphans(stage)
        final = self.entry(stage, key)
        scratch = final.with_name(f".{key}.{uuid.uuid4().hex[:8]}.{owner_tag(owner_identity())}.tmp")
        if not self._adopt_failed(stage, key, scratch):
            scratch.mkdir(parents=True)
        try:
            yield scratch
            manifest = {**info, "stage": stage, "key": key, "files": _file_table(scratch)}
            manifest["manifest_sha256"] = manifest_digest(json.loads(json.dumps(manifest, default=str)))
            (scratch / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
            try:
                os.rename(scratch, final)
            except OSError:  # a parallel job finished the same entry first: keep theirs
                if inspect_entry(final, full=False)[0] is None:
                    raise
                shutil.rmtree(scratch, ignore_errors=True)
        except BaseException:
            self._keep_failed(stage, key, scratch, "the failed build's files are kept in")
            raise
        for folder in self._failed(stage, key):
            shutil.rmtree(folder, ignore_errors=True)

    def _failed(self, stage: str, key: str) -> list[Path]:
        """The key's failed folders, oldest first."""
        folder = self.root / stage
        found = [p for p in folder.glob(f".{key}.failed-*") if FAILED.match(p.name)] if folder.is_dir() else []
        return sorted(found, key=lambda p: p.name)

    def _keep_failed(self, stage: str, key: str, scratch: Path, saying: str) -> Path | None:
        """Renames a scratch folder to a failed folder, the key's only one (the newest): a disk does not fill."""
        kept = scratch.with_name(failed_name(key))
        try:
            os.rename(scratch, kept)
        except OSError as err:
            log.warning("cache: could not keep %s as a failed folder (%s)", scratch, err)
            return None
        for older in self._failed(stage, key):
            if older != kept and older.name < kept.name:
                shutil.rmtree(older, ignore_errors=True)
        log.warning("cache: %s %s (a re-run of stage %s resumes from them)", saying, kept, stage)
        return kept

    def _adopt_failed(self, stage: str, key: str, scratch: Path) -> bool:
        """Renames the key's newest failed folder to `scratch` (True), so a re-run starts from its files."""
        for failed in reversed(self._failed(stage, key)):
            try:
                os.rename(failed, scratch)
            except FileNotFoundError:  # adopted by another process in between
                continue
            log.warning("cache: stage %s starts from the files of its failed build %s", stage, failed)
            return True
        return False

    def remove_orphans(self, stage: str) -> list[Path]:
        """Keeps the stage's scratch folders whose builder is provably gone (killed: kill -9 gives it no chance to
        clean up) as failed folders, which the next build of their key adopts; returns the folders kept.
        Another host's, another pid namespace's (a container's), a live builder's and older names are left alone."""
        folder = self.root / stage
        if not folder.is_dir():
            return []
        kept = []
        for scratch in sorted(folder.glob(".*.tmp")):
            owner = owner_of_scratch(scratch.name)
            if owner is None or not owner_gone(owner):
                continue
            saying = f"the scratch folder of process {owner['pid']}, which is gone, is kept as"
            if (failed := self._keep_failed(stage, scratch.name.split(".")[1], scratch, saying)) is not None:
                kept.append(failed)
        return kept

    @contextmanager
    def claimed(self, stage: str, key: str) -> Iterator[bool]:
        """True: this process holds the entry's build lock and builds it. False: another process built the entry
        while this one waited (read it). A lock whose holder is dead is taken over (see the module's notes)."""
        lock = BuildLock(self.root / stage / f".{key}.lock")
        waiting_for = None
        try:
            while self.lookup(stage, key) is None:
                if lock.try_take():
                    break
                holder = lock.holder()
                if holder is not None and holder != waiting_for:
                    waiting_for = holder
                    print(f"stage {stage}: waiting for {holder['pid']}@{holder['host']}, which is building it",
                          flush=True)  # fmt: skip
            else:
                yield False
                return
            if self.lookup(stage, key) is not None:  # finished by another job between the look and the lock
                yield False
                return
            with lock.leased():
                yield True
        finally:
            lock.release()

    def wait_for(self, stage: str, key: str, idle_timeout: float) -> Path:
        """The entry another process (DDP's rank 0) writes: waits while its lock is held, or up to
        `idle_timeout` seconds for a build to start."""
        lock, idle_since = BuildLock(self.root / stage / f".{key}.lock"), time.monotonic()
        while self.lookup(stage, key) is None:
            if lock.holder() is not None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > idle_timeout:
                raise FastformersError(
                    f"stage {stage}: entry {self.entry(stage, key)} was not written within {idle_timeout:.0f} s "
                    "and nobody is building it (did rank 0 fail?)"
                )
            time.sleep(POLL)
        return self.entry(stage, key)


class BuildLock:
    """An entry's build lock: flufl.lock's lock held as a lease, with its holder's identity beside its claim file."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lock = Lock(str(path), lifetime=timedelta(seconds=LEASE))
        self.owner_file = Path(self.lock.claimfile + OWNER_SUFFIX)
        self.mine = False

    def try_take(self) -> bool:
        """Tries for about POLL seconds (flufl breaks an expired lease meanwhile); True once this process holds it."""
        if not self.owner_file.exists():
            self.owner_file.write_text(json.dumps(owner_identity()))
        try:
            self.lock.lock(timeout=timedelta(seconds=POLL))
        except TimeOutError:
            return False
        self.mine = True
        return True

    def holder(self) -> dict | None:
        """Who holds the lock while its lease lives (None: nobody). A holder provably gone loses it here, at once."""
        claim = _read(self.path)
        if claim is None:
            return None
        parts = claim.strip().split(SEP)
        if len(parts) != 4:  # not a flufl claim: a lock of an older fastformers, judged by its age
            if _expired(self.path, time.time()):
                log.warning("cache: removed %s, an old-style lock untouched for %.0f s", self.path, LEASE)
                self.path.unlink(missing_ok=True)
                return None
            return {"host": "?", "pid": "?"}
        owner = _owner(self._owner_file(claim)) or {"host": parts[1], "pid": parts[2]}
        if "pid_ns" in owner and owner_gone(owner):
            self._expire(claim, owner)
            return None
        return None if _expired(self.path, time.time()) else owner

    def _expire(self, claim: str, owner: dict) -> None:
        """Ends a dead holder's lease: the lock's inode opened here is the one whose claim names it, so a lock taken
        meanwhile by another process is never touched; flufl then breaks it as an expired one."""
        with suppress(FileNotFoundError), open(self.path) as stream:
            if stream.read() != claim:
                return
            os.utime(stream.fileno(), (0, 0))
            log.warning("cache: %s was held by %s@%s, which is gone: taken over", self.path, owner["pid"],
                        owner["host"])  # fmt: skip
        with suppress(OSError):
            self._owner_file(claim).unlink()

    def _owner_file(self, claim: str) -> Path:
        """Where a claim's holder wrote its identity: beside the lock (by name: other nodes may mount it elsewhere)."""
        return self.path.parent / (Path(claim.strip()).name + OWNER_SUFFIX)

    @contextmanager
    def leased(self) -> Iterator[None]:
        """Refreshes the lease every HEARTBEAT seconds while the build runs."""
        stop = threading.Event()
        heart = threading.Thread(target=self._beat, args=(stop,), daemon=True)
        heart.start()
        try:
            yield
        finally:
            stop.set()
            heart.join()

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT):
            try:
                self.lock.refresh()
            except NotLockedError:
                log.warning("cache: the build lock %s was taken over by another process", self.path)
                return
            except OSError as err:  # a hiccup: the next beat tries again, the lease has LEASE seconds
                log.warning("cache: could not refresh the build lock %s (%s)", self.path, err)

    def release(self) -> None:
        """flufl's unlock (its check refreshes the lease, so nobody breaks it before the unlink) and the owner file."""
        if self.mine:
            self.lock.unlock(unconditionally=True)
            self.mine = False
        with suppress(OSError):
            Path(self.lock.claimfile).unlink()
        self.owner_file.unlink(missing_ok=True)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno == errno.ESTALE:
            return None
        raise


def _owner(path: Path) -> dict | None:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _expired(path: Path, now: float) -> bool:
    """flufl's rule: a lock's mtime is the end of its lease (plus 10 s of clock slop); a gone lock is not expired."""
    try:
        return path.stat().st_mtime + 10 < now
    except FileNotFoundError:
        return False
