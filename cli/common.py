"""What every command shares: reading settings from params.yaml + overrides, and turning expected
mistakes into one clear line on stderr with exit code 2 (no traceback)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml

from sa2vp.data.errors import DataError
from sa2vp.errors import BackboneError
from sa2vp.settings import Settings, SettingsError, load_settings

USAGE_ERROR = 2

# Errors a user can cause and fix; anything else is a bug and keeps its traceback.
EXPECTED_ERRORS: tuple[type[Exception], ...] = (SettingsError, BackboneError, FileNotFoundError, DataError)

ParamsOption = Annotated[
    Path, typer.Option("--params", "-p", help="Settings file (the schema is sa2vp.settings.Settings).")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a setting: --set model.gamma=0.5 (repeatable; values are YAML)."),
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

    return wrapper  # type: ignore[return-value]


def settings_from(params: Path, overrides: list[str] | None) -> Settings:
    """params.yaml (if present) < SA2VP_* environment < --set overrides."""
    parsed: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SettingsError(f"--set {item!r}: expected KEY=VALUE, e.g. --set model.gamma=0.5")
        parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return load_settings(params if params.is_file() else None, parsed)


def is_terminal() -> bool:
    return sys.stderr.isatty()
