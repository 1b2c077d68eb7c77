"""Data locks: the exact files a table came from, written by ``verify-data NAME --lock`` and checked by
``verify-data NAME --against LOCK`` and by ``run`` (a protocol's ``data_locks``) before any cell.

A lock is a JSON file: the SHA-256 of every file under the set's folder (hidden files, whose names start with
``.``, aside: no reader takes them), grouped by split folder; its content digest (the SHA-256 of the sorted
``path sha256`` lines: equal for equal files, whoever wrote the lock and when), which records and captions name;
and the test-set content hash that every record of a cell on that set carries (``test_content_hash``: the SHA-1
of the sorted SHA-1s of the test images). A lab commits it beside its protocol; another checks its copy with it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from benchmark.data.catalog import DatasetSpec
from benchmark.data.layout import read_split
from benchmark.data.splits import content_hash
from benchmark.errors import BenchmarkError

LOCK_VERSION = 1


def dataset_files(root: Path, spec: DatasetSpec) -> list[str]:
    """Every regular file under the set's folder, as sorted POSIX paths relative to it (hidden files aside)."""
    base = Path(root) / spec.folder
    if not base.is_dir():
        raise BenchmarkError(f"dataset '{spec.name}': folder '{base}' not found (see {spec.card or 'its card'})")
    out = []
    for folder, dirs, files in os.walk(base, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [Path(folder, f).relative_to(base).as_posix() for f in files if not f.startswith(".")]
    return sorted(out)


def file_digests(path: str) -> tuple[str, str]:
    """(SHA-256, SHA-1) of a file's bytes, read once."""
    sha256, sha1 = hashlib.sha256(), hashlib.sha1()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                sha256.update(block)
                sha1.update(block)
    except OSError as exc:
        raise BenchmarkError(f"file '{path}' cannot be read ({exc.strerror or exc})") from None
    return sha256.hexdigest(), sha1.hexdigest()


def content_digest(files: dict[str, str]) -> str:
    """The SHA-256 of a copy's sorted ``path sha256`` lines: what records and captions name a lock by."""
    return hashlib.sha256("".join(f"{n} {files[n]}\n" for n in sorted(files)).encode()).hexdigest()


@dataclass(frozen=True)
class Snapshot:
    """What a lock holds of one copy: every file's SHA-256 and (when asked for) the test-set content hash."""

    files: dict[str, str]  # relative path -> SHA-256
    test_content_hash: str | None = None


def snapshot(
    root: Path, spec: DatasetSpec, workers: int = 1, progress: bool = False, test_hash: bool = False
) -> Snapshot:
    """Every file's SHA-256, hashed in ``workers`` processes; ``test_hash``: and the test split's content hash
    (the test split must then read as a run reads it)."""
    from benchmark.data.verify import parallel

    base = Path(root) / spec.folder
    names = dataset_files(root, spec)
    digests = dict(zip(names, parallel(file_digests, [str(base / n) for n in names], workers, progress, "hashing"),
                       strict=True))  # fmt: skip
    if not test_hash:
        return Snapshot({n: d[0] for n, d in digests.items()})
    sha1s = []
    for sample in read_split(root, spec, "test"):
        name = Path(sample.path).relative_to(base).as_posix()
        sha1s.append((digests.get(name) or file_digests(sample.path))[1])
    return Snapshot({n: d[0] for n, d in digests.items()}, content_hash(sha1s))


def write_lock(root: Path, spec: DatasetSpec, out: Path, workers: int = 1, progress: bool = False) -> Snapshot:
    """Write the lock of the copy of ``spec`` under ``root`` to ``out`` (its test split must read as a run reads
    it: the lock holds its content hash)."""
    try:
        snap = snapshot(root, spec, workers, progress, test_hash=True)
    except BenchmarkError as exc:
        raise BenchmarkError(f"verify-data {spec.name} --lock: no lock written: {exc}") from None
    splits: dict[str, dict[str, str]] = {}
    for name, digest in snap.files.items():
        top = name.split("/", 1)[0] if "/" in name else "."
        splits.setdefault(top, {})[name] = digest
    lock = {
        "lock_version": LOCK_VERSION,
        "dataset": spec.name,
        "folder": spec.folder,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "algorithm": "sha256",
        "files": len(snap.files),
        "content_sha256": content_digest(snap.files),
        "test_content_hash": snap.test_content_hash,
        "splits": splits,
    }
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(lock, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        partial.replace(out)
    except OSError as exc:
        if partial.is_file():
            partial.unlink()
        raise BenchmarkError(
            f"verify-data {spec.name} --lock: '{out}' cannot be written ({exc.strerror or exc})"
        ) from None
    return snap


@dataclass(frozen=True)
class Lock:
    """A lock file as read: the dataset it locks, its files' SHA-256 and the test-set content hash."""

    path: Path
    dataset: str
    files: dict[str, str]
    test_content_hash: str
    digest: str  # content_digest of its files: what records and captions name

    def label(self) -> str:
        return f"{self.path} (content {self.digest[:12]})"


def lock_label(path: str | Path) -> str:
    """How records, MLflow tags and table captions name a lock: its path and the start of its content digest
    (equal for equal files, whoever wrote the lock and when)."""
    return _read_lock(str(path), os.stat(path).st_mtime_ns).label()


@functools.lru_cache(maxsize=64)
def _read_lock(path: str, _mtime_ns: int) -> Lock:
    return read_lock(path)


def read_lock(path: str | Path, spec: DatasetSpec | None = None) -> Lock:
    """A lock file, checked; a one-line error naming the file and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(
            f"data lock '{path}' not found (write one with `python -m benchmark verify-data NAME --lock`)"
        )
    try:
        data = json.loads(path.read_bytes())
        files = {n: d for split in data["splits"].values() for n, d in split.items()}
        lock = Lock(path, data["dataset"], files, data["test_content_hash"], content_digest(files))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise BenchmarkError(f"data lock '{path}': not a lock file (expected the JSON `verify-data --lock` writes, "
                             f"version {LOCK_VERSION})") from None  # fmt: skip
    if data.get("lock_version") != LOCK_VERSION:
        raise BenchmarkError(f"data lock '{path}': lock_version {data.get('lock_version')!r}, this harness reads "
                             f"{LOCK_VERSION}")  # fmt: skip
    if spec is not None and lock.dataset != spec.name:
        raise BenchmarkError(f"data lock '{path}' is the lock of dataset '{lock.dataset}', not '{spec.name}'")
    return lock


@dataclass(frozen=True)
class Differences:
    """How a copy differs from its lock: the files added, missing and changed (relative paths, sorted)."""

    added: list[str]
    missing: list[str]
    changed: list[str]

    def __bool__(self) -> bool:
        return bool(self.added or self.missing or self.changed)

    def by_kind(self) -> tuple[tuple[str, list[str]], ...]:
        return (("changed", self.changed), ("missing", self.missing), ("added", self.added))

    def counted(self) -> str:
        return ", ".join(f"{len(names)} {kind}" for kind, names in self.by_kind() if names)

    def first(self) -> str:
        return next((f"{kind}: {names[0]}" for kind, names in self.by_kind() if names), "")

    def lines(self) -> list[str]:
        """Every differing file, one line each."""
        return [f"  {kind}: {n}" for kind, names in self.by_kind() for n in names]


def compare(lock: Lock, files: dict[str, str]) -> Differences:
    """The files of a copy (relative path -> SHA-256) against a lock's."""
    return Differences(
        added=sorted(set(files) - set(lock.files)),
        missing=sorted(set(lock.files) - set(files)),
        changed=sorted(n for n in set(files) & set(lock.files) if files[n] != lock.files[n]),
    )


def check_lock(root: Path, spec: DatasetSpec, path: str | Path, workers: int = 1) -> tuple[Lock, Differences]:
    """The lock at ``path`` and how the copy under ``root`` differs from it."""
    lock = read_lock(path, spec)
    return lock, compare(lock, snapshot(root, spec, workers).files)


def lock_problems(locks: dict[str, str], catalog: dict[str, DatasetSpec], root: Path, workers: int = 1) -> list[str]:
    """One line for each locked dataset whose copy under ``root`` differs from its lock, naming the first file."""
    problems = []
    for name, path in locks.items():
        try:
            _, differences = check_lock(root, catalog[name], path, workers)
        except BenchmarkError as exc:
            problems.append(f"data_locks.{name}: {exc}")
            continue
        if differences:
            problems.append(
                f"dataset '{name}': the copy under '{Path(root) / catalog[name].folder}' differs from its lock "
                f"'{path}' ({differences.counted()}; first {differences.first()}); `python -m benchmark verify-data "
                f"{name} --data-root {root} --against {path}` lists every file"
            )
    return problems
