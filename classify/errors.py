"""Errors raised by the classify package; the CLI prints each as one ``Error: ...`` line."""

from extract.errors import TransferKitError


class TrainingDataError(TransferKitError):
    """The features cannot train a head (too few classes, a class without training images...)."""


class HeadFileError(TransferKitError):
    """A head file is missing, damaged or was edited after it was written."""


class HeadMismatch(TransferKitError):
    """A head is used with features, classes or weights other than those it was trained on."""
