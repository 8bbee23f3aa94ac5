"""Safe extraction, checksums, atomic and resumable downloads, completion markers."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from sa2vp.data import ChecksumError, UnsafeArchiveError
from sa2vp.data.files import (
    MARKER, download_url, extract, mark_complete, read_marker, staging, verify_checksum, write_atomic,
)
from sa2vp.data.sources import hub


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _tar(path: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return path


@pytest.mark.parametrize("evil", ["../evil.txt", "a/../../evil.txt", "/tmp/sa2vp-evil.txt"])
def test_zip_with_escaping_member_is_refused(tmp_path: Path, evil: str) -> None:
    archive = _zip(tmp_path / "a.zip", {"ok/one.txt": b"1", evil: b"pwned"})
    with pytest.raises(UnsafeArchiveError, match="refusing the archive") as info:
        extract(archive, tmp_path / "out")
    assert evil in str(info.value) and "a.zip" in str(info.value)
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/sa2vp-evil.txt").exists()


def test_tar_with_link_pointing_outside_is_refused(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "a.tgz", {"d/one.txt": b"1"}, links={"d/escape": "../../outside"})
    with pytest.raises(UnsafeArchiveError, match="link"):
        extract(archive, tmp_path / "out")
    archive = _tar(tmp_path / "b.tgz", {"../evil.txt": b"x"})
    with pytest.raises(UnsafeArchiveError):
        extract(archive, tmp_path / "out2")
    assert not (tmp_path / "evil.txt").exists()


def test_extract_selects_and_strips(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "a.tgz", {"top/x/one.txt": b"1", "top/two.txt": b"2", "other.txt": b"3"},
                   links={"top/link": "two.txt"})
    count = extract(archive, tmp_path / "out", lambda n: n[4:] if n.startswith("top/") else None)
    assert count == 2
    assert (tmp_path / "out/x/one.txt").read_bytes() == b"1" and (tmp_path / "out/link").read_bytes() == b"2"
    assert not (tmp_path / "out/other.txt").exists()


def test_checksum_error_names_file_and_values(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    verify_checksum(path, "md5:" + hashlib.md5(b"abc").hexdigest())
    with pytest.raises(ChecksumError) as info:
        verify_checksum(path, "sha256:" + "0" * 64)
    assert str(path) in str(info.value) and "0" * 64 in str(info.value)


def test_interrupted_download_is_redone(tmp_path: Path) -> None:
    source = tmp_path / "remote" / "archive.tgz"
    source.parent.mkdir()
    source.write_bytes(b"complete content" * 1000)
    dest = tmp_path / "downloads" / "archive.tgz"
    dest.parent.mkdir()
    (dest.parent / "archive.tgz.part").write_bytes(b"half")  # an interrupted earlier run
    checksum = "md5:" + hashlib.md5(source.read_bytes()).hexdigest()
    assert download_url(source.as_uri(), dest, checksum) == dest
    assert dest.read_bytes() == source.read_bytes()
    assert not (dest.parent / "archive.tgz.part").exists()


def test_download_with_bad_checksum_leaves_no_file(tmp_path: Path) -> None:
    source = tmp_path / "remote.bin"
    source.write_bytes(b"x")
    dest = tmp_path / "d" / "remote.bin"
    with pytest.raises(ChecksumError, match="remote.bin.part"):
        download_url(source.as_uri(), dest, "md5:" + "0" * 32)
    assert not dest.exists()


def test_staging_redoes_partial_folder_and_marks_last(tmp_path: Path) -> None:
    folder = tmp_path / "dataset"
    leftover = tmp_path / "dataset.partial"
    leftover.mkdir()
    (leftover / "junk").write_text("from an interrupted run")
    with pytest.raises(RuntimeError), staging(folder) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("interrupted")
    assert not folder.exists() and not leftover.exists()
    with staging(folder) as tmp:
        (tmp / "file").write_text("x")
        mark_complete(tmp, {"dataset": "d"})
    assert sorted(p.name for p in folder.iterdir()) == [MARKER, "file"]
    assert read_marker(folder) == {"dataset": "d"} and read_marker(tmp_path) is None


def test_write_atomic_leaves_no_temporary(tmp_path: Path) -> None:
    write_atomic(tmp_path / "a" / "f.txt", "one")
    write_atomic(tmp_path / "a" / "f.txt", "two")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["f.txt"]
    assert (tmp_path / "a" / "f.txt").read_text() == "two"


def test_hub_file_is_checked_against_the_hub_sha256(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    payload = tmp_path / "dl" / "vtab-1k.zip"
    payload.parent.mkdir()
    payload.write_bytes(b"zip bytes")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **kwargs: str(payload))
    monkeypatch.setattr(hub, "lfs_sha256", lambda repo, name: hashlib.sha256(b"zip bytes").hexdigest())
    assert hub.hub_file("XiN0919/VTAB-1k", "vtab-1k.zip", tmp_path / "dl") == payload
    monkeypatch.setattr(hub, "lfs_sha256", lambda repo, name: "f" * 64)
    with pytest.raises(ChecksumError, match="vtab-1k.zip"):
        hub.hub_file("XiN0919/VTAB-1k", "vtab-1k.zip", tmp_path / "dl")
