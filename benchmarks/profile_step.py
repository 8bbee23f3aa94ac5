"""Where an SA²VP training step spends its time: the top operators by device (or CPU) time.

python benchmarks/profile_step.py --backbone vit_base_patch16_224 --batch 64 --precision bf16 --window 3
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.profiler import ProfilerActivity, profile

from sa2vp.models import SA2VPViT, sa2vp_loss
from sa2vp.models.backbones import freeze
from sa2vp.settings import SA2VPSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_tiny_patch16_224")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--window", default="3")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()

    device = torch.device(args.device)
    vit = timm.create_model(args.backbone, pretrained=False, num_classes=0, img_size=args.img_size)
    if not isinstance(vit, VisionTransformer):
        raise SystemExit(f"--backbone {args.backbone}: not a timm VisionTransformer ({type(vit).__name__})")
    freeze(vit)
    window = args.window if args.window == "global" else int(args.window)
    model = SA2VPViT(vit, 100, SA2VPSettings(window=window)).to(device)
    model.train()
    if args.compile:
        model.compile_cross_blocks()
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, 100, (args.batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()

    def step() -> None:
        with autocast:
            loss, _, _ = sa2vp_loss(model(images), labels, lam=0.8)
        loss.backward()

    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
