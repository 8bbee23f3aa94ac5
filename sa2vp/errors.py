"""Exceptions a user can cause and fix, importable without loading torch (the CLI maps them to exit code 2)."""


class BackboneError(RuntimeError):
    """The backbone could not be built or loaded; the message says what to do about it."""


class ArtifactError(RuntimeError):
    """An artifact or checkpoint is missing, unreadable or does not fit; the message names the file."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says where and what to try."""


class TrackingError(RuntimeError):
    """MLflow could not be reached or refused a write; the message names tracking.uri."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, capped: library messages (torch, timm, safetensors) can span many
    lines, and an `error: …` line must stay one line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
