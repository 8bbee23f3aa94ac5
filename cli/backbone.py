"""`sa2vp backbone materialise`: the frozen backbone's weights as one .safetensors file (library:
sa2vp.pretraining) — downloaded from the hub, or pretrained offline on a generated source task."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sa2vp_cli.common import (
    ParamsOption, SetOption, expected_errors_exit_2, fail, is_terminal, progress, settings_from,
)

# Seconds between progress lines in a log (not a terminal): pretraining runs for minutes.
LOG_EVERY = 20.0

app = typer.Typer(help="The frozen backbone: materialise its weights as a file.", no_args_is_help=True)


@app.command("materialise")
@expected_errors_exit_2
def materialise(
    out: Annotated[Path | None, typer.Option(help="Weights file to write (.safetensors). Default: backbone.weights, "
                                             "when that is a file path.")] = None,
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
) -> None:
    """Write the backbone's weights: backbone.origin hub (download) or synthetic (pretrain offline)."""
    from sa2vp.data.progress import LineProgress
    from sa2vp.pretraining import materialise_backbone, read_metadata

    settings = settings_from(params, overrides)
    weights = settings.backbone.weights
    if out is None:
        if weights in ("hub", "random"):
            fail(f"backbone.weights={weights!r} is not a file: pass --out PATH.safetensors (and point "
                 "backbone.weights at it)")
        out = Path(weights)
    # On a terminal, a bar; in a log (DVC, CI), a plain line every LOG_EVERY seconds, never minutes of silence.
    reporter = progress() if is_terminal() else LineProgress(every=LOG_EVERY)
    written = materialise_backbone(settings.backbone, out, reporter)
    details = read_metadata(written)
    accuracy = f", source-task accuracy {float(details['source_accuracy']):.1%}" if "source_accuracy" in details else ""
    typer.echo(f"{settings.backbone.name} ({settings.backbone.origin}{accuracy}): {written}")
