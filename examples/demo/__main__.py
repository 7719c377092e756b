"""``python -m examples.demo``: see :mod:`examples.demo.command`."""

import sys

from .command import main

sys.exit(main())
