"""The package version: the one place it is written (read by the build and by ``gateway --version``)."""

__version__ = "0.2.0.dev0"
