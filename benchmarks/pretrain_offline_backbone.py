"""Pretrain the offline default backbone on the generated glyph task and check how useful it is for digits.

Runs `materialise_backbone` (origin: synthetic) with the offline backbone's pretraining settings (those of
pipelines/backbone/params.yaml; --set changes them), or takes a weights file already made (--weights, e.g. the
committed backbones/offline-vit12.safetensors), loads it the way the pipeline does
(`create_backbone(weights=<file>)`), and fits a quick frozen-feature linear probe
(standardised CLS features → scikit-learn LogisticRegression) on scikit-learn's 8×8 digits, rendered like
`sa2vp/data/sources/digits.py` renders them and transformed like `sa2vp.data.dataset` does (stratified
train/test split). The same architecture with random weights is the baseline: pretraining must clearly beat
it, yet leave a linear probe short of perfect so that SA²VP has something to improve on.

    python benchmarks/pretrain_offline_backbone.py --weights backbones/offline-vit12.safetensors
    python benchmarks/pretrain_offline_backbone.py
    python benchmarks/pretrain_offline_backbone.py --set pretrain.epochs=3 pretrain.classes=300 --threads 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sa2vp.data.dataset import build_transform
from sa2vp.data.progress import LineProgress
from sa2vp.models.backbones import create_backbone, data_config
from sa2vp.pretraining import materialise_backbone, read_metadata
from sa2vp.settings import BackboneSettings, PretrainSettings, load_settings, set_dotted

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    args = _parse()
    torch.set_num_threads(args.threads)
    wall = None
    if args.weights:  # a file already made: its architecture and pretraining settings are in its metadata
        metadata = read_metadata(Path(args.weights))
        settings = BackboneSettings(
            name=metadata["timm_name"],
            img_size=json.loads(metadata["img_size"]),
            model_kwargs=json.loads(metadata["model_kwargs"]),
            origin=metadata["origin"],
            pretrain=PretrainSettings.model_validate_json(metadata["pretrain"]),
        )
        pretrained = create_backbone(settings.model_copy(update={"weights": args.weights}))
    else:
        settings = _settings(args.set)
        with tempfile.TemporaryDirectory() as folder:
            out = Path(args.out) if args.out else Path(folder) / "backbone.safetensors"
            started = time.perf_counter()
            materialise_backbone(settings, out, progress=LineProgress(every=30))
            wall = time.perf_counter() - started
            metadata = read_metadata(out)
            pretrained = create_backbone(settings.model_copy(update={"weights": str(out)}))
    torch.manual_seed(args.seed)
    random = create_backbone(settings.model_copy(update={"weights": "random"}))
    images, labels = _digits(pretrained)
    train, test = train_test_split(
        np.arange(len(labels)), test_size=args.test_size, stratify=labels, random_state=args.seed
    )
    pre = _probe(_features(pretrained, images), labels, train, test)
    rnd = _probe(_features(random, images), labels, train, test)
    pixels = _probe(images.flatten(1).numpy(), labels, train, test)
    print(f"backbone               {settings.name} img_size={settings.img_size} {settings.model_kwargs}")
    print(f"parameters             {sum(p.numel() for p in pretrained.parameters()) / 1e6:.2f} M")
    print(f"pretraining settings   {settings.pretrain.model_dump()}")
    if wall is not None:
        print(
            f"pretraining wall time  {wall:.1f} s ({settings.pretrain.threads or torch.get_num_threads()} torch "
            "threads)"
        )
    print(
        f"source-task accuracy   {float(metadata['source_accuracy']):.1%} (held out, "
        f"{settings.pretrain.classes} classes)"
    )
    print(
        f"digits probe           pretrained {pre:.1%} | random weights {rnd:.1%} | raw pixels {pixels:.1%} "
        f"({len(train)} train / {len(test)} test images)"
    )


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="backbone settings over the default, e.g. pretrain.epochs=3 img_size=16",
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="probe this weights file (made by materialise) instead of pretraining; --set is then ignored",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads of the probe's feature extraction "
        "(the pipeline's CPU has 2 cores; pretraining uses pretrain.threads)",
    )
    parser.add_argument("--test-size", type=float, default=0.3, help="fraction of the digits held out for the probe")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probe split and of the random baseline")
    parser.add_argument("--out", default=None, help="keep the weights file here (default: a temporary folder)")
    return parser.parse_args()


def _settings(overrides: list[str]) -> BackboneSettings:
    """The offline backbone as its pipeline makes it (pipelines/backbone/params.yaml: architecture, origin and
    pretraining), with --set's `key=value` (values are YAML) on top."""
    made = load_settings(REPO / "pipelines/backbone/params.yaml").backbone.model_dump()
    for item in overrides:
        key, _, raw = item.partition("=")
        set_dotted(made, key, yaml.safe_load(raw))
    return BackboneSettings(**made)


def _digits(model: torch.nn.Module) -> tuple[torch.Tensor, np.ndarray]:
    """All 1,797 digits as the pipeline feeds them: rendered at the input size (as digits.py writes the PNGs),
    read as RGB, then the evaluation transform built from the backbone's data config."""
    config = data_config(model)
    _, _, size = config["input_size"]
    transform = build_transform(config, "vtab", train=False)
    bunch = load_digits()
    images = []
    for pixels in bunch.images:
        ink = Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8), mode="L")
        images.append(transform(ink.resize((size, size), Image.Resampling.BILINEAR).convert("RGB")))
    return torch.stack(images), bunch.target


def _features(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(batch) for batch in images.split(512)]).numpy()


def _probe(features: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    probe.fit(features[train], labels[train])
    return float(probe.score(features[test], labels[test]))


if __name__ == "__main__":
    main()
