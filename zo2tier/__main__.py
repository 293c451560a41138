"""``python -m zo2tier``: the ``zo2tier`` command line."""

import sys

from zo2tier.cli import main

if __name__ == "__main__":
    sys.exit(main())
