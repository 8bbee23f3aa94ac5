"""train.cpu_numerics=portable: the same bytes from a CPU training step on any Intel x86-64 machine with AVX2.

"Another machine" is emulated in a child process by capping each of torch's CPU libraries to AVX2 through its
own switch (ATen, oneDNN, MKL) and by another thread count; the libraries fix these on first use, hence one
fresh process per configuration. Each child builds a tiny SA²VP model exactly as a run does (`build_seeded`,
where a run applies its numerics), takes two AdamW steps and prints hashes of its trained tensors and logits.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from sa2vp.engine.runtime import PORTABLE_THREADS, _cpu_vendor
from tests.train_fixtures import digits_root, project, run_sa2vp  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64")
    or not torch.backends.mkl.is_available()
    or _cpu_vendor() not in ("GenuineIntel", None),
    reason="portable CPU numerics are defined for Intel x86-64 CPUs with torch's MKL",
)

# An AVX-512 machine (this one, if its CPU has AVX-512: the variables only cap) and an AVX2-only machine.
AVX512_MACHINE = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_ENABLE_INSTRUCTIONS": "AVX512"}
AVX2_MACHINE = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
LIBRARY_SWITCHES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")
THREAD_SETTINGS = ("OMP_NUM_THREADS", "SA2VP_TRAIN__CPU_THREADS")  # the test session's; a child is a machine

CHILD = r"""
import hashlib, json, sys
import torch
numerics, threads = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(threads)  # the machine's core count; `portable` must override it
from sa2vp.engine.artifact import build_seeded
from sa2vp.engine.optim import build_optimizer
from sa2vp.engine.runtime import configure_cpu_numerics
from sa2vp.settings import load_settings
settings = load_settings(None, {
    "backbone.name": "vit_tiny_patch16_224", "backbone.weights": "random", "backbone.img_size": 16,
    "backbone.model_kwargs": {"patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2},
    "model.sa2vp.window": 3, "train.device": "cpu", "train.cpu_numerics": numerics,
})
model = build_seeded(settings, 10)
generator = torch.Generator().manual_seed(0)
images, labels = torch.rand(64, 3, 16, 16, generator=generator), torch.randint(0, 10, (64,), generator=generator)
optimizer = build_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad], settings.train)
model.train()
for _ in range(2):
    model.loss(model(images), labels).total.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
model.eval()
with torch.no_grad():
    logits = model(images)
state = model.trainable_state_dict()
digest = hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state)) + logits.numpy().tobytes())
# portable: what the run applied; native: applying it now, after tensor ops, is too late (and must say so)
numerics = configure_cpu_numerics("portable", "cpu")
dropouts = [type(module).__name__ for module in model.modules() if isinstance(module, torch.nn.Dropout)]
print(json.dumps({"digest": digest.hexdigest(), "capability": numerics.capability, "threads": numerics.threads,
                  "dropouts": sorted(set(dropouts)),
                  "onednn": numerics.onednn, "mkl_cbwr": numerics.mkl_cbwr, "problems": list(numerics.problems)}))
"""


def _steps(*configs: tuple[str, dict[str, str], int]) -> list[dict[str, Any]]:
    """The child for each (numerics, machine, threads), all at once (each computes on one thread)."""
    children = []
    for numerics, machine, threads in configs:
        env = {k: v for k, v in os.environ.items() if k not in LIBRARY_SWITCHES + THREAD_SETTINGS} | machine
        children.append(
            subprocess.Popen(
                [sys.executable, "-c", CHILD, numerics, str(threads)],
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=Path(__file__).resolve().parents[1],
            )
        )
    results = []
    for child in children:
        out, err = child.communicate(timeout=180)
        assert child.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_portable_numerics_give_the_same_bytes_on_an_avx2_machine_with_other_cores() -> None:
    here, there, native_here, native_there = _steps(
        ("portable", AVX512_MACHINE, 1),
        ("portable", AVX2_MACHINE, 4),
        ("native", AVX512_MACHINE, 1),
        ("native", AVX2_MACHINE, 1),
    )
    # In effect before the first tensor op: ATen's AVX2 kernels, MKL's AVX2 CNR branch, oneDNN off, 2 threads
    # whatever the machine's count.
    assert (here["capability"], here["mkl_cbwr"], here["onednn"]) == ("AVX2", 10, False)
    assert here["threads"] == there["threads"] == PORTABLE_THREADS
    assert here["problems"] == []
    # Dropout masks from ATen's generator, not MKL's Intel-only Bernoulli streams (another mask on AMD).
    assert here["dropouts"] == ["PortableDropout"] and native_here["dropouts"] == ["Dropout"]
    assert here["digest"] == there["digest"]
    # Natively the two machines differ in the last bits: the pins above are what makes them agree.
    if native_here["capability"] == "AVX2":
        pytest.skip("this CPU has no AVX-512: both emulated machines are the same one natively")
    assert native_here["digest"] != native_there["digest"]
    # Pinning after tensor ops cannot take effect, and says so.
    assert any("earlier tensor operation" in problem for problem in native_here["problems"])
    assert any("MKL already ran" in problem for problem in native_here["problems"])


def test_the_train_and_evaluate_commands_apply_portable_numerics_before_computing(project: Path) -> None:
    trained = run_sa2vp(
        project,
        "train",
        "--set",
        "train.cpu_numerics=portable",
        "--set",
        "train.epochs=1",
        "--set",
        "tracking.enabled=false",
        "--set",
        "train.device=cpu",
    )
    pinned = "CPU numerics portable: ATen AVX2 kernels, MKL CNR AVX2, oneDNN off, "  # then the thread count
    evaluated = run_sa2vp(project, "evaluate", "runs/train/model", "--split", "test")
    for done in (trained, evaluated):  # nothing computed before the pins in either command
        assert pinned in done.stderr, done.stderr
        assert "earlier tensor operation" not in done.stderr and "MKL already ran" not in done.stderr
