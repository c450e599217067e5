"""``python -m albef_ray`` is the ``albef-ray`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
