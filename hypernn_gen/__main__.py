"""``python -m hypernn_gen``: the ``hypernn-gen`` command line."""

import sys

from .cli import console_main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(console_main())
