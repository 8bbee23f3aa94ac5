"""`python -m sa2vp`: the `sa2vp` command, for when its script is not on PATH.

The command line lives in the separate package `sa2vp_cli`; it is imported here only, when run as a program,
so that `import sa2vp` never loads it (the library does not depend on its command line).
"""

if __name__ == "__main__":
    from sa2vp_cli.main import app

    app(prog_name="sa2vp")
