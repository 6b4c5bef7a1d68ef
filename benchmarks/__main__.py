"""Entry point of ``python -m benchmarks``."""

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
