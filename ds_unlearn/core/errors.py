"""The one exception family for bad user input: the CLI turns it into one line and exit code 2."""


class InputError(ValueError):
    """A config, data file, option or path the user must fix; raised before any model compute."""


class NonFiniteLogitsError(InputError):
    """The model produced NaN/inf logits for some rows, so their metrics would be meaningless. Raised
    after the forward that showed it (identically on every rank); the model, not the data, needs fixing."""
