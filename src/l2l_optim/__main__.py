"""``python -m l2l_optim``: the ``l2l-optim`` command line (see :mod:`l2l_optim.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
