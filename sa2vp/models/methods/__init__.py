"""The adaptation methods: one module each, and the one registry that `build_model` and tuning read.

A method module exposes

    build(backbone, num_classes, settings) -> AdaptedModel    # settings: the `model:` section (ModelSettings)
    SEARCH_SPACE: dict[str, FloatRange | IntRange | Choice]    # what tuning searches by default, by dotted key

Adding a method: a module here, its line in METHODS, and its name in `ModelSettings.method` (its own settings,
if any: a section class in sa2vp/settings.py and its field in ModelSettings). The modules
import sa2vp.models' submodules, never the package's __init__ (which imports this registry).
"""

from __future__ import annotations

from typing import Protocol

from torch import nn

from sa2vp.models.base import AdaptedModel
from sa2vp.models.methods import adaptformer, full, linear, lora, vpt
from sa2vp.models.methods import sa2vp as sa2vp_method
from sa2vp.settings import ModelSettings, SearchDimension


class Method(Protocol):
    SEARCH_SPACE: dict[str, SearchDimension]

    def build(self, backbone: nn.Module, num_classes: int, settings: ModelSettings) -> AdaptedModel: ...


# Modules satisfy `Method` structurally (PEP 544 allows modules as protocol implementations).
METHODS: dict[str, Method] = {
    "sa2vp": sa2vp_method,
    "linear": linear,
    "full": full,
    "vpt-shallow": vpt,  # one module for both: settings.method picks shallow or deep
    "vpt-deep": vpt,
    "lora": lora,
    "adaptformer": adaptformer,
}
