"""The one place the tool's version is read from: the installed package metadata (pyproject.toml)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("transferkit")
except PackageNotFoundError:  # running from a source tree that was never pip-installed
    __version__ = "0.0.0+source"
