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

from sa2vp.atomic import write_atomic
from sa2vp.data.errors import ChecksumError, DataError, MissingDataError, UnsafeArchiveError
from sa2vp.data.progress import NO_PROGRESS, Progress

MARKER = ".sa2vp-complete"
SOURCE_NOTE = ".sa2vp-source"  # what a dataset folder was made from (see record_source)
_DOWNLOADED = "a download"
_CHUNK = 1 << 20


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


def verify_checksum(path: Path, expected: str, *, can_skip: bool = True) -> None:
    """Check a file against `md5:<hex>` or `sha256:<hex>`; ChecksumError names the file and both values.

    `can_skip=False` for files whose content is executable in effect (pickles): the error then does not suggest
    data.verify_checksums=false, only replacing the file."""
    algorithm, _, want = expected.partition(":")
    if algorithm not in ("md5", "sha256") or not want:
        raise ValueError(f"checksum {expected!r}: expected 'md5:<hex>' or 'sha256:<hex>'")
    got = file_digest(path, algorithm)
    if got != want.lower():
        advice = (
            " (or set data.verify_checksums=false to accept it)"
            if can_skip
            else (" to fetch the publisher's file (it is a pickle: a changed one is not to be trusted)")
        )
        raise ChecksumError(
            f"{path}: {algorithm} is {got}, the publisher's is {want} — the file is corrupt, incomplete or not the "
            f"publisher's; delete it and run again{advice}"
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


def read_json(path: Path, missing: str, invalid: type[DataError] = DataError) -> Any:
    """The content of a JSON file. Absent: MissingDataError `<path>: <missing>`; not JSON: `invalid`."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingDataError(f"{path}: {missing}") from None
    except json.JSONDecodeError as exc:
        raise invalid(f"{path}: not valid JSON ({exc})") from None


def mark_complete(folder: Path, details: Mapping[str, Any]) -> None:
    """Write the completion marker (last, after everything else in the folder is in place)."""
    write_atomic(Path(folder) / MARKER, json.dumps(dict(details), indent=2, sort_keys=True) + "\n")


def record_source(folder: Path, source: Path | None) -> None:
    """Note in `folder` what it was made from: data.source's absolute path, or a download. Kept beside the
    completion marker, not in it: the marker goes into split manifests, which must not depend on local paths."""
    made_from = Path(source).resolve().as_posix() if source is not None else _DOWNLOADED
    write_atomic(Path(folder) / SOURCE_NOTE, made_from + "\n")


def check_source(folder: Path, source: Path | None) -> None:
    """DataError when data.source names a copy other than the one the existing `folder` was made from: a
    folder extracted from one archive is never silently kept for a `--from` of another. (A complete folder
    without a note, made by an earlier version, is accepted.)"""
    if source is None or not Path(folder).exists():
        return
    try:
        made_from = (Path(folder) / SOURCE_NOTE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        if read_marker(folder) is not None:
            return
        made_from = ""
    if made_from == Path(source).resolve().as_posix():
        return
    made = f"was made from {made_from}" if made_from else "was put there by hand"
    raise DataError(
        f"{folder} {made}, not from data.source={source}; remove {folder} to rebuild it from "
        f"{source}, or leave data.source unset to use it as it is"
    )


def complete_in_place(
    folder: Path, source: Path | None, marker: Mapping[str, Any], check: Callable[[Path], None]
) -> bool:
    """Whether the dataset folder `folder` is ready to use: marked complete already, or put in place by hand and
    accepted by `check` (it is marked complete now). A data.source other than the copy the folder was made
    from is refused first (`check_source`): a `--from` is never silently ignored."""
    check_source(folder, source)
    if read_marker(folder) is not None:
        return True
    if not folder.exists():
        return False
    check(folder)
    mark_complete(folder, marker)
    return True


@contextmanager
def building(folder: Path, source: Path | None, marker: Mapping[str, Any]) -> Iterator[Path]:
    """`staging(folder)` for a dataset folder made from data.source `source` (None: downloaded): when the block
    ends without error, what it was made from is noted and the completion marker written, last."""
    with staging(folder) as tmp:
        yield tmp
        record_source(tmp, source)
        mark_complete(tmp, marker)


def copy_tree(src: Path, dst: Path, progress: Progress = NO_PROGRESS) -> None:
    """Copy a folder (a user's `--from` folder into data/): each file is cloned where the file system can
    (btrfs, XFS, …: no second copy of the bytes until one side is written) and copied byte for byte otherwise.

    Never hard-linked: a hard link is the user's own file under a second name, so anything that later writes
    into data/ in place would write into the user's copy."""
    with progress(f"copying {Path(src).name}", None, "files") as advance:

        def clone_or_copy(a: str, b: str) -> None:
            _clone_or_copy(a, b)
            advance(1)

        try:
            shutil.copytree(src, dst, copy_function=clone_or_copy, dirs_exist_ok=True)
        except shutil.Error as exc:  # copytree gathers the files it could not copy: (source, target, reason)
            first = exc.args[0][0] if exc.args and exc.args[0] else ("?", "?", str(exc))
            raise DataError(f"could not copy {first[0]} into {dst}: {first[2]}") from None
        except OSError as exc:
            raise DataError(f"could not copy {src} into {dst}: {exc}") from None


_FICLONE = 0x40049409  # linux/fs.h: ioctl(dest, FICLONE, src) shares the source's blocks copy-on-write


def _clone_or_copy(src: str, dst: str) -> None:
    try:
        import fcntl

        with open(src, "rb") as source, open(dst, "wb") as dest:
            fcntl.ioctl(dest.fileno(), _FICLONE, source.fileno())
        shutil.copystat(src, dst)
    except (ImportError, OSError):  # no fcntl (Windows), or no clones here (ext4, tmpfs, across file systems)
        shutil.copy2(src, dst)


# --- archives ---------------------------------------------------------------------------------------------

Select = Callable[[str], str | None]  # archive member name → name inside the target, or None to skip it


def members_under(prefix: str) -> Select:
    """A `Select` that extracts the members under the folder `prefix` (`name/`, or "" for all), without it."""
    return lambda name: name[len(prefix) :] if name.startswith(prefix) else None


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
