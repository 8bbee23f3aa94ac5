"""SA²VP: spatially aligned-and-adapted visual prompt tuning on frozen timm backbones."""

__version__ = "0.1.0"
