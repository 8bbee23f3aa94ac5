"""`sa2vp` — the command-line entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sa2vp_cli import train as training
from sa2vp_cli.backbone import app as backbone_app
from sa2vp_cli.common import ParamsOption, SetOption, expected_errors_exit_2, settings_from, setup_logging
from sa2vp_cli.data import app as data_app
from sa2vp_cli.suite import app as suite_app

app = typer.Typer(
    name="sa2vp",
    help="SA²VP visual prompt tuning on frozen timm backbones.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Build models and inspect them.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")
app.add_typer(backbone_app, name="backbone")
app.add_typer(suite_app, name="suite")
app.command("train")(training.train)
app.command("evaluate")(training.evaluate)
app.command("predict")(training.predict)
app.command("tune")(training.tune)
app.command("ui")(training.ui)


@app.callback()
def main() -> None:
    """SA²VP visual prompt tuning on frozen timm backbones."""
    setup_logging()


@model_app.command("summary")
@expected_errors_exit_2
def model_summary(
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    num_classes: Annotated[int, typer.Option(min=1, help="Classes of the task head.")] = 100,
) -> None:
    """Build the configured method (model.method: sa2vp, linear, full, vpt-shallow, vpt-deep, lora, adaptformer)
    on the configured backbone and print its trainable parameters."""
    from sa2vp.models import build_model, parameter_summary

    settings = settings_from(params, overrides)
    model = build_model(settings, num_classes)
    summary = parameter_summary(model)
    method = "SA²VP" if settings.model.method == "sa2vp" else settings.model.method
    table = Table(title=f"{method} on {settings.backbone.name} ({settings.backbone.weights} weights)")
    table.add_column("group")
    table.add_column("trainable parameters", justify="right")
    for group, count in summary.groups.items():
        table.add_row(group, f"{count:,}")
    table.add_row("total (head excluded)", f"{summary.trainable:,}", style="bold")
    table.add_row(f"head ({num_classes} classes)", f"{summary.head:,}")
    table.add_row("backbone" if settings.model.method == "full" else "frozen backbone", f"{summary.backbone:,}")
    table.add_row("trainable / backbone", f"{summary.percent_of_backbone:.3f} %", style="bold")
    Console().print(table)
    if settings.model.method != "sa2vp":
        return
    m = settings.model
    typer.echo(
        f"window c={m.window}  gamma={m.gamma}  lambda={m.lam}  rank r={m.prompt_rank}  adapter t={m.adapter_dim}  "
        f"to_prompt={sorted(model.to_prompt)}  deep={sorted(model.deep)}  grid={model.grid[0]}x{model.grid[1]}"
    )


if __name__ == "__main__":  # pragma: no cover
    app()
