"""`dsembed-evaluate` (thin wrapper: the code is dsembed/cli/evaluate.py)."""
from dsembed.cli.evaluate import cli

if __name__ == "__main__":
    cli()
