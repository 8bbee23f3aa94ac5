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


# The two xdist workers take whole files (pyproject: --dist loadfile) in the order they are collected. The files
# whose module fixtures run real pipelines take minutes; started last, they leave one worker busy alone at the
# end. Started first, the other files fill the second worker meanwhile.
SLOWEST_FILES_FIRST = ("test_pipeline.py", "test_tuning_semantics.py", "test_cli_train.py")


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FILES_FIRST)))  # stable: others keep order
