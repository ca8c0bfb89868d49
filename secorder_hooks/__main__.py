"""``python -m secorder_hooks``: run the demo of :mod:`secorder_hooks.demo`."""

import sys

from secorder_hooks.demo import main

if __name__ == "__main__":
    sys.exit(main())
