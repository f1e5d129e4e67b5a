"""`python -m kiln`: the `kiln` command (as `python -m kiln.cli`)."""

import sys

from kiln.cli import main

sys.exit(main())
