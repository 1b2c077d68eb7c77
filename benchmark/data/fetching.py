"""``fetch-data NAME``: a dataset its card says a script may fetch, downloaded from the Hugging Face Hub with its
real client, checked against the SHA-256 the Hub records for the file and unpacked into the card's layout.

The archive is downloaded to ``<data root>/.fetch/<file>.part`` with ``huggingface_hub``'s ``http_get``: a download
cut short (the connection dropped, the process killed) is resumed from the bytes already there by the next
``fetch-data`` (an HTTP ``Range`` request). A file whose bytes do not hash to the recorded SHA-256 is deleted and
refused, and nothing is unpacked. Unpacking goes to a scratch folder under ``.fetch/`` first, and the set's folder
is moved into place whole, so an interrupted unpack never leaves a half set. Sets behind a registration or a
Drive folder: one line saying where to get them and where to put them.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path

from benchmark.data.catalog import DatasetSpec
from benchmark.data.layout import SEGMENTATION_FOLDERS, file_sha256
from benchmark.errors import BenchmarkError

SHA256 = re.compile(r"[0-9a-f]{64}")
SCRATCH = ".fetch"
SKIPPED = ("__MACOSX", ".")  # folders of an archive that are never the set's


def _recorded(repo: str, name: str, etag: str | None, revision: str | None) -> str:
    """The SHA-256 the Hub records for an LFS file: its ``X-Linked-Etag``, else the file's LFS entry."""
    if etag and SHA256.fullmatch(etag):
        return etag
    from huggingface_hub import HfApi

    info = HfApi().get_paths_info(repo, [name], repo_type="dataset", revision=revision)
    lfs = info[0].lfs if info else None
    if lfs is None:
        raise BenchmarkError(f"fetch-data: {repo}/{name} is not stored with LFS: the Hub records no SHA-256 to check")
    return lfs.sha256


def download(repo: str, name: str, scratch: Path, revision: str | None = None) -> Path:
    """``name`` of the dataset repository ``repo`` in ``scratch``, resumed where an earlier try stopped and checked
    against the SHA-256 the Hub records (refused and deleted when it differs)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get

    meta = get_hf_file_metadata(hf_hub_url(repo, name, repo_type="dataset", revision=revision))
    expected = _recorded(repo, name, meta.etag, revision)
    scratch.mkdir(parents=True, exist_ok=True)
    done = scratch / Path(name).name
    if done.is_file() and file_sha256(done) == expected:
        return done
    part = done.with_name(done.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    if meta.size is not None and have > meta.size:
        part.unlink()
        have = 0
    if meta.size is None or have < meta.size:
        with part.open("ab") as fh:
            http_get(meta.location, fh, resume_size=have, expected_size=meta.size, displayed_filename=name)
    found = file_sha256(part)
    if found != expected:
        part.unlink()
        raise BenchmarkError(
            f"fetch-data: {repo}/{name}: the downloaded bytes hash to SHA-256 {found[:16]}..., the Hub records "
            f"{expected[:16]}...: refused and deleted, nothing unpacked (run fetch-data again)"
        )
    part.replace(done)
    return done


def _set_folder(scratch: Path, spec: DatasetSpec) -> Path | None:
    """The unpacked folder that holds the set's split folders (the archive's top, or a folder up to two levels
    down), or None."""
    splits = set(SEGMENTATION_FOLDERS.values()) if spec.layout == "medclipseg" else {"test", "valid"}
    level = [scratch]
    for _ in range(3):
        found = [f for f in level if splits & {c.name for c in f.iterdir() if c.is_dir()}]
        if found:
            return found[0] if len(found) == 1 else None
        level = [c for f in level for c in sorted(f.iterdir()) if c.is_dir() and not c.name.startswith(SKIPPED)]
    return None


def unpack(archive: Path, root: Path, spec: DatasetSpec) -> Path:
    """Unpack a zip archive so that ``root/spec.folder`` holds the set: the folder of the archive that holds its
    split folders (its top level, or a folder up to two levels down), moved into place whole. Members outside
    the archive's own tree are refused, and so is an archive without the set's split folders."""
    target = Path(root) / spec.folder
    scratch = archive.parent / f"unpack-{spec.name}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                if member.startswith(("/", "\\")) or ".." in Path(member).parts:
                    raise BenchmarkError(f"fetch-data: '{archive.name}' holds a member outside its folder: '{member}'")
            zf.extractall(scratch)
    except zipfile.BadZipFile as exc:
        archive.unlink()
        raise BenchmarkError(f"fetch-data: '{archive.name}' is not a zip archive ({exc}); deleted: the card's fetch: "
                             f"must name a zip archive ({spec.card or 'its card'})") from None  # fmt: skip
    source = _set_folder(scratch, spec)
    if source is None:
        tops = ", ".join(sorted(p.name for p in scratch.iterdir())[:6]) or "nothing"
        shutil.rmtree(scratch, ignore_errors=True)
        raise BenchmarkError(
            f"fetch-data: '{archive.name}' holds no one folder with the split folders of {spec.name}'s layout "
            f"(its top level: {tops}); see {spec.card or 'its card'}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    source.replace(target)
    shutil.rmtree(scratch, ignore_errors=True)
    return target


def fetch_data(spec: DatasetSpec, root: Path) -> Path | None:
    """The set of ``spec`` under ``root``, downloaded, checked and unpacked (None when its folder is there
    already: nothing is downloaded); a one-line error otherwise."""
    from benchmark.backbones.weights import download_failed, hub_unreachable

    fetch = spec.fetch
    target = Path(root) / spec.folder
    if spec.synthetic:
        raise BenchmarkError(f"fetch-data {spec.name}: a synthetic set: `python -m benchmark synth` writes it (or the "
                             "first run of a protocol that names it)")  # fmt: skip
    if fetch is None or fetch.manual:
        where = fetch.manual if fetch else f"no source is named in {spec.card or 'its card'}"
        raise BenchmarkError(f"fetch-data {spec.name}: not fetched by script: {where.rstrip('.')} (into '{target}')")
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()  # an empty folder is no copy
    if target.exists():
        return None
    assert fetch.hub and fetch.file
    by_hand = (f"or download {fetch.file} from https://huggingface.co/datasets/{fetch.hub} where there is a network "
               f"and unzip it so that '{target}' holds the set")  # fmt: skip
    problem = hub_unreachable()
    if problem:
        raise BenchmarkError(f"fetch-data {spec.name}: no network to download from: {problem}; run it again with a "
                             f"network, {by_hand}")  # fmt: skip
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        archive = download(fetch.hub, fetch.file, Path(root) / SCRATCH)
    except BenchmarkError:
        raise
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        raise BenchmarkError(f"fetch-data {spec.name}: the Hub has no file {fetch.file} in the dataset repository "
                             f"{fetch.hub} (check fetch: in {spec.card or 'its card'})") from None  # fmt: skip
    except Exception as exc:
        raise download_failed(spec.name, exc, "fetch-data") from None
    unpack(archive, root, spec)
    archive.unlink()
    return target
