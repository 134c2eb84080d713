"""The artifact store: versioned stage outputs, published atomically.

A stage's version is a hash of its name, its effective parameters, its upstream versions and a
fingerprint of the project source files it runs. Its output lives in
``<root>/<Stage>/<version>/`` next to a ``manifest.json`` that is written last; the directory
is built under ``<root>/<Stage>/.scratch-<version>/`` and renamed into place, so nothing that
looks complete is ever half-written. A build may keep resumable state in ``<scratch>/resume/``;
a failed build keeps its scratch directory only when that state exists.

Every payload file is hashed once, at publish, while it is still in the page cache. Opening an
artifact checks each file's size and stat stamp (size, mtime, ctime, inode) against a cache of
files already verified in full, and rehashes only the files whose stamp changed: any write to a
file, or any attempt to set its times back, moves its ctime, so an altered or truncated file is
always rehashed and caught, and an untouched one costs one ``stat``.
"""
from __future__ import annotations

import ast
import concurrent.futures
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import sys
import time
from importlib import metadata
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("pipeline", "tasks", "kernels")
ROOT_ENV = "PIPELINE_ARTIFACTS"
MANIFEST = "manifest.json"
RESUME_DIR = "resume"
BROKEN_PREFIX = ".broken-"
SCRATCH_PREFIX, LOCK_PREFIX = ".scratch-", ".lock-"
# the store's mark on every directory it creates (a build's scratch, which becomes the published
# version and maybe a .broken- copy): gc removes only what holds it, never a user's files
MARKER = ".pipeline-store.json"
CRASH_ENV = "PIPELINE_CRASH_AT"  # fault injection for the crash tests: a publish step's name
LIBRARIES = ("torch", "numpy", "luigi", "h5py", "scikit-learn", "safetensors", "tokenizers")


def artifacts_root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or PROJECT_ROOT / "artifacts").resolve()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Code fingerprint: the project modules a stage imports, hashed as syntax trees so that comment,
# whitespace and docstring edits do not count.

def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _stamped(fn):
    """Cache ``fn(path)`` per process, keyed by the file's mtime and size: every stage of a graph
    follows the same modules, and a luigi or status run computes a dozen stages' fingerprints."""
    cached = functools.lru_cache(maxsize=None)(lambda path, stamp: fn(path))

    @functools.wraps(fn)
    def wrapper(path: Path):
        st = Path(path).stat()
        return cached(Path(path), (st.st_mtime_ns, st.st_size))
    return wrapper


@_stamped
def normalised_source_hash(path: Path) -> str:
    tree = _strip_docstrings(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()


def module_file(name: str) -> Path | None:
    """The source file of a project module given its dotted name, or None if not in the project."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = PROJECT_ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(PROJECT_ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@_stamped
def imported_modules(path: Path) -> frozenset[str]:
    """Dotted names of project modules that ``path`` imports anywhere (top level or in functions).

    Parent packages' ``__init__`` files run implicitly on import but are not followed: a package
    ``__init__`` that gathers every stage would otherwise make each stage depend on all others.
    """
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:  # a submodule, or a name defined in the module ``base``
                sub = f"{base}.{alias.name}"
                found.add(sub if module_file(sub) is not None else base)
    return frozenset(m for m in found if module_file(m) is not None)


def code_files(entry_modules: list[str], exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """{project-relative path: normalised hash} for the entry modules and everything they import,
    not following the ``exclude`` modules (upstream stages, whose versions already cover them)."""
    todo = [module_file(m) for m in entry_modules]
    if any(p is None for p in todo):
        raise ValueError(f"entry modules {entry_modules} are not all project modules")
    skip = {module_file(m) for m in exclude}
    seen: dict[Path, str] = {}
    while todo:
        path = todo.pop()
        if path in seen or path in skip:
            continue
        seen[path] = normalised_source_hash(path)
        native = path.with_suffix(".c")  # a module's C companion (kernels/moe_gemv.c) is its code too
        if native.is_file():
            seen[native] = hashlib.sha256(native.read_bytes()).hexdigest()
        todo.extend(module_file(m) for m in imported_modules(path))
    return {str(p.relative_to(PROJECT_ROOT)): h for p, h in sorted(seen.items())}


# ---------------------------------------------------------------------------------------------
# Specs, manifests and the store.

@dataclasses.dataclass(frozen=True)
class StageSpec:
    """Everything that determines a stage's output, and so its version."""
    stage: str
    params: dict
    upstream: dict  # upstream stage name -> version
    code: dict  # project-relative path -> normalised source hash

    @property
    def code_fingerprint(self) -> str:
        return sha256_json(self.code)[:16]

    @property
    def version(self) -> str:
        return sha256_json({"stage": self.stage, "params": self.params, "upstream": self.upstream,
                            "code": self.code_fingerprint})[:16]


def library_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


class StoreBusy(RuntimeError):
    pass


class CorruptArtifact(RuntimeError):
    pass


class AlreadyPublished(Exception):
    """The version was published (by another run, or recovered from a finished scratch directory)
    while this run waited for it."""


@dataclasses.dataclass
class Artifact:
    """A published stage output: its directory and manifest."""
    path: Path
    manifest: dict

    @property
    def version(self) -> str:
        return self.manifest.get("version")

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    def file(self, name: str) -> Path:
        if name not in self.manifest.get("files", {}):
            raise FileNotFoundError(f"{self.path}: artifact has no file '{name}' "
                                    f"(it holds: {', '.join(sorted(self.manifest.get('files', {})))})")
        return self.path / name

    def verify(self, verified: dict | None = None) -> None:
        """Check every payload file against the size and sha256 recorded at publish time. Files
        whose stat stamp is in ``verified`` with the recorded hash are not read again; the
        stamps of the files hashed here are added to it."""
        todo = []
        for name, info in self.manifest.get("files", {}).items():
            p = self.path / name
            try:
                stamp = _stamp(p)
            except FileNotFoundError:
                raise CorruptArtifact(f"{p} is missing; {broken(self.path)}") from None
            if stamp[0] != info["bytes"]:
                raise CorruptArtifact(f"{p} is {stamp[0]} bytes, its manifest recorded {info['bytes']} "
                                      f"(truncated or altered); {broken(self.path)}")
            if verified is None or verified.get(str(p)) != [stamp, info["sha256"]]:
                todo.append((p, stamp, info["sha256"]))
        for (p, stamp, expected), actual in zip(todo, _hash_files([p for p, _, _ in todo])):
            if actual != expected:
                raise CorruptArtifact(f"{p} does not match its recorded checksum (altered after it was "
                                      f"published); {broken(self.path)}")
            if verified is not None:
                verified[str(p)] = [stamp, expected]

def _hash_files(paths: list[Path], fsync: bool = False) -> list[str]:
    """sha256 of each file, several at a time (hashlib releases the GIL on large blocks)."""
    def one(p: Path) -> str:
        digest = sha256_file(p)
        if fsync:
            _fsync(p)
        return digest

    if len(paths) < 2:
        return [one(p) for p in paths]
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, len(paths))) as pool:
        return list(pool.map(one, paths))


def broken(path: Path) -> str:
    return (f"the artifact {path} is broken: rerun the pipeline (the same luigi or make command) and it moves "
            f"the broken version aside and rebuilds it")


def _stamp(p: Path) -> list[int]:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class Build:
    """A stage build in progress, in its scratch directory."""

    def __init__(self, path: Path):
        self.path = path
        self.metrics: dict = {}
        self.timings: dict = {}
        self.extra: dict = {}  # free-form manifest fields (e.g. the source of an import)

    @property
    def resume_dir(self) -> Path:
        return self.path / RESUME_DIR

    @property
    def rank_logs(self) -> Path:
        """Where torchrun keeps each rank's output: kept with the resume state when the build
        fails, removed with it on publish."""
        return self.resume_dir / "ranks"

    @property
    def resumable(self) -> bool:
        return self.resume_dir.is_dir() and any(self.resume_dir.iterdir())

    @contextlib.contextmanager
    def timed(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 3)


class Store:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else artifacts_root()
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"the artifact store {self.root} is not a directory; point {ROOT_ENV} at a directory "
                             f"(it is created when missing)")

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def version_dir(self, stage: str, version: str) -> Path:
        return self.stage_dir(stage) / version

    def manifest_path(self, stage: str, version: str) -> Path:
        return self.version_dir(stage, version) / MANIFEST

    def get(self, stage: str, version: str) -> Artifact | None:
        path = self.version_dir(stage, version)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            if path.is_dir():  # only a rename publishes a version, and only with its manifest
                raise CorruptArtifact(f"{path / MANIFEST} is missing (removed after it was published); "
                                      f"{broken(path)}") from None
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptArtifact(f"{path / MANIFEST} is not valid JSON ({e}); {broken(path)}") from e
        return Artifact(path, manifest)

    def versions(self, stage: str) -> list[Artifact]:
        """Published versions of a stage, oldest first."""
        out = []
        d = self.stage_dir(stage)
        if d.is_dir():
            for child in d.iterdir():
                if not child.name.startswith(".") and child.is_dir():
                    with contextlib.suppress(CorruptArtifact):
                        a = self.get(stage, child.name)
                        if a is not None and (a.manifest.get("stage"), a.version) == (stage, child.name):
                            out.append(a)
        return sorted(out, key=lambda a: a.manifest.get("created", ""))

    @property
    def _verified_path(self) -> Path:
        return self.root / ".cache" / "verified.json"

    @contextlib.contextmanager
    def _verified(self):
        """The cache of verified file stamps, saved back when it changed and the store can be
        written (on a read-only store, a team's published models, every file is hashed instead)."""
        try:
            cache = json.loads(self._verified_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            cache = {}
        before = dict(cache)
        try:
            yield cache
        finally:
            if cache != before:
                try:
                    self._verified_path.parent.mkdir(parents=True, exist_ok=True)
                    _write_json_durably(self._verified_path, cache, unique_tmp=True)
                except OSError as e:
                    if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                        raise

    def verify(self, artifact: Artifact, full: bool = False) -> None:
        """Verify ``artifact`` (see :meth:`Artifact.verify`), reading only files not verified
        since they last changed unless ``full``; raises CorruptArtifact."""
        with self._verified() as cache:
            if full:
                for name in artifact.manifest.get("files", {}):
                    cache.pop(str(artifact.path / name), None)
            artifact.verify(cache)

    def lock_path(self, stage: str, version: str) -> Path:
        return self.stage_dir(stage) / f".lock-{version}"

    def unless_building(self, stage: str, version: str, create: bool = True):
        """A context that holds the version's build lock, so that its files can be removed while
        no run builds it; it yields None, or the pid of the run that is building it."""
        return _unless_locked(self.lock_path(stage, version), create)

    def quarantine(self, stage: str, version: str) -> Path:
        """Move a broken published version aside (``.broken-<version>-<time>``), so that it is
        rebuilt and its files stay for inspection until ``make gc``."""
        stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S%f")
        target = self.stage_dir(stage) / f"{BROKEN_PREFIX}{version}-{stamp}"
        with contextlib.suppress(FileNotFoundError):  # another run moved it first
            os.rename(self.version_dir(stage, version), target)
        return target

    def stages(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if self.root.is_dir() else []

    def scratch_dir(self, stage: str, version: str) -> Path:
        return self.stage_dir(stage) / f"{SCRATCH_PREFIX}{version}"

    def partial(self, stage: str, version: str) -> Path | None:
        """The resume directory of an unfinished build of the version that holds progress (a rerun
        continues from it), or None."""
        scratch = self.scratch_dir(stage, version)
        build = Build(scratch)
        return build.resume_dir if store_wrote(scratch, stage) and build.resumable else None

    @contextlib.contextmanager
    def publishing(self, spec: StageSpec, wait: bool = True):
        """Build ``spec`` in its scratch directory and publish it on success.

        Yields a :class:`Build`. Only one process builds a given version at a time: another one
        waits for it (or, with ``wait=False``, raises StoreBusy) and then raises AlreadyPublished.
        """
        stage_dir = self.stage_dir(spec.stage)
        stage_dir.mkdir(parents=True, exist_ok=True)
        scratch = stage_dir / f".scratch-{spec.version}"
        with _exclusive(stage_dir / f".lock-{spec.version}", spec, wait):
            if self.get(spec.stage, spec.version) is not None:
                raise AlreadyPublished(f"{spec.stage} {spec.version} was published by another run meanwhile")
            if self._recover(spec, scratch):
                raise AlreadyPublished(f"{spec.stage} {spec.version} was finished by a run that stopped "
                                       f"before publishing it; published it without rebuilding")
            build = Build(scratch)
            if scratch.exists() and not build.resumable:  # what a killed run left half-written
                shutil.rmtree(scratch)
            scratch.mkdir(exist_ok=True)
            _write_json_durably(scratch / MARKER, {"stage": spec.stage, "version": spec.version})
            start = time.time()
            try:
                yield build
                build.timings["total"] = round(time.time() - start, 3)
                self._finish(spec, build)
            except BaseException:
                if not build.resumable and scratch.exists():
                    shutil.rmtree(scratch, ignore_errors=True)
                raise

    def _recover(self, spec: StageSpec, scratch: Path) -> bool:
        """Publish a scratch directory whose build finished (its manifest written and every file
        matching it) but whose run died before the rename; otherwise drop its stale manifest."""
        try:
            manifest = json.loads((scratch / MANIFEST).read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            (scratch / MANIFEST).unlink(missing_ok=True)
            return False
        try:
            if manifest.get("version") != spec.version:
                raise CorruptArtifact("manifest of another version")
            Artifact(scratch, manifest).verify()
        except CorruptArtifact:
            (scratch / MANIFEST).unlink()
            return False
        shutil.rmtree(scratch / RESUME_DIR, ignore_errors=True)
        os.rename(scratch, self.version_dir(spec.stage, spec.version))
        _fsync(scratch.parent)
        return True

    def _finish(self, spec: StageSpec, build: Build) -> None:
        paths = [p for p in sorted(build.path.rglob("*"))
                 if p.is_file() and p.relative_to(build.path).parts[0] not in (RESUME_DIR, MARKER)]
        # fsync: the manifest must never outlive its payload on a power cut
        files = {str(p.relative_to(build.path)): {"bytes": p.stat().st_size, "sha256": digest}
                 for p, digest in zip(paths, _hash_files(paths, fsync=True))}
        manifest = {
            "stage": spec.stage,
            "version": spec.version,
            "params": spec.params,
            "upstream": spec.upstream,
            "code": {"fingerprint": spec.code_fingerprint, "files": spec.code},
            "metrics": build.metrics,
            "timings": build.timings,
            "files": files,
            "libraries": library_versions(),
            # what the build's progress held beside the payload when it was published (then removed)
            "resume_bytes_at_publish": sum(p.stat().st_size for p in build.resume_dir.rglob("*") if p.is_file()),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"),
            **build.extra,
        }
        if (bad := non_finite(manifest)) is not None:
            raise ValueError(f"{spec.stage}: {bad[0]} is {bad[1]}, not a finite number; the stage failed and "
                             f"nothing was published (a non-finite result means the model or its inputs hold "
                             f"NaN or infinite values)")
        _crash_point("before-manifest")
        _write_json_durably(build.path / MANIFEST, manifest)
        _fsync(build.path)
        # the resume state goes only now: a crash before the manifest is written resumes from it
        shutil.rmtree(build.resume_dir, ignore_errors=True)
        _crash_point("before-rename")
        final = self.version_dir(spec.stage, spec.version)
        os.rename(build.path, final)
        _crash_point("after-rename")
        _fsync(build.path.parent)
        # the files were just hashed: record them as verified, so that opening them costs a stat
        with self._verified() as cache:
            for name, info in files.items():
                cache[str(final / name)] = [_stamp(final / name), info["sha256"]]


_VERSION = re.compile(r"[0-9a-f]{16}")
_BROKEN = re.compile(r"\.broken-([0-9a-f]{16})-[0-9]{8}T[0-9]{12}")


def store_wrote(path: Path, stage: str) -> bool:
    """Whether ``path``, an entry of the stage directory ``stage``, is the store's own: a version's
    lock file, or a directory holding the store's marker (or, for a version published before
    markers existed, a manifest) that names this stage and the version its name carries."""
    name = path.name
    if name.startswith(LOCK_PREFIX):
        return path.is_file() and _VERSION.fullmatch(name.removeprefix(LOCK_PREFIX)) is not None
    broken_name = _BROKEN.fullmatch(name)
    version = broken_name.group(1) if broken_name else name.removeprefix(SCRATCH_PREFIX)
    if not path.is_dir() or _VERSION.fullmatch(version) is None:
        return False
    for record in (MARKER, *(() if name.startswith(SCRATCH_PREFIX) else (MANIFEST,))):
        try:
            found = json.loads((path / record).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(found, dict) and found.get("stage") == stage and found.get("version") == version:
            return True
    return False


def save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """Write a safetensors file under a temporary name and rename it into place, so a reader never
    sees half a file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp), metadata=metadata)
    _canonical_header(tmp)
    os.replace(tmp, path)


def _canonical_header(path: Path) -> None:
    """Rewrite a safetensors header with its keys sorted, in place and at the same length: the
    library writes metadata in hash-map order, which differs between processes, and a rebuilt
    artifact must be identical byte for byte."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) <= size:
            f.seek(8)
            f.write(canonical.ljust(size, b" "))


def _crash_point(name: str) -> None:
    """Fault injection for the crash tests: SIGKILL this process group at the named step."""
    if os.environ.get(CRASH_ENV) == name:
        os.killpg(os.getpgrp(), signal.SIGKILL)


def non_finite(obj, where: str = "") -> tuple[str, float] | None:
    """(the dotted key, the value) of the first NaN or infinite number in a JSON-like ``obj``, or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "the value", obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        if (found := non_finite(value, f"{where}.{key}" if where else str(key))) is not None:
            return found
    return None


def _write_json_durably(path: Path, obj, unique_tmp: bool = False) -> None:
    # unique_tmp: for files several processes may rewrite at once (caches)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp") if unique_tmp else path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, allow_nan=False)  # NaN is not JSON
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    """fsync a file, or a directory (its entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _exclusive(lock_path: Path, spec: StageSpec, wait: bool):
    """Hold the version's lock; the file names the holder's pid for whoever waits on it. The
    kernel drops the lock when the holder dies, however it dies."""
    with open(lock_path, "a+") as f:
        holder = _try_flock(f)
        if holder is not None:
            if not wait:
                raise StoreBusy(f"another run (pid {holder}) is building {spec.stage} version {spec.version} "
                                f"(lock {lock_path} is held); wait for it to finish or stop it")
            print(f"{spec.stage} {spec.version}: another run (pid {holder}) is building it; waiting for it "
                  f"to finish", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)


def _try_flock(f) -> str | None:
    """Take the lock of the open file ``f`` without waiting: None when taken, else the holder's pid
    as the file names it."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
    f.seek(0)
    return f.read().strip() or "unknown"


@contextlib.contextmanager
def _unless_locked(lock_path: Path, create: bool = True):
    """Yield None while holding ``lock_path``'s lock (no run can start building meanwhile), or the
    pid of the process that holds it. Without ``create``, a missing lock file (no run ever took
    it) yields None and creates nothing."""
    if not create and not lock_path.exists():
        yield None
        return
    with open(lock_path, "a+") as f:
        holder = _try_flock(f)
        if holder is not None:
            yield holder
            return
        try:
            yield None
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# Content hashes of large external inputs (checkpoints), cached by path, size and mtime so that a
# no-op rerun does not reread gigabytes.

def content_hash(path: Path, store: Store | None = None) -> str:
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stamp = [[str(p.relative_to(path) if path.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns]
             for p in files]
    cache_file = (store or Store()).root / ".cache" / "content-hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        cache = {}
    key = str(path)
    if cache.get(key, {}).get("stamp") == stamp:
        return cache[key]["sha256"]
    digest = sha256_json([(name, sha256_file(p)) for (name, _, _), p in zip(stamp, files)])
    cache[key] = {"stamp": stamp, "sha256": digest}
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    _write_json_durably(cache_file, cache)
    return digest


def describe_changes(spec: StageSpec, previous: dict) -> list[str]:
    """Why ``spec`` differs from a previously published manifest, one sentence per difference."""
    reasons = []
    old_params = previous.get("params", {})
    for key in sorted(set(spec.params) | set(old_params)):
        old, new = old_params.get(key, "<unset>"), spec.params.get(key, "<unset>")
        if old != new:
            reasons.append(f"parameter {key} changed from {old!r} to {new!r}")
    old_code = previous.get("code", {}).get("files", {})
    for path in sorted(set(spec.code) | set(old_code)):
        if path not in old_code:
            reasons.append(f"source file {path} is new to this stage")
        elif path not in spec.code:
            reasons.append(f"source file {path} is no longer used")
        elif old_code[path] != spec.code[path]:
            reasons.append(f"source file {path} changed")
    old_up = previous.get("upstream", {})
    for name in sorted(set(spec.upstream) | set(old_up)):
        if old_up.get(name) != spec.upstream.get(name):
            reasons.append(f"upstream {name} changed from {old_up.get(name)} to {spec.upstream.get(name)}")
    return reasons or [f"version {spec.version} differs from {previous.get('version')} for another reason"]

