"""Does a CPU training give the same bytes on another x86 machine? Emulates other machines on this one, hashes
what a training of the offline default produces under each `train.cpu_numerics`, and measures what `portable`
costs. Findings: benchmarks/CPU_REPRODUCIBILITY.md.

Each configuration runs in a fresh child process (the libraries fix their instruction set on first use) on the
repository's params.yaml (digits, the committed offline ViT, SA²VP), tracking off: either the real `fit` for
--epochs (validation, test, the artifact) or, with --steps N, N optimiser steps of fit's own pieces (model,
loader order, AdamW, schedule, loss) and the test split's logits — the same operations in a fraction of the
time. The child reports the SHA-256 of the trained tensors and of the test logits, the test accuracy and the
training throughput (wall clock, and per second of process CPU time). "Another machine" is emulated by capping
each library's instruction set through its own switch, and by the thread count set before the run:

    ATen (softmax, attention, cross-entropy, reductions)  ATEN_CPU_CAPABILITY=default|avx2|avx512
    oneDNN (patch-embedding convolution, GELU)            ONEDNN_MAX_CPU_ISA=AVX2|AVX512_CORE|…
    MKL (fp32 matrix products, exp/tanh)                  MKL_ENABLE_INSTRUCTIONS=AVX2|AVX512
    thread count (how reductions and products split)      torch.set_num_threads(N), N > cores allowed

    python benchmarks/cpu_reproducibility.py matrix --steps 3     # native vs portable: 3 machines × 1, 2 threads
    python benchmarks/cpu_reproducibility.py matrix --numerics portable --epochs 1   # the real fit
    python benchmarks/cpu_reproducibility.py cost --steps 6 --repeats 5 --numerics native native@1 portable
    # one run with pins set by hand, one library at a time (oneDNN: --onednn-off):
    ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 python benchmarks/cpu_reproducibility.py child --steps 3 --threads 1

`cost` runs the variants alternately (the order reversed every other round, so that a shared machine's load hits
all alike) and reports medians. Set data.root (--set data.root=/tmp/data) to keep the repository's data/ as is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]

# Emulated machines: environment that caps each library's instruction set, and a thread count.
MACHINES: dict[str, dict[str, str]] = {
    "this (AVX512+AMX)": {},
    "AVX512, no AMX": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "AVX2 only": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


@dataclass
class Config:
    name: str
    env: dict[str, str] = field(default_factory=dict)
    threads: int | None = None  # torch.set_num_threads before training (None: torch's default, the cores)
    numerics: str | None = None  # train.cpu_numerics (None: the settings' own)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("matrix", "cost", "child"):
        command = sub.add_parser(name)
        command.add_argument("--epochs", type=int, default=1)
        command.add_argument(
            "--steps",
            type=int,
            default=0,
            help="N > 0: N optimiser steps of fit's pieces instead of a full fit (much faster)",
        )
        command.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="a setting for every run (e.g. data.root=/tmp/data)",
        )
        command.add_argument(
            "--numerics",
            nargs="+",
            default=["native", "portable"],
            help="train.cpu_numerics values to compare; for cost, `@N` sets N threads first "
            "(native@1: one thread, the machine's own kernels)",
        )
        command.add_argument(
            "--env",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="extra environment for every child (e.g. MKL_CBWR=COMPATIBLE)",
        )
    sub.choices["cost"].add_argument("--repeats", type=int, default=3)
    sub.choices["matrix"].add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="thread counts of the emulated machines"
    )
    sub.choices["child"].add_argument("--threads", type=int, default=None)
    sub.choices["child"].add_argument("--onednn-off", action="store_true")
    args = parser.parse_args()
    if args.command == "child":
        print(json.dumps(_child(args)), flush=True)
    elif args.command == "matrix":
        _matrix(args)
    else:
        _cost(args)


def _overrides(args: argparse.Namespace) -> list[str]:
    return [item for pair in args.set for item in ("--set", pair)]


def _extra_env(args: argparse.Namespace) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in args.env)


def _run(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")
    }
    env.update(_extra_env(args))
    env.update(config.env)
    command = [
        sys.executable,
        __file__,
        "child",
        "--epochs",
        str(args.epochs),
        "--steps",
        str(args.steps),
        *_overrides(args),
    ]
    if config.threads is not None:
        command += ["--threads", str(config.threads)]
    if config.numerics not in (None, "-"):  # "-": the settings as they are
        command += ["--set", f"train.cpu_numerics={config.numerics}"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{config.name}: child exited {done.returncode}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _matrix(args: argparse.Namespace) -> None:
    print(
        f"{'numerics':9} {'machine':18} {'thr':>3} {'capability':10} {'weights':12} {'logits':12} "
        f"{'test top1':>9} {'img/s':>6}"
    )
    for numerics in args.numerics:
        seen: dict[tuple[str, str], int] = {}
        for machine, env in MACHINES.items():
            for threads in args.threads:
                out = _run(Config(machine, env, threads, numerics), args)
                key = (out["weights_sha256"], out["logits_sha256"])
                group = seen.setdefault(key, len(seen) + 1)
                print(
                    f"{numerics:9} {machine:18} {threads:>3} {out['capability']:10} "
                    f"{out['weights_sha256'][:10]:12} {out['logits_sha256'][:10]:12} "
                    f"{100 * out['test_top1']:8.2f}% {out['images_per_second']:6.0f}  #{group}",
                    flush=True,
                )
        print(f"{numerics}: {len(seen)} distinct result(s) over {len(MACHINES) * len(args.threads)} configurations\n")


def _variant(text: str) -> Config:
    """`native`, `portable`, or either with `@N` threads (native's default: torch's own, the core count)."""
    numerics, _, threads = text.partition("@")
    return Config(text, {}, int(threads) if threads else None, numerics)


def _cost(args: argparse.Namespace) -> None:
    """The variants alternately, `repeats` rounds (the order reversed every other round, so that the load of a
    shared machine hits all alike); medians of training throughput and of the run's wall time."""
    variants = [_variant(text) for text in args.numerics]
    results: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    for repeat in range(args.repeats):
        for config in variants if repeat % 2 == 0 else list(reversed(variants)):
            out = _run(config, args)
            results[config.name].append(out)
            print(
                f"round {repeat + 1} {config.name:12} {out['images_per_second']:7.1f} img/s  "
                f"{out['fit_seconds']:6.1f}s  weights {out['weights_sha256'][:10]}",
                flush=True,
            )
    base = variants[0].name
    print(
        f"\nmedians over {args.repeats} rounds [min-max]; cost = time relative to {base}. Wall clock is what a "
        "user waits; process CPU time is the work, robust to a shared machine's load (1-thread variants)"
    )
    for key, label in (("fit_seconds", "wall s"), ("fit_cpu_seconds", "CPU s")):
        base_time = statistics.median(r[key] for r in results[base])
        for name, runs in results.items():
            values = [r[key] for r in runs]
            print(
                f"{label:6} {name:12} {statistics.median(values):7.1f} [{min(values):.1f}-{max(values):.1f}]  "
                f"cost {100 * (statistics.median(values) / base_time - 1):+5.1f} %"
            )


def _child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.onednn_off:  # for exploring one pin at a time (with --env); `portable` turns it off itself
        # torch types this module flag as its ContextProp descriptor; assigning a bool is its documented use.
        torch.backends.mkldnn.enabled = False  # type: ignore[assignment]
    from sa2vp.settings import load_settings

    with tempfile.TemporaryDirectory(prefix="cpu-repro-") as tmp:
        overrides = {
            "train.output": tmp,
            "tracking.enabled": "false",
            "train.device": "cpu",
            "train.epochs": str(args.epochs),
        }
        overrides.update((key, yaml.safe_load(value)) for key, value in (pair.split("=", 1) for pair in args.set))
        settings = load_settings(ROOT / "params.yaml", overrides)
        out = _steps(settings, args.steps) if args.steps else _fit(settings, Path(tmp))
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "mkl_cbwr": _mkl_cbwr(),
        **out,
    }


def _fit(settings: Any, output: Path) -> dict[str, Any]:
    """The real `sa2vp train`: fit, then the artifact's bytes and its test logits."""
    from sa2vp.engine.trainer import fit

    start, cpu_start = time.perf_counter(), time.process_time()
    result = fit(settings)
    fit_seconds, fit_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    weights = hashlib.sha256((result.artifact / "model.safetensors").read_bytes()).hexdigest()
    logits = _test_logits(result.artifact, settings)
    history = (output / "history.csv").read_text(encoding="utf-8").splitlines()
    return {
        "weights_sha256": weights,
        "logits_sha256": hashlib.sha256(logits).hexdigest(),
        "test_top1": result.test.top1 if result.test else float("nan"),
        "images_per_second": statistics.median(_column(history, "train/images_per_second")),
        "fit_seconds": fit_seconds,
        "fit_cpu_seconds": fit_cpu_seconds,
    }


def _steps(settings: Any, steps: int) -> dict[str, Any]:
    """`steps` optimiser steps of fit's own pieces (model, loader order, AdamW, schedule, loss), then the
    logits of the test split: the same operations as `sa2vp train` at a fraction of its time."""
    import torch
    from torch.utils.data import DataLoader

    from sa2vp.data import load_split, read_manifest, split_dir
    from sa2vp.engine.artifact import build_seeded
    from sa2vp.engine.optim import build_optimizer, build_scheduler
    from sa2vp.engine.runtime import resolve_device
    from sa2vp.models.backbones import data_config

    resolve_device(settings.train.device)  # where a CPU run's numerics are set up
    folder = split_dir(settings.data)
    model = build_seeded(settings, len(read_manifest(folder).classes))
    config = data_config(model.backbone)
    loader = DataLoader(
        load_split(folder, "train", config),
        batch_size=settings.train.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(settings.train.seed),
    )
    optimizer = build_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad], settings.train)
    scheduler = build_scheduler(optimizer, settings.train, steps)
    batches = [batch for _, batch in zip(range(steps), loader, strict=False)]
    model.train()
    start, cpu_start = time.perf_counter(), time.process_time()
    for inputs, targets in batches:
        model.loss(model(inputs), targets).total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    test = load_split(folder, "test", config, train=False)
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(images) for images, _ in DataLoader(test, batch_size=settings.train.eval_batch_size)])
    state = model.trainable_state_dict()
    weights = hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()
    top1 = float((logits.argmax(1) == torch.tensor([t for _, t in test])).float().mean())
    return {
        "weights_sha256": weights,
        "logits_sha256": hashlib.sha256(logits.numpy().tobytes()).hexdigest(),
        "test_top1": top1,
        "images_per_second": sum(len(t) for _, t in batches) / seconds,
        "images_per_cpu_second": sum(len(t) for _, t in batches) / cpu_seconds,
        "fit_seconds": seconds,
        "fit_cpu_seconds": cpu_seconds,
    }


def _test_logits(artifact: Path, settings: Any) -> bytes:
    import torch
    from torch.utils.data import DataLoader

    from sa2vp.data import load_split, split_dir
    from sa2vp.engine.artifact import load_artifact

    loaded = load_artifact(artifact)
    data = load_split(split_dir(settings.data), "test", loaded.data_config, train=False, style=loaded.record.transform)
    model = loaded.model.eval()
    with torch.no_grad():
        chunks = [model(images) for images, _ in DataLoader(data, batch_size=settings.train.eval_batch_size)]
    return torch.cat(chunks).numpy().tobytes()


def _column(lines: list[str], name: str) -> list[float]:
    header = lines[0].split(",")
    index = header.index(name)
    return [float(line.split(",")[index]) for line in lines[1:]]


def _mkl_cbwr() -> int | None:
    """MKL's CNR setting in effect (mkl_cbwr_get(MKL_CBWR_ALL)), or None when MKL is not there."""
    import ctypes

    import torch

    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        return int(lib.mkl_serv_cbwr_get(ctypes.c_int(-1)))
    except (OSError, AttributeError):
        return None


if __name__ == "__main__":
    main()
