"""Per-epoch training checkpoints: everything needed to continue a killed run exactly.

Saved with torch.save (nested dicts of tensors and plain values) and loaded with `weights_only=True`, so a
checkpoint can never execute code. Written to a temporary name and renamed: a kill mid-write leaves the
previous checkpoint intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sa2vp.atomic import atomic_path
from sa2vp.errors import ArtifactError

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(folder: Path, state: dict[str, Any]) -> Path:
    path = folder / CHECKPOINT_NAME
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(folder: Path) -> dict[str, Any]:
    path = folder / CHECKPOINT_NAME
    if not path.is_file():
        raise ArtifactError(f"--resume: no checkpoint to resume from at {path} (train.output={folder})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which, and what to do
        raise ArtifactError(f"{path}: not a readable sa2vp checkpoint ({exc}); remove it to start afresh") from exc


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
