"""``python -m diffalign`` = the ``diffalign`` command."""

import sys

from .cli import main

sys.exit(main())
