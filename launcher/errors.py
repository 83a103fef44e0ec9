"""Every error class the launcher raises on purpose, at the ground so any wing can raise one.

`UserError` and its kinds are the user's to fix: the CLI prints one `error:` line and exits 2.
Anything else is ours to fix and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's recipe, data, model folder, command line or environment: one line, exit status 2."""


class NonFiniteError(UserError):
    """Training produced a non-finite loss, gradient norm or weight; the run stops without saving it."""


class SlurmError(UserError):
    """A Slurm command is missing or failed, or the job asked for is impossible; the message says which and why."""


class SaveVerificationError(RuntimeError):
    """A saved file does not hold what was saved (ours, or the disk's, to fix: keeps its traceback)."""
