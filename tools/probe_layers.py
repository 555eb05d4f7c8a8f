"""`dsembed-probe-layers` (thin wrapper: the code is dsembed/cli/probe_layers.py)."""
from dsembed.cli.probe_layers import cli

if __name__ == "__main__":
    cli()
