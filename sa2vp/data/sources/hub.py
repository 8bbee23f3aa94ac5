"""Files from Hugging Face hub dataset repositories (VTAB-1k's archive, VPT's FGVC splits, Stanford Cars).

`hf_hub_download` resumes interrupted downloads, shows progress and only moves a file into place when it is
complete. The file is then checked against the sha256 the hub reports for it (its git-LFS object id).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sa2vp.data.errors import DataError
from sa2vp.data.files import verify_checksum
from sa2vp.data.progress import NO_PROGRESS, Progress


def hub_file(
    repo_id: str, filename: str, dest_dir: Path, verify: bool = True, progress: Progress = NO_PROGRESS
) -> Path:
    """Download `filename` from the hub dataset `repo_id` into `dest_dir` (kept there for later runs)."""
    from huggingface_hub import hf_hub_download

    with progress(f"downloading {filename} from hub dataset {repo_id}", None, "files") as advance:
        try:
            with single_attempt():
                path = Path(
                    hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset", local_dir=dest_dir)
                )
        except Exception as exc:  # network, auth and hub errors come in many types; all mean "not fetched"
            raise DataError(
                f"could not download {filename} from hub dataset {repo_id}: {_one_line(exc)}; without internet, pass "
                f"a local copy with --from (data.source) or put it at {Path(dest_dir) / filename}"
            ) from None
        advance(1)
    if verify:
        expected = lfs_sha256(repo_id, filename)
        if expected is not None:
            verify_checksum(path, f"sha256:{expected}")
    return path


@contextmanager
def single_attempt() -> Iterator[None]:
    """`hf_hub_download` calls in the block give up at once when the hub cannot be reached.

    When its first request cannot connect and no copy is cached, huggingface_hub retries it five times with
    back-off — 23 s and ten warnings on a machine without network, before the same error. Whether to retry is
    decided by `huggingface_hub.file_download._DEFAULT_RETRY_ON_EXCEPTIONS` (no setting or argument reaches
    it), emptied for the block: one attempt, then the caller's one-line error and its advice. A hub that
    answers with a server error (5xx) is still retried."""
    from huggingface_hub import file_download

    saved = file_download._DEFAULT_RETRY_ON_EXCEPTIONS
    file_download._DEFAULT_RETRY_ON_EXCEPTIONS = ()
    try:
        yield
    finally:
        file_download._DEFAULT_RETRY_ON_EXCEPTIONS = saved


def lfs_sha256(repo_id: str, filename: str) -> str | None:
    """The sha256 the hub publishes for a git-LFS file, or None when it cannot be had (offline, not LFS)."""
    from huggingface_hub import HfApi

    try:
        (entry,) = HfApi().get_paths_info(repo_id, [filename], repo_type="dataset")
    except Exception:  # offline after a cached download: the file is then used unverified
        return None
    lfs = getattr(entry, "lfs", None)
    return lfs.sha256 if lfs is not None else None


def hub_filenames(repo_id: str) -> list[str]:
    """The files of a hub dataset repository."""
    from huggingface_hub import HfApi

    try:
        return sorted(HfApi().list_repo_files(repo_id, repo_type="dataset"))
    except Exception as exc:  # see hub_file
        raise DataError(f"could not list hub dataset {repo_id}: {_one_line(exc)}") from None


def _one_line(exc: Exception) -> str:
    # huggingface_hub's HTTP errors (404 and the like) span several lines; a DataError is shown as one line.
    return " ".join(str(exc).split())
