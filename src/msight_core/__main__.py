"""``python -m msight_core``: the ``msight`` command line."""

import sys

from .cli import main

sys.exit(main())
