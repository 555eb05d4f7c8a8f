"""`dsembed-consolidate` (thin wrapper: the code is dsembed/cli/consolidate.py)."""
from dsembed.cli.consolidate import cli

if __name__ == "__main__":
    cli()
