"""What every command shares: reading settings from params.yaml + overrides, and turning expected
mistakes into one clear line on stderr with exit code 2 (no traceback)."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml

from sa2vp.data.errors import DataError
from sa2vp.data.progress import LOG_EVERY
from sa2vp.errors import ArtifactError, BackboneError, TrackingError, TrainingDiverged
from sa2vp.settings import Origin, Settings, SettingsError, load_settings, read_overrides

USAGE_ERROR = 2

# Errors a user can cause and fix; anything else is a bug and keeps its traceback.
EXPECTED_ERRORS: tuple[type[Exception], ...] = (
    SettingsError,
    BackboneError,
    FileNotFoundError,
    DataError,
    ArtifactError,
    TrackingError,
)
RUN_FAILED = 1  # a run that started and failed for a reason the message explains (e.g. a diverging loss)

DEFAULT_PARAMS = Path("params.yaml")


def _params_given_or_present(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """The params file to read: one named with -p must exist (settings_from says so if not); only the
    implicit default params.yaml may be absent — None then, the built-in defaults."""
    source = ctx.get_parameter_source(param.name or "")
    # (typer vendors its own click: take the enum from the value instead of importing one)
    if value is None or source is None or source is not type(source).DEFAULT:
        return value
    return value if value.is_file() else None


ParamsOption = Annotated[
    Path | None,
    typer.Option(
        "--params",
        "-p",
        callback=_params_given_or_present,
        help="Settings file (the schema is sa2vp.settings.Settings); default: params.yaml if present.",
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a setting: --set model.sa2vp.gamma=0.5 (repeatable; values are YAML)."),
]

SetFileOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--set-file",
        help="Apply the dotted settings in a YAML file, e.g. the best.yaml `sa2vp tune` "
        "writes (repeatable; --set wins).",
    ),
]

# The dataset, spelled the same in every command that takes one (data download/prepare also take it as their
# argument); --from is how every command that may download it is given a local copy instead.
DatasetOption = Annotated[
    str | None,
    typer.Option(
        "--dataset", "-d", help="Registry name or alias (`sa2vp data list`), or folder:<path> (data.dataset)."
    ),
]
FromOption = Annotated[
    Path | None,
    typer.Option(
        "--from", help="Local archive or folder of the dataset, used instead of downloading it (data.source)."
    ),
]

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(USAGE_ERROR)


def expected_errors_exit_2(command: F) -> F:
    """Decorator: expected errors become `error: …` on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except EXPECTED_ERRORS as exc:
            fail(str(exc))
        except TrainingDiverged as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(RUN_FAILED) from None

    return wrapper  # type: ignore[return-value]


def settings_from(
    params: Path | None,
    overrides: list[str] | None,
    files: list[Path] | None = None,
    options: Mapping[str, Any] | None = None,
) -> Settings:
    """The params file < SA2VP_* environment < --set-file files < --set overrides < the command's own options.

    `params` is the file ParamsOption gives: one that was named must exist (a typo is an error, not the
    built-in defaults); None: no params file. `options`: the command's options and arguments by the setting
    they give (`{"train.epochs": 3}`), as typed values; None = not given. Errors name the source of the bad
    value: `--set`, `command line`, the --set-file, the params file or the environment variable."""
    return settings_and_origins(params, overrides, files, options)[0]


def settings_and_origins(
    params: Path | None,
    overrides: list[str] | None,
    files: list[Path] | None = None,
    options: Mapping[str, Any] | None = None,
) -> tuple[Settings, dict[str, Origin]]:
    """settings_from's settings, and where the command line gave each of its overrides (dotted key → `--set`,
    `command line` or the --set-file's path; what none gave came from the params file or the environment)."""
    if params is not None and not params.is_file():
        problem = "is not a file" if params.exists() else "settings file not found"
        raise SettingsError(
            f"{params}: {problem} (-p/--params names a YAML file; without -p, {DEFAULT_PARAMS} is read if present)"
        )
    values: dict[str, Any] = {}
    origins: dict[str, Origin] = {}
    for path in files or []:
        if not path.is_file():
            raise SettingsError(f"--set-file {path}: " + ("is not a file" if path.exists() else "file not found"))
        for key, value in read_overrides(path).items():
            values[key], origins[key] = value, path
    for item in overrides or []:
        key, value = _parse_set(item)
        values[key], origins[key] = value, "--set"
    for key, value in (options or {}).items():
        if value is not None:
            values[key], origins[key] = value, "command line"
    return load_settings(params, values, origins), origins


def _parse_set(item: str) -> tuple[str, Any]:
    """`--set KEY=VALUE` as (key, value), the value read as YAML (an empty one is null)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise SettingsError(f"--set {item!r}: expected KEY=VALUE, e.g. --set model.sa2vp.gamma=0.5")
    key = key.strip()
    try:
        return key, yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SettingsError(f"--set {key}: the value {raw!r} is not valid YAML ({problem})") from None


def check_writable(option: str, path: Path, *, folder: bool = False) -> None:
    """Refuse an output that cannot be written (one line, exit 2) before the long work, not after it:
    `path` is a file to write (its folder must take files) or, with `folder`, a folder to write into."""
    from sa2vp.folders import writable_problem

    if not folder and path.is_dir():
        fail(f"{option} {path}: is a folder; name a file")
    problem = writable_problem(path if folder else path.parent)
    if problem is not None:
        fail(f"{option} {path}: cannot write there ({problem})")


def is_terminal() -> bool:
    return sys.stderr.isatty()


def progress() -> Any:
    """Bars on a terminal; otherwise (a log: `dvc repro`, CI, a pipe) a plain line every `--log-every` seconds
    while a step runs and one when it ends, so that no long step is silent."""
    from sa2vp.data.progress import BarProgress, LineProgress

    return BarProgress() if is_terminal() else LineProgress(every=_log_every[0])


# Seconds between progress lines in a log, as `sa2vp --log-every` set it for this invocation.
_log_every: list[float] = [LOG_EVERY]


def set_log_every(seconds: float) -> None:
    _log_every[0] = seconds


def setup_logging() -> None:
    """Library log lines (one per epoch, trial, …) as plain lines on stderr; MLflow's own chatter hushed."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # With a tracking server MLflow prints its own "View run" links, to a view that opens on GenAI traces:
    # sa2vp prints the runs table's address itself. Its file-count bars are noise in a log.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if not is_terminal():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("mlflow", "alembic", "optuna", "httpx", "httpx2", "huggingface_hub", "urllib3", "timm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # huggingface_hub gives its logger a handler of its own: passed on to ours too, each warning showed twice.
    logging.getLogger("huggingface_hub").propagate = False
