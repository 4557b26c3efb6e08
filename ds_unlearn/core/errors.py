"""The one exception family for bad user input: the CLI turns it into one line and exit code 2."""


class InputError(ValueError):
    """A config, data file, option or path the user must fix; raised before any model compute."""
