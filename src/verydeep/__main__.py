"""``python -m verydeep`` (and ``torchrun -m verydeep``) behave like the console script."""

import sys

from verydeep.cli import main

sys.exit(main())
