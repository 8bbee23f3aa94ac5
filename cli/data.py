"""`sa2vp data …`: the dataset registry, downloads and split files (library: sa2vp.data)."""

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
    SetOption,
    expected_errors_exit_2,
    fail,
    progress,
    settings_from,
)

app = typer.Typer(help="Datasets: the registry, downloads and split files.", no_args_is_help=True)

NameArgument = Annotated[
    str | None,
    typer.Argument(
        help="The dataset, as --dataset/-d gives it: a name or alias (`sa2vp data list`), or "
        "folder:<path>. Default: data.dataset."
    ),
]


@app.command("list")
@expected_errors_exit_2
def list_datasets(
    group: Annotated[str | None, typer.Option(help="Only this group (vtab-natural, fgvc, hta, …).")] = None,
    details: Annotated[bool, typer.Option("--details", help="Title, citation, licence and homepage too.")] = False,
) -> None:
    """Show every dataset the registry knows, with its group, classes, protocols and aliases.

    Example: sa2vp data list --group fgvc --details
    """
    from sa2vp.data import by_group, lookup

    groups = by_group()
    if group is not None and group not in groups:
        fail(f"--group {group!r}: unknown; groups: {', '.join(groups)}")
    entries = [info for name, infos in groups.items() if group in (None, name) for info in infos]
    if details:
        for info in entries:
            typer.echo(f"{info.name}: {info.title}. {info.citation}. Licence: {info.licence}. {info.homepage}")
        return
    table = Table(title="Datasets (sa2vp.data.registry)")
    table.add_column("name", no_wrap=True)
    table.add_column("group", no_wrap=True)
    table.add_column("classes", justify="right")
    table.add_column("protocols")
    table.add_column("source")
    table.add_column("aliases", overflow="fold")
    for info in entries:
        table.add_row(
            info.name, info.group, str(info.num_classes), "/".join(info.protocols), info.source, ", ".join(info.aliases)
        )
    table.caption = (
        f"A bare task name means the VTAB-1k task (svhn = {lookup('svhn').name}). Any image folder "
        "with one sub-folder per class: folder:<path> (protocol holdout). --details: citations."
    )
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 120)  # pipes and logs: no terminal width to fit, keep rows whole
    console.print(table)


@app.command("download")
@expected_errors_exit_2
def download(
    name: NameArgument = None,
    dataset: DatasetOption = None,
    from_: FromOption = None,
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
) -> None:
    """Download (or find in place), verify and extract a dataset's files, without splitting them.

    Example: sa2vp data download -d vtab-svhn --from ~/Downloads/vtab-1k.zip
    """
    from sa2vp.data import download as fetch

    options = {"data.dataset": _one_dataset(name, dataset), "data.source": from_}
    settings = settings_from(params, overrides, options=options)
    folder = fetch(settings.data, progress())
    typer.echo(f"{settings.data.dataset}: files complete in {folder}")


@app.command("prepare")
@expected_errors_exit_2
def prepare(
    name: NameArgument = None,
    dataset: DatasetOption = None,
    protocol: Annotated[str | None, typer.Option(help="vtab1k, fgvc, hta or holdout (data.protocol).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the hta / holdout split (data.seed).")] = None,
    from_: FromOption = None,
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
) -> None:
    """Fetch a dataset if needed and write its split files and manifest.json (for DVC to track).

    Example: sa2vp data prepare -d digits --seed 5
    """
    from sa2vp.data import prepare as write_splits
    from sa2vp.data import read_manifest

    options = {
        "data.dataset": _one_dataset(name, dataset),
        "data.protocol": protocol,
        "data.seed": seed,
        "data.source": from_,
    }
    settings = settings_from(params, overrides, options=options)
    folder = write_splits(settings.data, progress())
    manifest = read_manifest(folder).data
    counts = ", ".join(f"{split} {entry['count']:,}" for split, entry in manifest["splits"].items())
    typer.echo(f"{manifest['dataset']} ({manifest['protocol']}, {len(manifest['classes'])} classes): {counts}")
    if manifest["skipped"]:
        typer.echo(f"skipped {len(manifest['skipped'])} unreadable images (listed in the manifest)")
    typer.echo(f"split files: {folder}")


def _one_dataset(name: str | None, dataset: str | None) -> str | None:
    """The dataset given as the argument or as --dataset/-d (the spelling of every other command)."""
    if name is not None and dataset is not None and name != dataset:
        fail(f"the dataset is given twice, as {name!r} and as --dataset {dataset!r}: give it once")
    return dataset if dataset is not None else name
