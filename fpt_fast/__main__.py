"""``python -m fpt_fast`` and the ``fpt-fast`` console script: see fpt_fast.app.cli."""
import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
