"""The one exception the models package raises for settings a user can fix."""


class ModelConfigError(ValueError):
    """An architecture setting that cannot build; the message names the setting and the fix."""
