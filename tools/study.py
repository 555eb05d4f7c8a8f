"""`dsembed-study` (thin wrapper: the code is dsembed/cli/study.py)."""
from dsembed.cli.study import cli

if __name__ == "__main__":
    cli()
