"""The errors ftune reports as one line (the CLI prints them without a traceback unless FTUNE_DEBUG=1)."""


class FtuneError(Exception):
    """Base of every error ftune expects and explains. `exit_code` follows sysexits: 2 usage, 1 runtime."""

    exit_code = 1


class RecipeError(FtuneError):
    """The recipe or a command-line value is invalid: fix the named field."""

    exit_code = 2


class DataError(FtuneError):
    """A data source is missing, empty, or has a bad row."""


class ModelError(FtuneError):
    """The base model cannot be found or loaded."""


class MethodError(FtuneError):
    """A method cannot be applied to this model as configured (e.g. a target that matches nothing)."""


class RunDirError(FtuneError):
    """A run directory is missing, incomplete, or would be overwritten."""


class TrainingError(FtuneError):
    """Training cannot go on, e.g. a non-finite loss or gradient norm; nothing of the failing step was saved."""
