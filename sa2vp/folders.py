"""Folders a command writes into: checked before the long work starts (a read-only `--output` is found in
milliseconds, not after an epoch), and cleared of the temporaries a killed process left there.

Temporaries are `sa2vp.atomic`'s `.<name>.<pid>.tmp`: the pid in the name says whose they are, so one whose
process is gone can be removed safely while a live writer's is left alone.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

# sa2vp.atomic names its temporaries `.<name>.<pid>.tmp`.
TEMPORARY = re.compile(r"^\..+\.(\d+)\.tmp$")


def writable_problem(folder: Path) -> str | None:
    """None when files can be created in `folder`; else why not (one short phrase).

    A folder that does not exist yet is made for the probe and removed again, so the check leaves nothing
    behind: a command that then stops on another mistake has written nothing. The probe really writes (rather
    than asking `os.access`) because permission bits say nothing for root, read-only mounts or full disks."""
    folder = Path(folder).absolute()
    made: list[Path] = []
    probe = folder / f".sa2vp-write-probe.{os.getpid()}.tmp"
    try:
        for parent in reversed([folder, *folder.parents]):
            if parent.is_dir():
                continue
            if parent.exists():
                return f"{parent} is not a folder"
            parent.mkdir()
            made.append(parent)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        where = folder if exc.filename in (None, str(probe)) else exc.filename  # the folder, not our probe's name
        return f"{exc.strerror or exc}: {where}"
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        for parent in reversed(made):
            try:
                parent.rmdir()
            except OSError:  # something else appeared in it meanwhile: not ours to remove
                break
    return None


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine and has not ended (a zombie counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (macOS): kill(0) is all we know
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries of processes that are gone from `folder` and its direct subfolders (a run's
    output and its `model/`); a live writer's are left alone. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for candidate in [*folder.glob(".*.tmp"), *folder.glob("*/.*.tmp")]:
        match = TEMPORARY.match(candidate.name)
        if match is None or not candidate.is_file():
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and not process_alive(pid):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed
