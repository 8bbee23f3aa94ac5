"""Where and in what precision a run computes: the device, the autocast / gradient-scaler choice, and on the CPU
whether its numerics are the machine's own or pinned to be the same on any x86-64 machine."""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sa2vp.settings import SettingsError

log = logging.getLogger("sa2vp.runtime")


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


# --- CPU numerics ---------------------------------------------------------------------------------------------
# A CPU run's last bits depend on the machine: ATen picks its kernels by the CPU's widest vector ISA (AVX2 and
# AVX-512 softmax, attention, cross-entropy differ), MKL picks its sgemm / vector-math code by ISA, oneDNN
# JIT-compiles the patch convolution and GELU for the CPU, and the thread count decides how reductions and
# matrix products are split. `portable` pins all four before the process's first tensor operation (each library
# fixes its choice on first use). Measured, with what it costs: benchmarks/CPU_REPRODUCIBILITY.md.

PORTABLE_CAPABILITY = "AVX2"  # ATen's kernels compiled for AVX2 + FMA: Intel since 2013 (Haswell), AMD since 2015
# mkl_cbwr.h / mkl_service.h. MKL's AVX2 CNR branch gives the same results on every Intel CPU with AVX2; its
# COMPATIBLE branch (SSE2, the same on AMD too) costs ~75 % more training time here, over the budget.
_MKL_CBWR_AVX2 = 10
_MKL_CBWR_ALL = -1  # mkl_cbwr_get(MKL_CBWR_ALL): the whole setting
_MKL_CBWR_ERR_MODE_CHANGE_FAILURE = -8  # mkl_cbwr_set after MKL ran: too late
_MKL_ENABLE_AVX2 = 2  # a user's MKL_ENABLE_INSTRUCTIONS=AVX512 would silently override the CNR branch
# The bits depend on the thread count (MKL's CNR holds for a fixed count; ATen splits reductions by thread), so
# `portable` fixes one: 2, which every machine can run (oversubscribed on one core, still the same bits) and
# which on this project's 2-core machine costs +11 % wall clock against `native` (1 thread: +56 %).
PORTABLE_THREADS = 2

_cpu_numerics: CpuNumerics | None = None  # what this process applied (once: the libraries fix it on first use)


@dataclass(frozen=True)
class CpuNumerics:
    """How a CPU process computes: the setting and what is actually in effect."""

    setting: str
    capability: str  # ATen's kernels: DEFAULT, AVX2, AVX512, …
    mkl_cbwr: int | None  # MKL's conditional-numerical-reproducibility branch (None: no MKL symbols found)
    onednn: bool
    threads: int
    problems: tuple[str, ...] = ()  # why `portable` is not fully in effect (empty: it is)

    def line(self) -> str:
        mkl = {None: "unknown", 1: "off", _MKL_CBWR_AVX2: "AVX2"}.get(self.mkl_cbwr, str(self.mkl_cbwr))
        return (
            f"CPU numerics {self.setting}: ATen {self.capability} kernels, MKL CNR {mkl}, oneDNN "
            f"{'on' if self.onednn else 'off'}, {self.threads} thread(s)"
        )


def configure_cpu_numerics(setting: str, device: torch.device | str, threads: int | None = None) -> CpuNumerics | None:
    """Apply `train.cpu_numerics` and `train.cpu_threads` for a run on `device` (a device, or a `train.device`
    setting; nothing for another device than the CPU). `native` only sets the thread count, when one is given.

    `portable`: ATen's AVX2 kernels, MKL's reproducible AVX2 branch, oneDNN off (its convolution and GELU fall
    back to ATen and MKL) and a fixed thread count (`threads`, else PORTABLE_THREADS) — the same bits on any Intel
    x86-64 CPU with AVX2, whatever its vector width (AVX2, AVX-512, AMX) or core count, for a given torch build
    and thread count; not guaranteed on AMD CPUs (MKL keeps
    its own code there; a warning says so). Applied once per
    process, before its first tensor operation; later calls return what was applied. When an earlier
    operation already fixed a library's choice (or the CPU cannot run the pinned code), the run goes on with the
    machine's own numerics and a warning says why.
    """
    global _cpu_numerics
    if setting not in ("native", "portable"):
        raise SettingsError(f"train.cpu_numerics={setting!r}: must be native or portable")
    if not _on_cpu(device):
        return None
    if setting == "native":
        if threads is not None:
            torch.set_num_threads(threads)
        return None
    if _cpu_numerics is None:
        _cpu_numerics = _apply_portable(threads or PORTABLE_THREADS)
        log.info(_cpu_numerics.line())
        for problem in _cpu_numerics.problems:
            log.warning(
                "train.cpu_numerics=portable is not fully in effect: %s; this run's results may differ "
                "in the last bits from other machines'",
                problem,
            )
    return _cpu_numerics


def _on_cpu(device: torch.device | str) -> bool:
    if isinstance(device, str):  # a setting: `auto` is the CPU when there is no CUDA (resolve_device)
        return device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    return device.type == "cpu"


def _apply_portable(threads: int) -> CpuNumerics:
    problems: list[str] = []
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if not x86:
        problems.append(f"portable numerics are defined for x86-64 CPUs, this is {platform.machine()}")
    elif _cpu_vendor() not in ("GenuineIntel", None):
        problems.append(
            f"MKL's reproducible AVX2 code is Intel's, this CPU is {_cpu_vendor()} (matrix products "
            "may differ in the last bits from an Intel CPU's)"
        )
    os.environ["ATEN_CPU_CAPABILITY"] = PORTABLE_CAPABILITY.lower()  # read on ATen's first dispatched kernel
    os.environ["MKL_CBWR"] = "AVX2"  # these two for processes started from this one (MKL reads them once)
    os.environ["MKL_ENABLE_INSTRUCTIONS"] = "AVX2"
    mkl_cbwr = _set_mkl_cbwr(problems)
    # torch annotates this module attribute as its descriptor (ContextProp); on the module object it is a bool.
    torch.backends.mkldnn.enabled = False  # type: ignore[assignment]
    torch.set_num_threads(threads)
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != PORTABLE_CAPABILITY and x86:
        problems.append(
            f"ATen runs its {capability} kernels: "
            + (
                "this CPU lacks AVX2"
                if capability == "DEFAULT"
                else "an earlier tensor operation in this process fixed them"
            )
        )
    return CpuNumerics(
        "portable", capability, mkl_cbwr, bool(torch.backends.mkldnn.enabled), torch.get_num_threads(), tuple(problems)
    )


def _set_mkl_cbwr(problems: list[str]) -> int | None:
    """MKL (linked into torch) capped to AVX2 and switched to its reproducible AVX2 branch; the branch then in
    effect (mkl_cbwr_get), None when this torch has no reachable MKL."""
    if not torch.backends.mkl.is_available():
        problems.append("this torch build has no MKL (its BLAS is not covered)")
        return None
    library = _torch_cpu_library()
    status: int | None = None
    in_effect: int | None = None
    if library is not None:
        try:
            library.mkl_serv_enable_instructions(ctypes.c_int(_MKL_ENABLE_AVX2))
            status = library.mkl_serv_cbwr_set(ctypes.c_int(_MKL_CBWR_AVX2))
            in_effect = int(library.mkl_serv_cbwr_get(ctypes.c_int(_MKL_CBWR_ALL)))
        except AttributeError:  # no such symbols: another build of MKL
            status = in_effect = None
    if in_effect is None:
        problems.append("MKL's reproducibility switch (mkl_cbwr_set) is not reachable in this torch build")
    elif in_effect != _MKL_CBWR_AVX2:
        problems.append(
            "MKL already ran in this process, its code branch is fixed"
            if status == _MKL_CBWR_ERR_MODE_CHANGE_FAILURE
            else f"mkl_cbwr_set returned {status}"
        )
    return in_effect


def cpuinfo_field(name: str) -> str | None:
    """A field of the first CPU in /proc/cpuinfo (`vendor_id`, `model name`, …) where the OS says it (Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_vendor() -> str | None:
    """The CPU's vendor id (GenuineIntel, AuthenticAMD, …) where the OS says it (Linux), else None."""
    return cpuinfo_field("vendor_id")


def _torch_cpu_library() -> ctypes.CDLL | None:
    folder = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        if (folder / name).is_file():
            try:
                return ctypes.CDLL(str(folder / name))
            except OSError:
                return None
    return None


class PortableDropout(nn.Dropout):
    """Dropout whose mask is the same on every x86-64 CPU, and cheaper on this one.

    torch's CPU dropout draws its mask with `bernoulli_`, which on Intel CPUs uses MKL's random streams and on
    every other CPU ATen's own generator: another mask on AMD, so other weights altogether. Here the mask is
    `rand >= p` from ATen's generator (serial Mersenne Twister, the same on any CPU and thread count); same
    scaling as nn.Dropout. On the offline model it also makes a training step ~12 % cheaper (MKL's Bernoulli
    draws ints and converts them; benchmarks/CPU_REPRODUCIBILITY.md).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return torch.zeros_like(x)
        # The same numbers as x · (rand ≥ p) · 1/(1−p), cheaper: the mask is x's dtype (1 / 0, no bool mask to
        # cast forward and backward), and where the scale is exact in that dtype it is folded into the mask.
        keep = torch.rand_like(x).ge_(self.p)
        scale = 1.0 / (1.0 - self.p)
        if x.dtype in (torch.float32, torch.float64):
            return x * keep.mul_(scale)
        return x * keep * scale


def use_portable_dropout(model: nn.Module) -> int:
    """Replace every plain nn.Dropout in `model` (the backbone's and the method's) by PortableDropout with the
    same rate, in place; returns how many. Part of `train.cpu_numerics: portable`."""
    replaced = 0
    for module in model.modules():
        for name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                setattr(module, name, PortableDropout(child.p, inplace=False))
                replaced += 1
    return replaced
