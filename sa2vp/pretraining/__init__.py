"""The offline backbone: the frozen backbone's weights materialised as one safetensors file.

`sa2vp backbone materialise` (and `dvc --cd pipelines/backbone repro`) call `materialise_backbone`, which either
downloads timm's checkpoint (`backbone.origin: hub`) or pretrains the architecture from scratch on a generated
source task (`backbone.origin: synthetic`, the offline default). Three modules, read in this order:

- `source_task`: the glyph-classification task — class prototypes, their random renderings, the batches.
- `loop`: the pretraining run — model, optimiser and schedule (shared with the engine, `sa2vp.engine.optim`),
  the held-out accuracy.
- `backbone_file`: the weights file — what it holds, its metadata, and writing it byte-reproducibly.
"""

from sa2vp.pretraining.backbone_file import materialise_backbone, read_metadata
from sa2vp.pretraining.loop import Pretrained, accuracy_on, input_geometry, normalise, pretrain
from sa2vp.pretraining.source_task import GlyphTask, generate, make_task, render_images

__all__ = [
    "GlyphTask",
    "Pretrained",
    "accuracy_on",
    "generate",
    "input_geometry",
    "make_task",
    "materialise_backbone",
    "normalise",
    "pretrain",
    "read_metadata",
    "render_images",
]
