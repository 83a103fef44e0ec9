"""The run directory: every path inside output_dir, its locks, resume or refuse, and provenance.

directory   the lock, what a resume may change, what `--overwrite` removes
provenance  provenance.json: versions, commit, command line, devices
"""
