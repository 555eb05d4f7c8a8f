"""The console scripts (`dsembed-consolidate`, `-evaluate`, `-compare`, `-study`, `-demo`, `-bench`,
`-probe-layers`).

Level 5 (with dsembed/train.py): nothing in the library imports these; processes are spawned as
`python -m dsembed.cli.<name>`. `tools/<name>.py` are thin wrappers kept for the source layout.
"""
