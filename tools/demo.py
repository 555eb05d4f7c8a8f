"""`dsembed-demo` (thin wrapper: the code is dsembed/cli/demo.py)."""
from dsembed.cli.demo import cli

if __name__ == "__main__":
    cli()
