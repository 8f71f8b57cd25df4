"""`python -m relora`: the `relora` command, for environments where its script is not installed."""

import sys

from .cli import main

sys.exit(main())
