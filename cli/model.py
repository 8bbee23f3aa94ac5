"""`sa2vp model summary`: build the configured method on its backbone and say what it trains
(library: sa2vp.models)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .common import ParamsOption, SetOption, expected_errors_exit_2, settings_from

app = typer.Typer(help="Build models and inspect them.", no_args_is_help=True)


@app.command("summary")
@expected_errors_exit_2
def model_summary(
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    num_classes: Annotated[int, typer.Option(min=1, help="Classes of the task head.")] = 100,
) -> None:
    """Build the configured method (model.method: sa2vp, linear, full, vpt-shallow, vpt-deep, lora, adaptformer)
    on the configured backbone and print its trainable parameters and the settings it was built with.

    Example: sa2vp model summary --set backbone.name=swin_tiny_patch4_window7_224 --set backbone.weights=random
    """
    from sa2vp.models import build_model, parameter_summary

    settings = settings_from(params, overrides)
    model = build_model(settings, num_classes)
    summary = parameter_summary(model)
    table = Table(title=f"{settings.model.method} on {settings.backbone.name} ({settings.backbone.weights} weights)")
    table.add_column("group")
    table.add_column("trainable parameters", justify="right")
    for group, count in summary.groups.items():
        table.add_row(group, f"{count:,}")
    table.add_row("total (head excluded)", f"{summary.trainable:,}", style="bold")
    table.add_row(f"head ({num_classes} classes)", f"{summary.head:,}")
    table.add_row("backbone" if "backbone" in summary.groups else "frozen backbone", f"{summary.backbone:,}")
    table.add_row("trainable / backbone", f"{summary.percent_of_backbone:.3f} %", style="bold")
    Console().print(table)
    for line in model.describe():  # each model says what it was built as (method file: its settings, layers)
        typer.echo(line)
