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
    MARKER,
    download_url,
    extract,
    mark_complete,
    read_marker,
    staging,
    verify_checksum,
    write_atomic,
)
from tests.data_fixtures import make_vtab_task, zip_folder
from tests.hub_server import HubServer, run_sa2vp


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
    archive = _tar(
        tmp_path / "a.tgz",
        {"top/x/one.txt": b"1", "top/two.txt": b"2", "other.txt": b"3"},
        links={"top/link": "two.txt"},
    )
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


# --- hub downloads: the shipped `sa2vp` command and the real huggingface_hub client against a loopback Hub -----
# (tests/hub_server.py says why the command runs in a subprocess: HF_ENDPOINT is read when huggingface_hub is
# imported.)

VTAB_ZIP = ("dataset", "XiN0919/VTAB-1k", "vtab-1k.zip")
RESOLVE = "/datasets/XiN0919/VTAB-1k/resolve/main/vtab-1k.zip"
PATHS_INFO = "/api/datasets/XiN0919/VTAB-1k/paths-info/main"


@pytest.fixture
def vtab_zip_bytes(tmp_path: Path) -> bytes:
    """A small vtab-1k.zip as on the hub: `vtab-1k/svhn/…` and `vtab-1k/dtd/…`."""
    make_vtab_task(tmp_path / "publisher", "svhn", num_classes=10, train=1, val=1, test=1)
    make_vtab_task(tmp_path / "publisher", "dtd", num_classes=3, train=1, val=1, test=1)
    return zip_folder(tmp_path / "publisher", tmp_path / "vtab-1k.zip", "vtab-1k/").read_bytes()


def test_hub_file_is_checked_against_the_hub_sha256(tmp_path: Path, vtab_zip_bytes: bytes) -> None:
    sha256 = hashlib.sha256(vtab_zip_bytes).hexdigest()
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    with HubServer({VTAB_ZIP: vtab_zip_bytes}) as hub:
        env = hub.client_env(tmp_path / "hf-home")
        result = run_sa2vp(["data", "prepare", "svhn"], good, env)
        assert result.returncode == 0, result.stderr
        assert "split files: data/splits/vtab-svhn/vtab1k" in result.stdout
        assert (good / "data/downloads/vtab-1k.zip").read_bytes() == vtab_zip_bytes
        # metadata from the resolve redirect, the bytes from its Location, then the LFS sha256 to check them by
        assert hub.requests == [("HEAD", "hub", RESOLVE), ("GET", "cdn", f"/lfs/{sha256}"), ("POST", "hub", PATHS_INFO)]
        hub.requests.clear()
        result = run_sa2vp(["data", "download", "dtd"], good, env)  # the kept download: same etag, not fetched
        assert result.returncode == 0, result.stderr
        assert hub.requests == [("HEAD", "hub", RESOLVE), ("POST", "hub", PATHS_INFO)]
        assert (good / "data/vtab-1k/dtd/train800.txt").is_file()

    wrong = "f" * 64  # the hub publishes a sha256 the served bytes do not have: corrupted on the way
    with HubServer({VTAB_ZIP: vtab_zip_bytes}, advertised_sha256={VTAB_ZIP: wrong}) as hub:
        result = run_sa2vp(["data", "prepare", "svhn"], bad, hub.client_env(tmp_path / "hf-home"))
        assert [r.method for r in hub.requests] == ["HEAD", "GET", "POST"]
    assert result.returncode == 2, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert f"data/downloads/vtab-1k.zip: sha256 is {sha256}, the publisher's is {wrong}" in line  # ChecksumError
    assert "Traceback" not in result.stderr and not (bad / "data" / "vtab-1k").exists()


def test_hub_missing_file_or_no_network_is_one_clear_line(tmp_path: Path, vtab_zip_bytes: bytes) -> None:
    advice = "without internet, pass a local copy with --from (data.source) or put it at data/downloads/vtab-1k.zip"
    with HubServer({("dataset", "XiN0919/VTAB-1k", "README.md"): b"# VTAB-1k\n"}) as hub:  # no vtab-1k.zip
        env = hub.client_env(tmp_path / "hf-home")
        missing = run_sa2vp(["data", "prepare", "svhn"], tmp_path, env)
        # HF_HUB_OFFLINE=1 is how a machine without network says so: the client sends nothing and raises what it
        # raises for a refused connection (which it would first retry with back-off for about 23 s)
        offline = run_sa2vp(["data", "prepare", "svhn"], tmp_path, {**env, "HF_HUB_OFFLINE": "1"})
        assert hub.requests == [("HEAD", "hub", RESOLVE)]
    for result in (missing, offline):
        assert result.returncode == 2, result.stderr
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert line.startswith("error: could not download vtab-1k.zip from hub dataset XiN0919/VTAB-1k: ")
        assert line.endswith(advice) and "Traceback" not in result.stderr
    assert "404 Client Error. Entry Not Found for url: http://127.0.0.1:" in missing.stderr
    assert "Please check your connection" in offline.stderr

    # following the advice works with the hub gone (its port now refuses connections): the copy is used as it is
    (tmp_path / "data" / "downloads").mkdir(parents=True, exist_ok=True)  # hf_hub_download made it
    (tmp_path / "data" / "downloads" / "vtab-1k.zip").write_bytes(vtab_zip_bytes)
    result = run_sa2vp(["data", "prepare", "svhn"], tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data/splits/vtab-svhn/vtab1k/train.txt").is_file()
