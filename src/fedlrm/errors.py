"""Errors that are the user's to fix: the CLI prints them without a traceback."""


class FedLRMError(Exception):
    """Something in the user's input is wrong; the message says what, where and what to do."""


class ConfigError(FedLRMError):
    """An invalid configuration key or value."""


class DataError(FedLRMError):
    """A dataset that cannot be read or split as asked."""


class ModelError(FedLRMError):
    """A backbone that cannot be loaded or adapted as asked."""
