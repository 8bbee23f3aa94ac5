"""Training-step throughput and peak memory of SA²VP, beside one frozen-backbone pathway — or of any set of
adaptation methods side by side (--methods).

SA²VP runs two pathways through the frozen backbone, so its floor is about 2× one pathway's
forward + backward-to-input; the "ratio" column is SA²VP's step time over that single pathway's.
"cross %" is the share of the SA²VP step spent in the cross blocks (local attention + W_o + adapter,
forward and backward, all layers), timed on their own at the model's shapes.

Each measurement (SA²VP, or the single pathway) runs in a fresh child process, so its peak memory is its own:
on CUDA the allocator's peak (weights included); on CPU the growth of the peak RSS over the RSS just before
the first step (activations, gradients and optimizer state; the weights are not counted).

    python benchmarks/train_step.py --backbone vit_tiny_patch16_224 --batch 16 --windows 1 3 7
    python benchmarks/train_step.py --backbone vit_base_patch16_224 --batch 64 --precisions bf16 fp32 --device cuda

With --methods (or --set model.method=…), each method is built from the settings exactly as `sa2vp train`
builds it (random backbone weights; --set adds any dotted setting, e.g. model.vpt.tokens=50) and one full
training step — forward, its loss, backward, AdamW step — is timed; one table for all methods:

    python benchmarks/train_step.py --backbone vit_base_patch16_224 --batch 64 --precisions bf16 --device cuda \
        --methods linear,full,vpt-shallow,vpt-deep,lora,adaptformer,sa2vp
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import timm
import torch
import yaml
from timm.models.vision_transformer import VisionTransformer

from sa2vp.models import SA2VPModel, SA2VPViT, build_model, parameter_summary, sa2vp_loss
from sa2vp.models.backbones import freeze
from sa2vp.models.sa2vp_vit import _attention, _attention_inputs, _project_out
from sa2vp.settings import SA2VPSettings, SettingsError, load_settings

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Config:
    backbone: str
    batch: int
    img_size: int
    window: int | str
    precision: str
    device: str
    steps: int
    warmup: int
    compile: str | None


@dataclass
class Result:
    config: Config
    sa2vp_img_s: float
    pathway_img_s: float
    cross_share: float
    sa2vp_peak_mib: float
    pathway_peak_mib: float


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_tiny_patch16_224", help="timm ViT name (random init)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--windows", nargs="+", default=["1", "3", "7"], help="window sizes c (or 'global')")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        help="torch.compile the cross blocks, optionally with a mode (e.g. max-autotune-no-cudagraphs)",
    )
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated methods (linear,full,vpt-shallow,vpt-deep,lora,adaptformer,sa2vp): "
        "time each one's training step instead of SA²VP against one pathway",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a dotted setting for --methods (repeatable), e.g. model.lora.rank=16",
    )
    args = parser.parse_args()

    overrides = _parse_overrides(args.overrides)
    methods = args.methods.split(",") if args.methods else None
    if methods is None and "model.method" in overrides:
        methods = [overrides["model.method"]]
    if methods:
        compare_methods(args, methods, overrides)
        return

    configs = [
        Config(
            args.backbone,
            args.batch,
            args.img_size,
            w if w == "global" else int(w),
            p,
            args.device,
            args.steps,
            args.warmup,
            args.compile,
        )
        for p in args.precisions
        for w in args.windows
    ]
    results = []
    context = multiprocessing.get_context("spawn")
    for config in configs:
        print(f"measuring {config.precision} c={config.window} …", flush=True)
        with context.Pool(1) as pool:
            sa2vp_time, sa2vp_peak, cross_time = pool.apply(measure, (config, "sa2vp"))
        with context.Pool(1) as pool:
            pathway_time, pathway_peak, _ = pool.apply(measure, (config, "pathway"))
        results.append(
            Result(
                config,
                config.batch / sa2vp_time,
                config.batch / pathway_time,
                cross_time / sa2vp_time,
                sa2vp_peak,
                pathway_peak,
            )
        )
    print_table(results)


@dataclass
class MethodResult:
    method: str
    precision: str
    trainable: int
    percent: float
    img_s: float
    peak_mib: float


def compare_methods(args: argparse.Namespace, methods: list[str], overrides: dict[str, object]) -> None:
    """One fresh process per method and precision (its own peak memory); one table."""
    base = {
        "backbone.name": args.backbone,
        "backbone.weights": "random",
        "backbone.img_size": args.img_size,
        **overrides,
    }
    for method in methods:  # fail on a typo before measuring anything
        try:
            load_settings(None, {**base, "model.method": method})
        except SettingsError as exc:
            raise SystemExit(f"--methods {method}: {exc}") from None
    results = []
    context = multiprocessing.get_context("spawn")
    for precision in args.precisions:
        for method in methods:
            print(f"measuring {method} {precision} …", flush=True)
            settings = {**base, "model.method": method}
            with context.Pool(1) as pool:
                results.append(
                    pool.apply(
                        measure_method,
                        (
                            settings,
                            args.batch,
                            args.img_size,
                            precision,
                            args.device,
                            args.steps,
                            args.warmup,
                            args.compile,
                        ),
                    )
                )
    _print_header(
        f"backbone={args.backbone} (random init)  batch={args.batch}  img={args.img_size}  device={args.device}",
        f"overrides={overrides or 'none'}",
        f"{'method':>12} {'precision':>9} {'trainable':>12} {'% backbone':>11} {'img/s':>9} {'ms/step':>8}"
        f" {'peak MiB':>9}",
    )
    for r in results:
        print(
            f"{r.method:>12} {r.precision:>9} {r.trainable:>12,} {r.percent:>10.3f}% {r.img_s:>9.1f}"
            f" {1000 * args.batch / r.img_s:>8.1f} {r.peak_mib:>9.0f}"
        )


def measure_method(
    settings: dict[str, object],
    batch: int,
    img_size: int,
    precision: str,
    device_name: str,
    steps: int,
    warmup: int,
    compile_mode: str | None,
) -> MethodResult:
    """A full training step of the method the settings describe: forward, its loss, backward, AdamW."""
    torch.manual_seed(0)
    device = torch.device(device_name)
    model = build_model(load_settings(None, settings), 100).to(device).train()
    if compile_mode and isinstance(model, SA2VPModel):
        model.compile_cross_blocks(mode=None if compile_mode == "default" else compile_mode)
    summary = parameter_summary(model)
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    labels = torch.randint(0, 100, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=DTYPES[precision]) if DTYPES[precision] else nullcontext()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)

    def step() -> None:
        with autocast:
            loss = model.loss(model(images), labels).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    config = Config(
        str(settings["backbone.name"]), batch, img_size, "-", precision, device_name, steps, warmup, compile_mode
    )
    seconds, peak = _timed(step, config, device)
    return MethodResult(
        str(settings["model.method"]), precision, summary.trainable, summary.percent_of_backbone, batch / seconds, peak
    )


def _parse_overrides(items: list[str]) -> dict[str, object]:
    """KEY=VALUE pairs, values read as YAML (as `sa2vp … --set` does)."""
    parsed = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. --set model.lora.rank=16")
        parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return parsed


def measure(config: Config, which: str) -> tuple[float, float, float]:
    """(seconds per step, peak MiB, seconds per step in the cross blocks) of `which` ("sa2vp" | "pathway")."""
    torch.manual_seed(0)
    device = torch.device(config.device)
    vit = timm.create_model(config.backbone, pretrained=False, num_classes=0, img_size=config.img_size)
    if not isinstance(vit, VisionTransformer):
        raise SystemExit(f"--backbone {config.backbone}: not a timm VisionTransformer ({type(vit).__name__})")
    freeze(vit)
    model = SA2VPViT(vit, 100, SA2VPSettings(window=config.window)).to(device)
    model.train()
    if config.compile:
        model.compile_cross_blocks(mode=None if config.compile == "default" else config.compile)
    images = torch.randn(config.batch, 3, config.img_size, config.img_size, device=device)
    labels = torch.randint(0, 100, (config.batch,), device=device)
    autocast = (
        torch.autocast(device.type, dtype=DTYPES[config.precision]) if DTYPES[config.precision] else nullcontext()
    )
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)

    def sa2vp_step() -> None:
        with autocast:
            loss, _, _ = sa2vp_loss(model(images), labels, lam=0.8)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def pathway_step() -> None:
        # One frozen pathway, forward and backward to its input: what a prompt method can't avoid.
        x = images.detach().requires_grad_()
        with autocast:
            out = vit.forward_head(vit.forward_features(x), pre_logits=True)
        out.float().sum().backward()

    if which == "pathway":
        return (*_timed(pathway_step, config, device), 0.0)
    seconds, peak = _timed(sa2vp_step, config, device)
    return seconds, peak, _cross_blocks_time(model, images, autocast, config, device)


def _cross_blocks_time(
    model: SA2VPViT,
    images: torch.Tensor,
    autocast: AbstractContextManager[Any],
    config: Config,
    device: torch.device,
) -> float:
    """Forward + backward of every layer's cross block on its own, at the shapes the model feeds it."""
    with torch.no_grad(), autocast:
        tokens = model._embed_images(images)
        q, k, v = _attention_inputs(model._blocks[0], torch.cat([tokens, tokens]))
    batch = images.shape[0]
    inputs = [t[:batch].detach().clone().requires_grad_() for t in (q, k, v)] + [tokens.detach().requires_grad_()]

    def step() -> None:
        with autocast:
            total = images.new_zeros((), dtype=torch.float32)
            for i, block in enumerate(model._blocks):
                out = model.cross[i](*inputs[:3], inputs[3], partial(_project_out, _attention(block)))
                total = total + out.float().sum()
        total.backward()

    return _timed(step, config, device)[0]


def _timed(step: Callable[[], None], config: Config, device: torch.device) -> tuple[float, float]:
    """(seconds per step, peak MiB) after warm-up."""
    rss_before = _current_rss_mib()
    for _ in range(config.warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(config.steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / config.steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = _peak_rss_mib() - rss_before
    return seconds, peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def print_table(results: list[Result]) -> None:
    first = results[0].config
    _print_header(
        f"backbone={first.backbone} (random init)  batch={first.batch}  img={first.img_size}  device={first.device}",
        f"compiled cross blocks={first.compile}",
        f"{'precision':>9} {'c':>6} {'SA2VP img/s':>12} {'1-pathway img/s':>16} {'ratio':>6} {'cross %':>8}"
        f" {'SA2VP peak MiB':>15} {'1-pathway peak MiB':>19}",
    )
    for r in results:
        c = r.config
        print(
            f"{c.precision:>9} {c.window!s:>6} {r.sa2vp_img_s:>12.1f} {r.pathway_img_s:>16.1f}"
            f" {r.pathway_img_s / r.sa2vp_img_s:>6.2f} {100 * r.cross_share:>7.1f}%"
            f" {r.sa2vp_peak_mib:>15.0f} {r.pathway_peak_mib:>19.0f}"
        )


def _print_header(measured: str, setting: str, header: str) -> None:
    """What was measured, with torch's version and threads and one more setting (a line), then the table's
    column names, underlined."""
    print(f"\n{measured}  torch={torch.__version__}  threads={torch.get_num_threads()}  {setting}")
    print(header)
    print("-" * len(header))


if __name__ == "__main__":
    main()
