"""Frozen timm backbones: by name with hub weights, from a local weights file, or randomly initialised.

Weights are never unpickled: local files must be safetensors or Google's original `.npz` (read with
numpy's `allow_pickle=False`); hub downloads go through timm, which prefers safetensors and otherwise
loads with `torch.load(weights_only=True)`. A local file that is not what its suffix says (a renamed pickle,
a cut-off download, random bytes) is a BackboneError naming it before timm reads it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import sys
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from timm.layers import DropPath
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import sa2vp.models.offline_vit  # noqa: F401  (registers the timm name of the offline default backbone)
from sa2vp.errors import BackboneError, one_line
from sa2vp.settings import BackboneSettings, SettingsError

WEIGHT_SUFFIXES = (".safetensors", ".npz")
ACCEPTED_WEIGHTS = (
    "only safetensors files (.safetensors) and Google's original NumPy checkpoints (.npz) are loaded; "
    "convert a pickled one with safetensors.torch.save_file"
)

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def create_backbone(settings: BackboneSettings) -> nn.Module:
    """The frozen backbone described by `settings`, in eval mode, with its classifier removed."""
    architecture = settings.name.split(".", 1)[0]
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `timm.list_models()`"
        raise SettingsError(f"backbone.name: unknown timm model {settings.name!r}{hint}")
    kwargs = timm_kwargs(settings)
    if settings.weights == "random":
        model = timm.create_model(settings.name, pretrained=False, **kwargs)
    elif settings.weights == "hub":
        model = from_hub(settings.name, kwargs)
    else:
        path = Path(settings.weights)
        if settings.sha256 is not None:
            verify_file(path, settings.sha256)
        model = _from_file(settings.name, path, kwargs)
    dropout, drop_path = release_stochastic_rates(model)
    set_stochastic_layers(
        model,
        dropout=dropout if settings.dropout is None else settings.dropout,
        drop_path=drop_path if settings.drop_path is None else settings.drop_path,
    )
    return freeze(model)


def timm_kwargs(settings: BackboneSettings, num_classes: int = 0) -> dict[str, Any]:
    """The keyword arguments of `timm.create_model` for the architecture `settings` describe (model_kwargs,
    img_size), with a `num_classes`-way classifier (0: none, the frozen backbone's)."""
    kwargs: dict[str, Any] = {**settings.model_kwargs, "num_classes": num_classes}
    if settings.img_size is not None:
        kwargs["img_size"] = settings.img_size
    return kwargs


def release_stochastic_rates(model: nn.Module) -> tuple[float, float]:
    """(dropout, drop-path) the SA²VP release trains its backbone with (method file §2, §3): ViT dropout 0.1
    (its config's dropout_rate), Swin drop-path 0.2; none for other families."""
    if isinstance(model, VisionTransformer):
        return 0.1, 0.0
    if isinstance(model, SwinTransformer):
        return 0.0, 0.2
    return 0.0, 0.0


def set_stochastic_layers(model: nn.Module, dropout: float, drop_path: float) -> None:
    """Set the backbone's own dropout and stochastic depth, in place. They act only in training mode, which
    the method decides (model.backbone_dropout); the weights are untouched.

    dropout: the embedding dropout (`pos_drop`, applied to every pathway's tokens) and both dropouts of every
    MLP (after the activation and after fc2), as the release's ViT config (`dropout_rate`); the attention and
    its output projection keep theirs (the release's `attention_dropout_rate` is 0). drop_path: per block,
    rising linearly from 0 at the first block to `drop_path` at the last, as timm and the Swin release do.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and (name == "pos_drop" or name.endswith((".mlp.drop1", ".mlp.drop2"))):
            module.p = dropout
    blocks = [m for m in model.modules() if hasattr(m, "drop_path1") and hasattr(m, "drop_path2")]
    rates = torch.linspace(0, drop_path, len(blocks)).tolist() if blocks else []
    for block, rate in zip(blocks, rates, strict=True):
        block.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
        block.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()


def verify_file(path: Path, expected: str) -> None:
    """Refuse a weights file whose SHA-256 is not `expected` (backbone.sha256)."""
    if not path.is_file():
        raise SettingsError(f"backbone.weights: file not found: {path}")
    actual = file_sha256(path)
    if actual != expected:
        raise BackboneError(
            f"backbone.weights: {path} has SHA-256 {actual}, but backbone.sha256 pins {expected}: these are not the "
            "weights the settings name (restore the file, or set backbone.sha256 to the new file's hash)"
        )


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def from_hub(
    name: str,
    kwargs: dict[str, Any],
    setting: str = "backbone.weights=hub",
    instead: str = "set backbone.weights to a local .safetensors/.npz file or to 'random'",
) -> nn.Module:
    """timm's pretrained checkpoint of `name`, built with `kwargs`; a BackboneError naming `setting` (what asked
    for the download) and what to do `instead` when it cannot be fetched."""
    from sa2vp.data.sources.hub import single_attempt

    try:
        with single_attempt():  # no network: this error at once, not after half a minute of retries
            return timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        raise BackboneError(
            f"{setting}: could not fetch pretrained weights for {name!r} ({type(exc).__name__}: {exc}). Check the "
            f"network or HF_HUB_OFFLINE, or {instead}."
        ) from exc


def _from_file(name: str, path: Path, kwargs: dict[str, Any]) -> nn.Module:
    if path.suffix not in WEIGHT_SUFFIXES:
        raise SettingsError(
            f"backbone.weights: {path} is neither 'hub', 'random' nor a weights file with suffix "
            f"{' or '.join(WEIGHT_SUFFIXES)} (pickled checkpoints are not loaded)"
        )
    if not path.is_file():
        raise SettingsError(f"backbone.weights: file not found: {path}")
    npz = path.suffix == ".npz"
    problem = npz_problem(path) if npz else safetensors_problem(path)
    if problem is not None:
        raise BackboneError(f"backbone.weights: {path} {problem}; {ACCEPTED_WEIGHTS}")
    # timm's own loader adapts the file to the model (position-embedding resampling, classifier removal);
    # `custom_load` routes .npz files to the architecture's Google-checkpoint reader.
    overlay = {"file": str(path), "custom_load": npz}
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (
        KeyError,
        RuntimeError,
        ValueError,
        OSError,
        EOFError,
        zipfile.BadZipFile,
        zlib.error,
        SafetensorError,
    ) as exc:  # what a damaged or foreign file makes timm's readers raise
        hint = "; an .npz must be Google's original (JAX/Flax) checkpoint of this architecture" if npz else ""
        raise BackboneError(f"backbone.weights: {path} does not fit {name!r}: {one_line(exc)}{hint}") from exc
    if not npz:
        _require_the_files_architecture(model, name, kwargs, path)
    return model


def _require_the_files_architecture(model: nn.Module, name: str, kwargs: dict[str, Any], path: Path) -> None:
    """Refuse a file written for another architecture than the settings describe.

    timm loads a file non-strictly once the classifier is dropped (num_classes=0), and only warns in its log: a
    file whose names do not match (a `model.` prefix, another layout) would give a partly random backbone, and a
    deeper or wider one's extra weights would be dropped (a 12-block file read as 6 blocks). So every weight of
    the model must come from the file and every weight of the file but its classifier must be used; a file
    written by `sa2vp backbone materialise` must also record this network."""
    _require_the_recorded_architecture(model, name, kwargs, path)
    state = load_file(str(path))
    adapt = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if adapt is not None:  # the architecture's own renaming of older layouts, as timm applies it when loading
        state = adapt(state, model)
    wanted = model.state_dict()
    missing = [key for key in wanted if key not in state]
    classifier = str(getattr(model, "pretrained_cfg", {}).get("classifier") or "head")
    unused = sorted(key for key in state if key not in wanted and not key.startswith(f"{classifier}."))
    if missing:
        raise BackboneError(
            f"backbone.weights: {path} does not hold {len(missing)} of the {len(wanted)} weights of "
            f"{name!r} (e.g. {missing[:3]}; the file has e.g. {unused[:3]}): a model built from it would be "
            "partly random. Use a file written for this architecture, e.g. by `sa2vp backbone materialise`"
        )
    if unused:
        raise BackboneError(
            f"backbone.weights: {path} holds {len(unused)} weights that {name!r} with backbone.model_kwargs "
            f"{_model_kwargs(kwargs)} has no place for (e.g. {unused[:3]}): it was written for a larger "
            "or other architecture, and a model built from it would silently drop them. Set backbone.name and "
            "backbone.model_kwargs to the file's"
        )


def _require_the_recorded_architecture(model: nn.Module, name: str, kwargs: dict[str, Any], path: Path) -> None:
    """A file from `sa2vp backbone materialise` records the timm model and model_kwargs it was written for: the
    network they build (at this image size) must be this one, down to what the weights do not show (the head
    count of an attention reads the same qkv matrix either way). Names may differ: `offline_vit12` is
    `vit_tiny_patch16_224` with its kwargs."""
    recorded = read_safetensors_metadata(path)
    if "timm_name" not in recorded:
        return  # a file from elsewhere: the weight names are all there is to check
    file_kwargs = json.loads(recorded.get("model_kwargs") or "{}")
    wrote = f"{path} was written for {recorded['timm_name']!r} with model_kwargs {file_kwargs}"
    # at this model's input size: a file is read at another size by resampling its position embeddings
    image_size = getattr(getattr(model, "patch_embed", None), "img_size", None) or kwargs.get("img_size")
    size = {} if image_size is None else {"img_size": image_size}
    try:
        with torch.device("meta"):  # the architecture only: no memory, no initialisation
            written = timm.create_model(recorded["timm_name"], num_classes=0, **{**file_kwargs, **size})
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise BackboneError(f"backbone.weights: {wrote}, which timm cannot build here: {one_line(exc)}") from exc
    if _architecture(written) != _architecture(model):
        raise BackboneError(
            f"backbone.weights: {wrote}; the settings ask for {name!r} with {_model_kwargs(kwargs)}, another "
            "network. Set backbone.name and backbone.model_kwargs to the file's, or materialise a file for these "
            "settings"
        )


def _model_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """backbone.model_kwargs out of timm's keyword arguments (for messages)."""
    return {key: value for key, value in kwargs.items() if key not in ("num_classes", "img_size")}


def _architecture(model: nn.Module) -> list[tuple[str, ...]]:
    """What tells two networks apart: each module's name, class and head count, and each weight's shape. Not the
    stochastic layers (dropout, drop-path, or Identity where their rate is 0): training settings, not the network."""
    stochastic = (nn.Dropout, DropPath, nn.Identity)
    modules: list[tuple[str, ...]] = [
        (name, type(module).__name__, str(getattr(module, "num_heads", "")))
        for name, module in model.named_modules()
        if not isinstance(module, stochastic)
    ]
    weights: list[tuple[str, ...]] = [(name, str(tuple(tensor.shape))) for name, tensor in model.state_dict().items()]
    return modules + weights


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata in a safetensors file's header (empty when it has none)."""
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a readable safetensors file (header, and data as long as the header says), or None.

    Checked before anything reads the tensors, so that a pickle or a cut-off download is named as such rather
    than surfacing as a parser's error."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as exc:
        return f"is not a safetensors file ({_pickle_hint(path, (_PICKLE, _TORCH_ZIP)) or one_line(exc)})"
    return None


def npz_problem(path: Path) -> str | None:
    """Why `path` is not a NumPy .npz archive of plain arrays (Google's checkpoint format), or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"is not an .npz archive ({_pickle_hint(path, (_PICKLE,)) or one_line(exc)})"
    others = [member for member in members if not member.endswith(".npy")]
    if not members or others:
        pickled = any(member.endswith(".pkl") for member in others)  # torch.save's zip holds data.pkl
        hint = " — a torch.save checkpoint, which is never unpickled" if pickled else ""
        return f"is a zip archive but not of NumPy arrays ({others[:3] or 'no members'}{hint})"
    return None


_PICKLE = b"\x80"  # how pickle (protocol 2+) output starts: legacy torch.save, .pkl
_TORCH_ZIP = b"PK\x03\x04"  # torch.save's zip container (a zip: also how a valid .npz starts)


def _pickle_hint(path: Path, signatures: tuple[bytes, ...]) -> str | None:
    """'it looks like a pickled checkpoint …' when the file starts with one of `signatures`."""
    with path.open("rb") as handle:
        head = handle.read(4)
    if head.startswith(signatures):
        return "it looks like a pickled checkpoint (torch.save / .pth / .bin), which is never unpickled"
    return None


def freeze(model: ModuleT) -> ModuleT:
    """No gradients, and eval mode until a method puts it in training mode (model.backbone_dropout)."""
    model.requires_grad_(False)
    model.eval()
    return model


def token_grid(model: nn.Module) -> tuple[int, int]:
    """(rows, columns) of a ViT's patch-token grid."""
    vit: Any = model  # timm's models share no typed base beyond nn.Module
    rows, columns = vit.patch_embed.grid_size
    return int(rows), int(columns)


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
