"""The `clova` command line: ``app`` is the console script's entry point."""

from clova_train.cli.app import app

__all__ = ["app"]
