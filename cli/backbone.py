"""`sa2vp backbone materialise`: the frozen backbone's weights as one .safetensors file (library:
sa2vp.pretraining) — downloaded from the hub, or pretrained offline on a generated source task."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import ParamsOption, SetOption, expected_errors_exit_2, fail, progress, settings_from

app = typer.Typer(help="The frozen backbone: materialise its weights as a file.", no_args_is_help=True)


@app.command("materialise")
@expected_errors_exit_2
def materialise(
    out: Annotated[
        Path | None,
        typer.Option(help="Weights file to write (.safetensors). Default: backbone.weights, when that is a file path."),
    ] = None,
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
) -> None:
    """Write the backbone's weights: backbone.origin hub (download) or synthetic (pretrain offline).

    Example: sa2vp backbone materialise --out vit-b16.safetensors --set backbone.name=vit_base_patch16_224.orig_in21k
    --set backbone.origin=hub
    """
    from sa2vp.pretraining import materialise_backbone, read_metadata

    settings = settings_from(params, overrides)
    weights = settings.backbone.weights
    if out is None:
        if weights in ("hub", "random"):
            fail(
                f"backbone.weights={weights!r} is not a file: pass --out PATH.safetensors (and point "
                "backbone.weights at it)"
            )
        out = Path(weights)
    # On a terminal, a bar; in a log (DVC, CI), a plain line every --log-every seconds, never minutes of silence.
    written = materialise_backbone(settings.backbone, out, progress())
    details = read_metadata(written)
    accuracy = f", source-task accuracy {float(details['source_accuracy']):.1%}" if "source_accuracy" in details else ""
    typer.echo(f"{settings.backbone.name} ({settings.backbone.origin}{accuracy}): {written}")
