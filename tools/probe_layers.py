"""dsembed-probe-layers (see dsembed/cli/probe_layers.py): per-layer probe of a model or recipe."""
from dsembed.cli.probe_layers import cli

if __name__ == "__main__":
    cli()
