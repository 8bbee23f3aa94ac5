"""The `sa2vp` command: a thin Typer layer over the `sa2vp` library."""
