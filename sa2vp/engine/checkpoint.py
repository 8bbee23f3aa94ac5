"""Per-epoch training checkpoints: everything needed to continue a killed run exactly.

Saved with torch.save (nested dicts of tensors and plain values) and loaded with `weights_only=True`, so a
checkpoint can never execute code. Written to a temporary name and renamed: a kill mid-write leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from sa2vp.atomic import atomic_path
from sa2vp.errors import ArtifactError, one_line

CHECKPOINT_NAME = "checkpoint.pt"
# What the trainer saves each epoch and reads back on resume.
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "state", "settings")


def save_checkpoint(folder: Path, state: dict[str, Any]) -> Path:
    path = folder / CHECKPOINT_NAME
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(folder: Path) -> dict[str, Any]:
    """The checkpoint in `folder`, or an ArtifactError (one line naming it) when it is missing, unreadable
    (truncated, empty, not a torch checkpoint, or holding objects that would need unpickling) or lacks a part."""
    path = folder / CHECKPOINT_NAME
    if not path.is_file():
        raise ArtifactError(f"--resume: no checkpoint to resume from at {path} (train.output={folder})")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses anyway
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # whatever torch's readers raise on a foreign or damaged file: say which, and what to do
        raise ArtifactError(
            f"{path}: not a readable sa2vp checkpoint ({_reason(exc)}); remove it to start afresh"
        ) from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ArtifactError(
            f"{path}: not an sa2vp checkpoint (missing {', '.join(missing)}); remove it to start afresh"
        )
    return state


def _reason(exc: Exception) -> str:
    # torch's own messages run to paragraphs (and suggest weights_only=False, which sa2vp never does).
    if isinstance(exc, pickle.UnpicklingError):
        return "not a torch checkpoint of tensors and plain values; nothing else is ever unpickled"
    if isinstance(exc, EOFError):
        return "the file is empty or cut short"
    return one_line(exc).split(". ")[0]  # the first sentence says what; the rest is torch's advice


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
