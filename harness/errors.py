"""The one exception type that means "the user's input is wrong": launchers print its one-line
message and exit with code 2 before any process group, worker or MLflow run starts."""

USAGE_EXIT_CODE = 2


class InputError(ValueError):
    """Bad config, bad data file or bad checkpoint: a one-line, user-facing message."""
