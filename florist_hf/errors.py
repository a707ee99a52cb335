"""Bad input's exceptions: `FloristError`, which the CLI turns into a one-line message and exit code 2,
and `SettingError`, one recipe setting's bad value found while the recipe is validated."""


class FloristError(Exception):
    """A problem with the user's input: the message names the file, the module and the fix."""


class SettingError(ValueError):
    """A bad value of one recipe setting, raised inside the recipe's validation: ``key`` is its
    dotted name (``training.learning_rate``), which `recipe.load_recipe` puts in its one line."""

    def __init__(self, key: str, reason: str):
        super().__init__(reason)
        self.key = key
