"""`python -m gradnoise …` (and `torchrun -m gradnoise train …`) run the CLI."""

import sys

from gradnoise.cli import main

sys.exit(main())
