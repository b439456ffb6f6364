"""`python -m flywheel_cli COMMAND ...`: the same as `flywheel COMMAND ...`."""

import sys

from flywheel_cli.main import main

sys.exit(main())
