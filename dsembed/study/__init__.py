"""Studies: several recipes trained, exported, evaluated and compared, stage by stage, resumable.

    runner.py        the study file, its stages and their commands (dsembed-study, dsembed-demo)
    stages.py        the stage ledger: fingerprints of finished stages, stale detection
"""
