"""`dsembed-bench` (thin wrapper: the code is dsembed/cli/bench.py)."""
from dsembed.cli.bench import cli

if __name__ == "__main__":
    cli()
