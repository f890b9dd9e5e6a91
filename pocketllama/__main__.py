"""`python -m pocketllama ...` (also what `torchrun -m pocketllama` runs)."""

import sys

from .cli import main

sys.exit(main())
