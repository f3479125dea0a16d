"""``python -m mlbatch.cli``: the same as the ``mlbatch`` command."""

import sys

from .commands import main

sys.exit(main())
