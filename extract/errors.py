"""Errors that carry a message a user can act on; the CLI prints them as one line."""


class TransferKitError(Exception):
    """Base class: anything raised as this is shown to the user without a traceback."""


class WeightsUnavailable(TransferKitError):
    """Pretrained weights are not on this machine."""


class StoreError(TransferKitError):
    """The feature store is missing, locked, inconsistent or does not hold what was asked."""


class DatasetError(TransferKitError):
    """The image folder is missing or has no usable layout."""


class BackboneMismatch(TransferKitError):
    """The backbone or weights available now are not those a record (store, head, model) was made with."""
