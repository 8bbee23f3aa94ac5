"""Careful file handling for data: atomic writes, checksums, downloads, safe extraction, completion markers.

The rules that keep a half-done step from ever looking done:
- a file is written under a temporary name and renamed when complete (`write_atomic`, `download_url`);
- a dataset folder is built in `<folder>.partial` and renamed when complete (`staging`), and holds a
  completion marker written last; a leftover `.partial` folder or `.part` file is from an interrupted run and
  is redone from scratch;
- an archive member that would land outside the target folder (absolute path, `..`, a link pointing out)
  refuses the whole archive.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Any

from sa2vp.atomic import write_atomic  # noqa: F401  (re-exported: the data sources use it)
from sa2vp.data.errors import ChecksumError, DataError, MissingDataError, UnsafeArchiveError
from sa2vp.data.progress import NO_PROGRESS, Progress

MARKER = ".sa2vp-complete"
_CHUNK = 1 << 20


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


def verify_checksum(path: Path, expected: str) -> None:
    """Check a file against `md5:<hex>` or `sha256:<hex>`; ChecksumError names the file and both values."""
    algorithm, _, want = expected.partition(":")
    if algorithm not in ("md5", "sha256") or not want:
        raise ValueError(f"checksum {expected!r}: expected 'md5:<hex>' or 'sha256:<hex>'")
    got = file_digest(path, algorithm)
    if got != want.lower():
        raise ChecksumError(
            f"{path}: {algorithm} is {got}, the publisher's is {want} — the file is corrupt or incomplete; "
            f"delete it and run again (or set data.verify_checksums=false to accept it)"
        )


def download_url(url: str, dest: Path, checksum: str | None = None, progress: Progress = NO_PROGRESS) -> Path:
    """Download `url` to `dest` via `dest.part`; a complete `dest` (right checksum) is kept as it is."""
    dest = Path(dest)
    if dest.is_file():
        if checksum is None:
            return dest
        try:
            verify_checksum(dest, checksum)
            return dest
        except ChecksumError:
            dest.unlink()  # a complete file with the wrong content: fetch it again
    part = dest.with_name(dest.name + ".part")
    part.unlink(missing_ok=True)  # left by an interrupted download: start over
    dest.parent.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(url, headers={"User-Agent": "sa2vp (https://pypi.org/project/sa2vp)"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with progress(f"downloading {dest.name}", total, "B") as advance:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    advance(len(chunk))
    except (urllib.error.URLError, OSError) as exc:
        part.unlink(missing_ok=True)
        raise DataError(f"could not download {url}: {exc}; check the connection, or put the file at {dest}") from None
    if checksum is not None:
        verify_checksum(part, checksum)
    os.replace(part, dest)
    return dest


@contextmanager
def staging(dest: Path) -> Iterator[Path]:
    """A fresh `<dest>.partial` folder to build in; it becomes `dest` when the block ends without error."""
    dest = Path(dest)
    if dest.exists():
        raise DataError(f"{dest} already exists; remove it to rebuild it")
    tmp = dest.with_name(dest.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted run
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(dest)


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The completion marker's content, or None if the folder is not marked complete."""
    try:
        return json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def mark_complete(folder: Path, details: Mapping[str, Any]) -> None:
    """Write the completion marker (last, after everything else in the folder is in place)."""
    write_atomic(Path(folder) / MARKER, json.dumps(dict(details), indent=2, sort_keys=True) + "\n")


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """Copy a folder, hard-linking files where the file system allows (no second copy of the bytes)."""

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link_or_copy, dirs_exist_ok=True)


# --- archives ---------------------------------------------------------------------------------------------

Select = Callable[[str], str | None]  # archive member name → name inside the target, or None to skip it


def archive_names(archive: Path) -> list[str]:
    """The member names of a zip or tar archive (reads a tar's whole index)."""
    archive = Path(archive)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            return zf.namelist()
    with _open_tar(archive) as tf:
        return tf.getnames()


def extract(archive: Path, dest: Path, select: Select | None = None, progress: Progress = NO_PROGRESS) -> int:
    """Extract the selected members of a zip or tar archive into `dest`; returns the number of files.

    Every member is checked before it is written: an absolute path, a `..` component or a link whose target
    lies outside `dest` raises UnsafeArchiveError naming the archive and the member.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise MissingDataError(f"{archive}: archive not found")
    dest.mkdir(parents=True, exist_ok=True)
    select = select or (lambda name: name)
    if zipfile.is_zipfile(archive):
        return _extract_zip(archive, dest, select, progress)
    return _extract_tar(archive, dest, select, progress)


def _open_tar(archive: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(archive, "r:*")
    except tarfile.TarError as exc:
        raise DataError(f"{archive}: not a zip or tar archive, or damaged ({exc})") from None


def _extract_zip(archive: Path, dest: Path, select: Select, progress: Progress) -> int:
    files = 0
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        with progress(f"extracting {archive.name}", len(members), "files") as advance:
            for info in members:
                advance(1)
                target = _target(archive, dest, info.filename, select)
                if target is None:
                    continue
                if stat.S_ISLNK(info.external_attr >> 16):
                    _link(archive, dest, info.filename, target, zf.read(info).decode("utf-8"), symbolic=True)
                elif info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                else:
                    with zf.open(info) as src:
                        _write_member(src, target)
                    files += 1
    return files


def _extract_tar(archive: Path, dest: Path, select: Select, progress: Progress) -> int:
    files = 0
    with _open_tar(archive) as tf, progress(f"extracting {archive.name}", None, "members") as advance:
        for member in tf:
            advance(1)
            target = _target(archive, dest, member.name, select)
            if target is None:
                continue
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.issym() or member.islnk():
                # A hard link's target is named from the archive root, a symbolic link's from its folder.
                link_target = member.linkname
                if member.islnk():
                    mapped = select(link_target)
                    if mapped is None:
                        raise UnsafeArchiveError(
                            f"{archive}: member {member.name!r} links to {link_target!r}, which is not extracted"
                        )
                    link_target = os.path.relpath(dest / mapped, target.parent)
                _link(archive, dest, member.name, target, link_target, symbolic=member.issym())
            elif member.isfile():
                src = tf.extractfile(member)
                assert src is not None
                with src:
                    _write_member(src, target)
                files += 1
            else:
                raise UnsafeArchiveError(f"{archive}: member {member.name!r} is a device or pipe; refusing it")
    return files


def _target(archive: Path, dest: Path, name: str, select: Select) -> Path | None:
    """Where a member goes, checked to stay inside `dest`; None when the member is not selected."""
    _check_member_name(archive, name)
    mapped = select(name)
    if mapped is None:
        return None
    _check_member_name(archive, mapped)
    parts = [p for p in PurePosixPath(mapped.replace("\\", "/")).parts if p not in ("", ".")]
    if not parts:
        return None
    target = dest.joinpath(*parts)
    # A link extracted earlier could redirect a later member; resolve() sees through it.
    if not _inside(dest, target.parent.resolve() / target.name):
        raise UnsafeArchiveError(f"{archive}: member {name!r} would be written outside {dest}; refusing the archive")
    return target


def _check_member_name(archive: Path, name: str) -> None:
    posix = name.replace("\\", "/")
    absolute = posix.startswith("/") or (len(posix) > 1 and posix[1] == ":")
    if absolute or ".." in PurePosixPath(posix).parts:
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} has an absolute path or '..' and would land outside the target folder; "
            f"refusing the archive"
        )


def _link(archive: Path, dest: Path, name: str, target: Path, link_target: str, *, symbolic: bool) -> None:
    if os.path.isabs(link_target) or not _inside(dest, (target.parent / link_target).resolve()):
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} is a link to {link_target!r}, outside the target folder; refusing the archive"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    if symbolic:
        os.symlink(link_target, target)
    else:
        shutil.copyfile(target.parent / link_target, target)


def _write_member(src: IO[bytes], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        shutil.copyfileobj(src, out, _CHUNK)


def _inside(folder: Path, path: Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())
