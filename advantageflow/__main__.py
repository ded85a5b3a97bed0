"""``python -m advantageflow`` (and ``torchrun -m advantageflow``) runs the CLI."""

import sys

from advantageflow.cli import main

sys.exit(main())
