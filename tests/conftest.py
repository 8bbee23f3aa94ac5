"""Test-session set-up shared by every test file."""

from __future__ import annotations

import os

# With pytest-xdist (pyproject: -n 2) each worker is a process of its own on a 2-core machine: one torch thread
# per worker, and for the `sa2vp`/`dvc` subprocesses the tests start, keeps the cores from being oversubscribed
# (OpenMP threads spinning on a descheduled partner waste most of the CPU). Results within a test do not depend
# on it: every comparison is between runs made under the same setting.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # The same for the `sa2vp` commands under `train.cpu_numerics: portable` (params.yaml's default), which
    # would otherwise pin 2 threads; a test that is about the thread count sets its own.
    os.environ.setdefault("SA2VP_TRAIN__CPU_THREADS", "1")
    import torch

    torch.set_num_threads(1)
