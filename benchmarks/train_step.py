"""Training and inference throughput and peak memory of each adaptation method, beside one frozen pathway.

For each method (SA²VP at every window c given, VPT-deep, LoRA, AdaptFormer, the linear probe), built from the
settings exactly as `sa2vp train` builds it (random backbone weights, 100 classes), this measures

- training img/s: one full step as the trainer takes it — forward under autocast, the method's loss, backward,
  AdamW step;
- inference img/s: the eval-mode forward without gradients (what `sa2vp evaluate` runs);
- peak memory of each; on CUDA the allocator's peak (torch.cuda.max_memory_allocated, weights included), on the
  CPU the growth of the process's peak RSS over its RSS before the first step (activations, gradients and
  optimizer state; the weights are not counted);
- for SA²VP in eager mode, the share of the training step spent in the cross blocks (local attention, W_o,
  adapter; forward and backward, timed around each cross block's forward and backward inside real steps: CUDA
  events on a GPU, the clock on the CPU);

and the same for one pathway of the frozen backbone — forward + backward to its input for training (the floor of
a prompt method: SA²VP runs two such pathways, so its training ratio has a floor of about 2), forward for
inference — in training mode with the backbone's dropout as SA²VP trains it. Ratios are the pathway's img/s
over the method's. With --compile each configuration is measured again compiled (`train.compile`'s
torch.compile of the whole model; the pathway compiled too); the first step's time, compilation included, is
reported. Every measurement runs in a fresh process, so its peak memory is its own.

    python benchmarks/train_step.py --model vit_tiny_patch16_224 --image-size 224 --batch-size 16
    python benchmarks/train_step.py --model vit_base_patch16_224 --batch-size 64 --precision bf16 --device cuda \\
        --compile --json results/train_step.json

--json writes every figure with the commit, the library versions, the device and the settings, to compare
results across commits.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import subprocess
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import timm
import torch
import yaml
from torch import nn

import sa2vp
from sa2vp.atomic import write_atomic
from sa2vp.engine.compile import compile_model
from sa2vp.engine.runtime import cpuinfo_field
from sa2vp.models import AdaptedModel, build_model, create_backbone, parameter_summary
from sa2vp.models.base import TimmModel
from sa2vp.models.cross_block import SpatialCrossBlock
from sa2vp.models.local_attention import KERNELS, Kernel
from sa2vp.settings import Settings, SettingsError, load_settings

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
Step = Callable[[], None]
METHODS = ("sa2vp", "vpt-deep", "lora", "adaptformer", "linear")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
SCHEMA = 1
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Common:
    """What every measurement of one invocation shares."""

    model: str
    image_size: int
    batch_size: int
    precision: str
    device: str
    steps: int
    warmup: int
    kernel: str  # SA²VP's local attention: auto (choose_kernel), tiled, dense, flex or triton
    overrides: dict[str, Any]


@dataclass(frozen=True)
class Unit:
    """One measurement: a method (or "pathway"), its window (SA²VP), compiled or not."""

    method: str
    window: int | None
    compile: str  # "off" or a train.compile mode


@dataclass
class Figures:
    train_img_s: float
    infer_img_s: float
    train_peak_mib: float
    infer_peak_mib: float
    first_step_seconds: float  # the first training step, compilation included when compiled
    cross_share: float | None  # SA²VP eager only: the cross blocks' share of the training step
    trainable: int | None


def main() -> None:
    args = _arguments()
    common = Common(
        model=args.model,
        image_size=args.image_size,
        batch_size=args.batch_size,
        precision=args.precision or ("bf16" if args.device.startswith("cuda") else "fp32"),
        device=args.device,
        steps=args.steps,
        warmup=args.warmup,
        kernel=args.kernel,
        overrides=_parse_overrides(args.overrides),
    )
    methods = args.methods.split(",")
    for method in methods:  # a typo fails before anything is measured
        try:
            _settings(common, Unit(method, None, "off"))
        except SettingsError as exc:
            raise SystemExit(f"--methods {method}: {exc}") from None
    modes = ["off", *([args.compile] if args.compile else [])]
    units = [Unit("pathway", None, mode) for mode in modes]
    for mode in modes:
        for method in methods:
            windows = [int(w) for w in args.windows] if method == "sa2vp" else [None]
            units += [Unit(method, window, mode) for window in windows]

    measured: list[tuple[Unit, Figures]] = []
    context = multiprocessing.get_context("spawn")
    for unit in units:
        label = _label(unit)
        print(f"measuring {label} …", flush=True)
        with context.Pool(1) as pool:
            measured.append((unit, pool.apply(measure, (common, unit))))
    _print_table(common, measured)
    if args.json:
        write_atomic(Path(args.json), json.dumps(_document(common, measured), indent=2) + "\n")
        print(f"wrote {args.json}")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_tiny_patch16_224", help="timm backbone (random init)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, else fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--windows", nargs="+", default=["1", "3", "7"], help="SA²VP's window sizes c")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        choices=COMPILE_MODES,
        help="measure every configuration compiled as well (train.compile; mode default: default)",
    )
    parser.add_argument(
        "--kernel",
        choices=["auto", *KERNELS],
        default="auto",
        help="SA²VP's local-attention kernel (auto: local_attention.choose_kernel for the grid and device)",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a dotted setting (repeatable), e.g. model.lora.rank=16 or backbone.model_kwargs={depth: 6}",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="write every figure here as JSON")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    return args


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs, values read as YAML (as `sa2vp … --set` does)."""
    parsed = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. --set model.lora.rank=16")
        parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return parsed


def _settings(common: Common, unit: Unit) -> Settings:
    values: dict[str, Any] = {
        "backbone.name": common.model,
        "backbone.weights": "random",
        "backbone.img_size": common.image_size,
        "model.method": "sa2vp" if unit.method == "pathway" else unit.method,
        **common.overrides,
    }
    if unit.window is not None:
        values["model.sa2vp.window"] = unit.window
    return load_settings(None, values)


def _label(unit: Unit) -> str:
    window = f" c={unit.window}" if unit.window is not None else ""
    compiled = "" if unit.compile == "off" else f" compiled ({unit.compile})"
    return f"{unit.method}{window}{compiled}"


# --- one measurement, in a fresh process ------------------------------------------------------------------------


class Pathway(nn.Module):
    """One pathway of the frozen backbone: its forward up to the pooled feature, as a module to compile."""

    def __init__(self, backbone: TimmModel) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)


def measure(common: Common, unit: Unit) -> Figures:
    torch.manual_seed(0)
    device = torch.device(common.device)
    settings = _settings(common, unit)
    images = torch.randn(common.batch_size, 3, common.image_size, common.image_size, device=device)
    labels = torch.randint(0, 100, (common.batch_size,), device=device)
    dtype = DTYPES[common.precision]
    autocast: AbstractContextManager[Any] = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    baseline = _current_rss_mib()

    model: nn.Module
    if unit.method == "pathway":
        model = Pathway(create_backbone(settings.backbone)).to(device)
        train = _pathway_step(model, images, autocast)
        trainable = None
    else:
        adapted = build_model(settings, 100).to(device)
        _pin_kernel(adapted, common.kernel)
        model, trainable = adapted, parameter_summary(adapted).trainable
        train = _training_step(adapted, images, labels, autocast)
    compile_model(model, unit.compile)  # in place: the steps above call the compiled module

    # Inference first: on the CPU the peak RSS only grows, and inference peaks lower than training.
    model.eval()

    def infer() -> None:
        with torch.inference_mode(), autocast:
            model(images)

    infer_seconds, infer_peak, _ = _timed(infer, common, device, baseline)
    # The method's own training mode (its backbone's dropout as its reference code has it); the pathway's backbone
    # with its dropout, as SA²VP trains it.
    model.train()
    train_seconds, train_peak, first = _timed(train, common, device, baseline)
    cross_share = None
    if unit.method == "sa2vp" and unit.compile == "off":
        cross_share = _cross_share(model, train, common, device)
    return Figures(
        train_img_s=common.batch_size / train_seconds,
        infer_img_s=common.batch_size / infer_seconds,
        train_peak_mib=train_peak,
        infer_peak_mib=infer_peak,
        first_step_seconds=first,
        cross_share=cross_share,
        trainable=trainable,
    )


def _pathway_step(pathway: nn.Module, images: torch.Tensor, autocast: AbstractContextManager[Any]) -> Step:
    """Forward and backward to the input: what a prompt method cannot avoid, per pathway."""

    def step() -> None:
        inputs = images.detach().requires_grad_()
        with autocast:
            features = pathway(inputs)
        features.float().sum().backward()

    return step


def _training_step(
    model: AdaptedModel, images: torch.Tensor, labels: torch.Tensor, autocast: AbstractContextManager[Any]
) -> Step:
    """One step as the trainer takes it: forward under autocast, the method's loss, backward, AdamW."""
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)

    def step() -> None:
        with autocast:
            loss = model.loss(model(images), labels).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _pin_kernel(model: nn.Module, kernel: str) -> None:
    """SA²VP's local-attention kernel for every cross block (auto: left to choose_kernel)."""
    for block in model.modules():
        if isinstance(block, SpatialCrossBlock) and kernel != "auto":
            block.kernel = cast(Kernel, kernel)


def _timed(
    step: Callable[[], None], common: Common, device: torch.device, baseline: float
) -> tuple[float, float, float]:
    """(seconds per step after warm-up, peak MiB, seconds of the first step)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - start
    for _ in range(common.warmup - 1):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(common.steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / common.steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = _peak_rss_mib() - baseline
    return seconds, peak, first


def _cross_share(model: nn.Module, step: Callable[[], None], common: Common, device: torch.device) -> float:
    """The share of `step`'s time spent in the model's cross blocks, forward and backward: timed around each
    (module hooks) inside real steps, over the steps' own time in the same hooked run."""
    timer = _SpanTimer(device)
    handles = []
    for block in model.modules():
        if isinstance(block, SpatialCrossBlock):
            handles += [
                block.register_forward_pre_hook(lambda *_: timer.begin()),
                block.register_forward_hook(lambda *_: timer.end()),
                block.register_full_backward_pre_hook(lambda *_: timer.begin()),
                block.register_full_backward_hook(lambda *_: timer.end()),
            ]
    try:
        step()  # warm-up of the hooked step
        _sync(device)
        timer.reset()
        start = time.perf_counter()
        for _ in range(common.steps):
            step()
        _sync(device)
        total = time.perf_counter() - start
        return timer.seconds() / total
    finally:
        for handle in handles:
            handle.remove()


class _SpanTimer:
    """Sums the time between begin() and end() pairs: CUDA events on a GPU (read after a synchronise), the clock
    on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.spans: list[tuple[Any, Any]] = []
        self.started: Any = None

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def begin(self) -> None:
        self.started = self._now()

    def end(self) -> None:
        if self.started is not None:
            self.spans.append((self.started, self._now()))
            self.started = None

    def seconds(self) -> float:
        if self.cuda:
            return sum(start.elapsed_time(end) for start, end in self.spans) / 1000
        return sum(end - start for start, end in self.spans)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


# --- output -----------------------------------------------------------------------------------------------------


def _print_table(common: Common, measured: list[tuple[Unit, Figures]]) -> None:
    pathways = {unit.compile: figures for unit, figures in measured if unit.method == "pathway"}
    print(
        f"\nmodel={common.model} (random init)  image={common.image_size}  batch={common.batch_size}  "
        f"precision={common.precision}  device={_device_name(common.device)}  torch={torch.__version__}  "
        f"threads={torch.get_num_threads()}  kernel={common.kernel}  settings={common.overrides or 'defaults'}"
    )
    header = (
        f"{'method':>12} {'c':>3} {'compile':>15} {'train img/s':>12} {'ratio':>6} {'infer img/s':>12} {'ratio':>6}"
        f" {'cross %':>8} {'train MiB':>10} {'infer MiB':>10} {'1st step s':>11}"
    )
    print(header)
    print("-" * len(header))
    for unit, f in measured:
        pathway = pathways[unit.compile]
        cross = "" if f.cross_share is None else f"{100 * f.cross_share:.1f}%"
        print(
            f"{unit.method:>12} {unit.window or '':>3} {unit.compile:>15} {f.train_img_s:>12.1f}"
            f" {pathway.train_img_s / f.train_img_s:>6.2f} {f.infer_img_s:>12.1f}"
            f" {pathway.infer_img_s / f.infer_img_s:>6.2f} {cross:>8} {f.train_peak_mib:>10.0f}"
            f" {f.infer_peak_mib:>10.0f} {f.first_step_seconds:>11.2f}"
        )
    memory = (
        "CUDA allocator peak (weights included)"
        if common.device.startswith("cuda")
        else "growth of peak RSS over the RSS before the first step (weights not counted)"
    )
    print(f"ratio: one pathway's img/s over the method's (SA²VP's floor ≈ 2 in training); memory: {memory}")


def _document(common: Common, measured: list[tuple[Unit, Figures]]) -> dict[str, Any]:
    """Everything measured, and what it was measured on, as JSON (schema `SCHEMA`)."""
    pathways = {unit.compile: figures for unit, figures in measured if unit.method == "pathway"}
    rows = []
    for unit, figures in measured:
        pathway = pathways[unit.compile]
        rows.append(
            {
                **asdict(unit),
                **asdict(figures),
                "train_ratio": pathway.train_img_s / figures.train_img_s,
                "infer_ratio": pathway.infer_img_s / figures.infer_img_s,
            }
        )
    return {
        "schema": SCHEMA,
        "commit": _commit(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "sa2vp": getattr(sa2vp, "__version__", "unknown"),
        },
        "device": {
            "type": torch.device(common.device).type,
            "name": _device_name(common.device),
            "threads": torch.get_num_threads(),
        },
        "settings": asdict(common),
        "memory": "cuda_max_memory_allocated" if common.device.startswith("cuda") else "cpu_peak_rss_growth",
        "results": rows,
    }


def _commit() -> dict[str, Any] | None:
    """The checkout's commit and whether it has uncommitted changes. Outside a git checkout (a copy of the tree
    on a lent machine) the commit the copy was made from, when $BENCHMARK_COMMIT names it; else None."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        given = os.environ.get("BENCHMARK_COMMIT")
        return {"sha": given, "dirty": None, "source": "BENCHMARK_COMMIT"} if given else None
    return {"sha": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
