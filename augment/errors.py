"""Exceptions users cause, importable without torch (the CLI catches them before anything heavy is loaded)."""


class ModelError(ValueError):
    """A checkpoint the user pointed at that cannot be used."""


class DataError(ValueError):
    """Input data the user must fix; the message names the file, column or value."""
