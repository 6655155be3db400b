"""`python -m raykd ...`: the `raykd` command."""

import sys

from raykd.pipeline.cli import main

sys.exit(main())
