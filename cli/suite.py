"""`sa2vp suite run | report`: the cells of a benchmark suite and its results table (library: sa2vp.suites).

Run from a suite's folder (pipelines/<suite>/), whose params.yaml has the `suite:` section; its dvc.yaml calls
these for every dataset × variant and then the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    FromOption,
    ParamsOption,
    SetOption,
    expected_errors_exit_2,
    progress,
    settings_from,
)

app = typer.Typer(help="Benchmark suites: run a dataset × variant cell, write the results table.", no_args_is_help=True)


@app.command("run")
@expected_errors_exit_2
def run(
    dataset: Annotated[str, typer.Argument(help="One of suite.datasets.")],
    variant: Annotated[str, typer.Argument(help="One of suite.variants (a method or an ablation).")],
    from_: FromOption = None,
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
) -> None:
    """Tune one cell on its validation split, train it on train+val for every seed, test; write result.json.

    Example: cd pipelines/offline && sa2vp suite run digits sa2vp
    """
    from sa2vp.suites import RESULT_FILE, cell_dir, run_cell

    settings = settings_from(params, overrides, options={"data.source": from_})
    result = run_cell(settings, dataset, variant, progress())
    spread = f" ± {100 * result.std:.2f}" if len(result.seeds) > 1 else ""
    typer.echo(
        f"{dataset} / {variant}: test top-1 {100 * result.mean:.2f}{spread} % over seeds "
        f"{', '.join(map(str, result.seeds))}; {result.trainable_percent:.3f} % of the backbone trained"
    )
    typer.echo(f"result: {cell_dir(settings, dataset, variant) / RESULT_FILE}")


@app.command("report")
@expected_errors_exit_2
def report(
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
) -> None:
    """Write the suite's table (results.md, results.csv) from its cells' results and log it to MLflow.

    Example: cd pipelines/offline && sa2vp suite report
    """
    from sa2vp.suites import write_report

    settings = settings_from(params, overrides)
    written = write_report(settings)
    typer.echo(written.markdown.read_text(encoding="utf-8"))
    typer.echo(f"table: {written.markdown}, {written.csv}")
