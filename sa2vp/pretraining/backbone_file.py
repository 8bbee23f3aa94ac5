"""The frozen backbone's weights as one safetensors file: downloaded, or pretrained offline, with how it was made.

`materialise_backbone` writes the file that `backbone.weights: <path>.safetensors` later loads
(`sa2vp.models.backbones.create_backbone`); its metadata names the architecture and, for a pretrained one, the
pretraining settings and source-task accuracy. The bytes depend only on the weights and the metadata, so that
DVC sees the same file for the same backbone.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from sa2vp.atomic import atomic_path
from sa2vp.data.progress import NO_PROGRESS, Progress
from sa2vp.errors import BackboneError
from sa2vp.models.backbones import from_hub, read_safetensors_metadata, timm_kwargs
from sa2vp.pretraining.loop import pretrain
from sa2vp.settings import BackboneSettings


def materialise_backbone(settings: BackboneSettings, out: Path, progress: Progress = NO_PROGRESS) -> Path:
    """Write the backbone's weights (classifier removed) to `out` (.safetensors), atomically; return `out`.

    origin `synthetic`: pretrained here on the generated source task; origin `hub`: timm's checkpoint of
    `settings.name`. The file loads with `backbone.weights: <out>` and the same name, img_size and model_kwargs.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise BackboneError(f"backbone weights are written as .safetensors; got {out}")
    metadata = {
        "timm_name": settings.name,
        "origin": settings.origin,
        "img_size": json.dumps(settings.img_size),
        "model_kwargs": json.dumps(settings.model_kwargs, sort_keys=True),
    }
    model: nn.Module
    if settings.origin == "synthetic":
        result = pretrain(settings, progress)
        model = result.model
        metadata |= {
            "seed": str(settings.pretrain.seed),
            "source_accuracy": f"{result.source_accuracy:.4f}",
            "pretrain": settings.pretrain.model_dump_json(),
        }
    else:
        offline = "set backbone.origin to 'synthetic' to pretrain offline"
        model = from_hub(settings.name, timm_kwargs(settings), setting="backbone.origin=hub", instead=offline)
    save_weights(model, out, metadata)
    return out


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata a materialised weights file carries (timm name, origin, seed, source accuracy, …)."""
    return read_safetensors_metadata(path)


def save_weights(model: nn.Module, out: Path, metadata: dict[str, str]) -> None:
    """The model's state as a safetensors file with `metadata`, written atomically and with a sorted header."""
    # Contiguous clones: safetensors refuses shared or strided storage.
    tensors = {name: tensor.detach().contiguous().clone() for name, tensor in model.state_dict().items()}
    try:
        with atomic_path(out) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", **metadata})
            _sort_header(tmp)
    except OSError as exc:
        raise BackboneError(f"could not write the backbone weights to {out}: {exc}") from exc


def _sort_header(path: Path) -> None:
    """Rewrite the safetensors JSON header with sorted keys, in place and at the same length. safetensors
    writes the metadata in hash-map order, which changes from process to process: the same weights would
    hash differently, and DVC would see a new backbone on every run."""
    with path.open("r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(text) <= length:  # safetensors pads its header with spaces to an 8-byte boundary
            handle.seek(8)
            handle.write(text.ljust(length, b" "))
