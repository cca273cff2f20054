"""Errors a user can cause. The CLI prints them as one line and exits with status 2."""


class ClipforgeError(Exception):
    """Base class for every error caused by user input (config, data paths, checkpoints)."""


class ConfigError(ClipforgeError):
    """A configuration file or override is invalid."""


class DataError(ClipforgeError):
    """Data is missing, empty or unusable."""


class CheckpointError(ClipforgeError):
    """A checkpoint is missing, unsafe, corrupt or does not match the model."""
