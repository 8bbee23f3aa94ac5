"""`sa2vp` — the command-line entry point."""

from __future__ import annotations

from importlib.metadata import version as package_version
from typing import Annotated

import typer

from sa2vp.data.progress import LOG_EVERY

from . import artifacts
from . import explain as explaining
from . import train as training
from .backbone import app as backbone_app
from .common import set_log_every, setup_logging
from .data import app as data_app
from .model import app as model_app
from .suite import app as suite_app

app = typer.Typer(
    name="sa2vp",
    help="SA²VP visual prompt tuning on frozen timm backbones.\n\nExample: sa2vp train -d digits --epochs 20   "
    "(every command: sa2vp COMMAND --help)",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")
app.add_typer(backbone_app, name="backbone")
app.add_typer(suite_app, name="suite")
app.command("train")(training.train)
app.command("evaluate")(artifacts.evaluate)
app.command("predict")(artifacts.predict)
app.command("tune")(training.tune)
app.command("ui")(artifacts.ui)
app.command("explain")(explaining.explain)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"sa2vp {package_version('sa2vp')}")
        raise typer.Exit()


@app.callback()
def main(
    log_every: Annotated[
        float,
        typer.Option(
            "--log-every",
            min=0.001,
            help="Seconds between progress lines when stderr is not a terminal (a log: dvc "
            "repro, CI); a terminal gets progress bars.",
        ),
    ] = LOG_EVERY,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Show the installed version and exit."),
    ] = False,
) -> None:
    """SA²VP visual prompt tuning on frozen timm backbones."""
    setup_logging()
    set_log_every(log_every)


if __name__ == "__main__":  # pragma: no cover
    app()
