"""`dsembed-dims` (thin wrapper: the code is dsembed/cli/dims.py)."""
from dsembed.cli.dims import cli

if __name__ == "__main__":
    cli()
