"""``python -m fpt_fast`` and the ``fpt-fast`` console script: see fpt_fast.cli."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
