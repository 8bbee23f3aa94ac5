"""Where and in what precision a run computes: the device and the autocast / gradient-scaler choice."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from sa2vp.settings import SettingsError


def resolve_device(setting: str) -> torch.device:
    """`auto` → the first CUDA device when present, else the CPU; an explicit device must exist."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingsError(f"train.device={setting!r}: CUDA is not available on this machine (use auto or cpu)")
        if (device.index or 0) >= torch.cuda.device_count():
            raise SettingsError(f"train.device={setting!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SettingsError(f"train.device={setting!r}: MPS is not available on this machine (use auto or cpu)")
    return device


@dataclass(frozen=True)
class Precision:
    """Autocast dtype (None: fp32) and whether fp16's gradient scaler is needed."""

    name: str
    dtype: torch.dtype | None

    @property
    def needs_scaler(self) -> bool:
        return self.dtype is torch.float16

    def autocast(self, device: torch.device) -> AbstractContextManager[object]:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def resolve_precision(setting: str, device: torch.device) -> Precision:
    """`auto`: bf16 on CUDA when the GPU supports it, else fp16 with a scaler; fp32 on CPU (and MPS)."""
    if setting == "auto":
        if device.type != "cuda":
            return Precision("fp32", None)
        setting = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if setting == "fp32":
        return Precision("fp32", None)
    if device.type == "cpu" and setting == "fp16":
        raise SettingsError("train.precision=fp16: not supported on the CPU (use fp32, bf16 or auto)")
    return Precision(setting, torch.bfloat16 if setting == "bf16" else torch.float16)
