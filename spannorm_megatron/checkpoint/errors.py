"""The one error type of the checkpoint package.

A `ValueError` subclass like the rest of the package's user-facing errors
(`spannorm_megatron.errors`): a checkpoint that cannot be used is bad input, not a bug. Every
message names the file or directory at fault and says what to do about it, and every check that
raises one runs before the model, optimizer, scheduler or anything on disk is touched.
"""


from spannorm_megatron.errors import RunFailure, UserError


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, corrupted or does not fit the model loaded."""


class SaveFailedError(RunFailure):
    """The storage refused a save (no space, quota, file size limit, read-only, permission):
    a fault of the run's surroundings, not bad input. The message names the checkpoint a resume
    would load, or says there is none."""
