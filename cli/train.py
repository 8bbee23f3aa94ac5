"""`sa2vp train | tune`: training runs tracked in MLflow, and the Optuna search of their settings
(library: sa2vp.engine, sa2vp.tuning)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .common import (
    DatasetOption,
    FromOption,
    ParamsOption,
    SetFileOption,
    SetOption,
    expected_errors_exit_2,
    progress,
    settings_and_origins,
    settings_from,
)

DeviceOption = Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps (train.device).")]


def train(
    dataset: DatasetOption = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs (train.epochs).")] = None,
    device: DeviceOption = None,
    output: Annotated[Path | None, typer.Option(help="Folder for checkpoints and the artifact (train.output).")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --output from its last checkpoint (same settings).")
    ] = False,
    final: Annotated[
        bool,
        typer.Option(
            "--final",
            help="The final run: train on trainval (train+val) without a validation split, keeping the last "
            "epoch, and test on test, whatever train.train_split, val_split and test_split say.",
        ),
    ] = False,
    from_: FromOption = None,
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    files: SetFileOption = None,
) -> None:
    """Train the configured method on a dataset; one MLflow run with params, curves, figures and the artifact.

    Example: sa2vp train -d digits --epochs 20 --set model.sa2vp.gamma=0.5
    Final run with tuned settings: sa2vp train --set-file runs/tune/best.yaml --final
    """
    _train(dataset, epochs, device, output, resume, final, from_, params, overrides, files)


@expected_errors_exit_2
def _train(
    dataset: str | None,
    epochs: int | None,
    device: str | None,
    output: Path | None,
    resume: bool,
    final: bool,
    from_: Path | None,
    params: Path | None,
    overrides: list[str] | None,
    files: list[Path] | None,
) -> None:
    from sa2vp.engine import final_settings, fit

    options = {
        "data.dataset": dataset,
        "train.epochs": epochs,
        "train.device": device,
        "train.output": output,
        "data.source": from_,
    }
    settings = settings_from(params, overrides, files, options)
    if final:
        settings = final_settings(settings)
    result = fit(settings, resume=resume, progress=progress())
    if result.rank:  # under torchrun, rank 0 says what the run made
        return
    # The test accuracy is in the log already (the engine's `test:` line, with the best epoch): not said twice.
    typer.echo(f"artifact: {result.artifact}")
    if result.run_id:
        from sa2vp.tracking import browse_address

        browse = browse_address(settings.tracking.uri, settings.tracking.experiment)
        typer.echo(f"MLflow: run {result.run_id} in {settings.tracking.uri} (browse: {browse})")


@expected_errors_exit_2
def tune(
    dataset: DatasetOption = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs of each trial (tune.epochs).")] = None,
    n_trials: Annotated[
        int | None, typer.Option("--n-trials", help="The study's trials in all, over every worker (tune.n_trials).")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds after which no trial starts (tune.timeout).")] = None,
    storage: Annotated[str | None, typer.Option(help="Journal file or database URL (tune.storage).")] = None,
    study_name: Annotated[str | None, typer.Option("--study-name", help="Study (tune.study_name).")] = None,
    from_: FromOption = None,
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
    files: SetFileOption = None,
) -> None:
    """Tune the method's settings on the validation split with Optuna (preparing the data if missing).

    Example: sa2vp tune -d digits --n-trials 10 --epochs 3
    Several workers, one study: start the same command on each machine with --storage postgresql://HOST/DB
    (and one tracking store); they run the 10 trials together, and each returns when none is left.
    """
    import optuna

    from sa2vp.tuning import given_settings, plan_search
    from sa2vp.tuning import tune as run_tuning

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # sa2vp logs one line per trial itself

    options = {
        "data.dataset": dataset,
        "tune.n_trials": n_trials,
        "tune.timeout": timeout,
        "tune.storage": storage,
        "tune.study_name": study_name,
        "tune.epochs": epochs,
        "data.source": from_,
    }
    settings, origins = settings_and_origins(params, overrides, files, options)
    # A searched setting given a value is pinned, and said where it was given.
    plan = plan_search(settings, given_settings(settings, {key: str(at) for key, at in origins.items()}, params))
    result = run_tuning(settings, progress(), plan=plan)
    best = result.study.best_trial
    typer.echo(f"study {result.study.study_name}: best of {len(result.study.trials)} trials")
    table = Table()
    table.add_column("setting")
    table.add_column("value", justify="right")
    for key, value in best.params.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    for key, value in plan.values.items():
        table.add_row(key, f"{value:.4g} (pinned)" if isinstance(value, float) else f"{value} (pinned)")
    table.add_row("trial", str(best.number))
    table.add_row("val top-1", f"{100 * result.best_value:.2f} %", style="bold")
    Console().print(table)
    typer.echo(f"best settings: {result.best_file}  (train with: sa2vp train --set-file {result.best_file})")
