"""Entry point of ``python -m saturation.shapes``: bad input ends with one plain ``error:`` line."""

import sys

from saturation.core.errors import ToolkitError

from .cli import main

try:
    main()
except (ToolkitError, ValueError) as err:  # bad input: one plain line, no traceback
    sys.exit(f"error: {err}")
