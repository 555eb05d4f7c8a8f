"""`dsembed-compare` (thin wrapper: the code is dsembed/cli/compare.py)."""
from dsembed.cli.compare import cli

if __name__ == "__main__":
    cli()
