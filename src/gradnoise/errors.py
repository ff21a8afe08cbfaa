"""The one exception type that means "the user gave something wrong"."""


class UserError(ValueError):
    """Bad input from the user: a config value, a spec, a file, an argument.

    The message names the value given and what is allowed. The CLI prints it
    without a traceback and exits with status 2.
    """
