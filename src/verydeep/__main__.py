"""``python -m verydeep`` (and ``torchrun -m verydeep``) behave like the console script."""

import sys

from .cli import main

sys.exit(main())
