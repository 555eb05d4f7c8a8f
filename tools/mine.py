"""`dsembed-mine` (thin wrapper: the code is dsembed/cli/mine.py)."""
from dsembed.cli.mine import cli

if __name__ == "__main__":
    cli()
