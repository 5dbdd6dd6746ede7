"""``python -m l2l_optim.repro``: see :mod:`l2l_optim.repro`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
