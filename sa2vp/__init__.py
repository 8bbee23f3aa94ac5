"""SA²VP: spatially aligned-and-adapted visual prompt tuning on frozen timm backbones.

    loaded = sa2vp.load_artifact("runs/train/model")     # a model `sa2vp train` (or sa2vp.engine.fit) trained
    sa2vp.predict(loaded, ["cat.png"], top_k=3)           # image files, or a tensor batch of images

`import sa2vp` is light: these load torch and the engine when first used.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("sa2vp")  # one home: pyproject.toml
except PackageNotFoundError:  # pragma: no cover  (a source tree that was never installed)
    __version__ = "0+unknown"

__all__ = ["__version__", "load_artifact", "predict"]


def __getattr__(name: str) -> Any:
    if name in ("load_artifact", "predict"):
        from sa2vp import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'sa2vp' has no attribute {name!r}")
