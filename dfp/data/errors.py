"""Errors raised while loading data sets."""


class DatasetError(ValueError):
    """A data set file or directory is missing, corrupt, or not in the expected layout.

    The message names the file and the layout that was expected.
    """


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A data set file or directory does not exist (also a ``FileNotFoundError``)."""
