"""The one exception the data package raises for problems a user can fix."""


class DatasetError(Exception):
    """A data folder, file or split setting that cannot work; the message says how to fix it."""
