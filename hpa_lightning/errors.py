"""The errors a user fixes by changing data, configuration, command line or learning rate.

Each is reported as one line naming the file, row or key (exit status 2; in a multirun the job is marked failed and
the others go on), never as a traceback. Catch `UserError` for all of them. The second base class of each is the
built-in one it was before `UserError` existed, so `except ValueError` / `except RuntimeError` still catch them.
"""

from __future__ import annotations


class UserError(Exception):
    """An error in what the user gave; the message is one line naming the file, row or key."""


class UsageError(UserError, ValueError):
    """A bad command line; the message is one line naming the argument."""


class DataError(UserError, ValueError):
    """Bad input data; the message is a single line naming the file, row or key."""


class ConfigError(UserError, ValueError):
    """A bad configuration value; the message is one line naming the key."""


class InferenceError(UserError, ValueError):
    """A model source that cannot be used; the message is a single line naming the file."""


class UnsafeTargetError(UserError, ValueError):
    """A `_target_` outside the allowlist; the message is one line naming the file and the key."""


class PretrainedUnavailable(UserError, RuntimeError):
    """Pretrained weights were asked for and cannot be loaded (offline without a local file, wrong file)."""


class RunSetupError(UserError, RuntimeError):
    """A problem with the run itself (resume target, output folder), reported as one line before training."""


class NonFiniteLossError(UserError, RuntimeError):
    """The training loss became NaN or infinite (usually a learning rate too high)."""


class NonFiniteCheckpointError(UserError, RuntimeError):
    """A checkpoint about to be saved holds NaN or infinite weights."""


class FrozenStageError(UserError, RuntimeError):
    """A trainer set-up under which the frozen stage cannot be honoured; one line naming the config key."""


class StorageFullError(UserError, OSError):
    """A file could not be written for lack of space (a full disk, a quota, a file-size limit); the message names
    the file and the space it needs. What was there before is left intact."""
