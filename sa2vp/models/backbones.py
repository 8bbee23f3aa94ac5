"""Frozen timm backbones: by name with hub weights, from a local weights file, or randomly initialised.

Weights are never unpickled: local files must be safetensors or Google's original `.npz` (read with
numpy's `allow_pickle=False`); hub downloads go through timm, which prefers safetensors and otherwise
loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from sa2vp.errors import BackboneError
from sa2vp.settings import BackboneSettings, SettingsError

WEIGHT_SUFFIXES = (".safetensors", ".npz")


def create_backbone(settings: BackboneSettings) -> nn.Module:
    """The frozen backbone described by `settings`, in eval mode, with its classifier removed."""
    architecture = settings.name.split(".", 1)[0]
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `timm.list_models()`"
        raise SettingsError(f"backbone.name: unknown timm model {settings.name!r}{hint}")
    kwargs: dict[str, Any] = {**settings.model_kwargs, "num_classes": 0}
    if settings.img_size is not None:
        kwargs["img_size"] = settings.img_size

    if settings.weights == "random":
        model = timm.create_model(settings.name, pretrained=False, **kwargs)
    elif settings.weights == "hub":
        model = _from_hub(settings.name, kwargs)
    else:
        model = _from_file(settings.name, Path(settings.weights), kwargs)
    return freeze(model)


def _from_hub(name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        raise BackboneError(
            f"backbone.weights=hub: could not fetch pretrained weights for {name!r} ({type(exc).__name__}: "
            f"{exc}). Check the network or HF_HUB_OFFLINE, or set backbone.weights to a local "
            ".safetensors/.npz file or to 'random'."
        ) from exc


def _from_file(name: str, path: Path, kwargs: dict[str, Any]) -> nn.Module:
    if path.suffix not in WEIGHT_SUFFIXES:
        raise SettingsError(
            f"backbone.weights: {path} is neither 'hub', 'random' nor a weights file with suffix "
            f"{' or '.join(WEIGHT_SUFFIXES)} (pickled checkpoints are not loaded)"
        )
    if not path.is_file():
        raise SettingsError(f"backbone.weights: file not found: {path}")
    # timm's own loader adapts the file to the model (position-embedding resampling, classifier removal);
    # `custom_load` routes .npz files to the architecture's Google-checkpoint reader.
    overlay = {"file": str(path), "custom_load": path.suffix == ".npz"}
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (KeyError, RuntimeError, ValueError, OSError) as exc:
        raise BackboneError(f"backbone.weights: {path} does not fit {name!r}: {exc}") from exc


def freeze(model: nn.Module) -> nn.Module:
    """No gradients and eval mode (no backbone dropout or drop-path) for every backbone parameter."""
    model.requires_grad_(False)
    return model.eval()


def token_grid(model: nn.Module) -> tuple[int, int]:
    """(rows, columns) of a ViT's patch-token grid."""
    return tuple(model.patch_embed.grid_size)  # type: ignore[return-value]


def weights_digest(model: nn.Module, rename: Callable[[str], str | None] | None = None) -> str:
    """SHA-256 over the backbone's state (names, shapes, dtypes and bytes): identifies the exact weights.

    `rename` maps a state key to the name it is hashed under, or None to leave it out: an adapted model's
    `backbone_name`, so that what a method injected into the backbone (LoRA) does not change its digest.
    """
    state = model.state_dict()
    if rename is not None:
        state = {new: tensor for name, tensor in state.items() if (new := rename(name)) is not None}
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def data_config(model: nn.Module) -> dict[str, Any]:
    """timm's data configuration (input size, interpolation, mean, std, crop) for the backbone as built.

    timm reports the pretrained configuration's input size even when the model was created with another
    `img_size`; the size the patch embedding was actually built for is the one that counts.
    """
    config = dict(timm.data.resolve_model_data_config(model))
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if built is not None:
        config["input_size"] = (config["input_size"][0], int(built[0]), int(built[1]))
    return config
