"""The run directory: every path inside output_dir, its locks, resume or refuse, and provenance.

paths       RunDir: the one home of every name inside output_dir, and which files are the launcher's (--overwrite)
directory   the lock, what a resume may change (the schema's `resumable` fields), fresh, resume or refuse
provenance  provenance.json: versions, commit, command line, devices
"""
