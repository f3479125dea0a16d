"""The ``mlbatch`` command line: ``parser`` (the flags) and ``commands`` (one function per command)."""

from .commands import label_config, main
from .parser import add_label_arguments, add_nightly_arguments, build_parser

__all__ = ["add_label_arguments", "add_nightly_arguments", "build_parser", "label_config", "main"]
