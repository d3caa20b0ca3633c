"""User-facing errors of the SafetyDPO core.

Every error a user can cause by bad input is a :class:`SafetyDPOError` whose message names the thing at
fault and says what to do. The command line prints these without a traceback; the ComfyUI nodes let them
reach the UI as the node's error text.
"""


class SafetyDPOError(Exception):
    """Bad input or a state the user can fix; the message says what and how."""


class ConfigError(SafetyDPOError, ValueError):
    """A setting is out of range or contradicts another one."""


class DatasetError(SafetyDPOError):
    """A preference dataset or prompt-pair file is missing, empty or malformed."""


class LoraError(SafetyDPOError):
    """A LoRA file is unreadable, in an unknown format, or does not fit the model."""


class ModelError(SafetyDPOError):
    """A model cannot be loaded or is of a kind that is not supported."""


class TrainingDiverged(SafetyDPOError):
    """Training produced a non-finite loss or gradient and was stopped."""


class Interrupted(SafetyDPOError):
    """Long work was cancelled by the user; a checkpoint was kept where one was configured."""


class DiskFullError(SafetyDPOError):
    """An output could not be written because the disk (or the user's quota) is full; nothing was replaced."""


class OutputLocked(SafetyDPOError):
    """Another run is writing the same output right now; the message names the lock file and its holder."""
