"""The one exception type the CLI turns into a one-line message and exit code 2."""


class FloristError(Exception):
    """A problem with the user's input: the message names the file, the module and the fix."""
