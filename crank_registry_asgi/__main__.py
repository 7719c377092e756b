"""``python -m crank_registry_asgi``: the ``crank-registry`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
