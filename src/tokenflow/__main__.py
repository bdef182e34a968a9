"""``python -m tokenflow``: the same as the ``tokenflow`` command."""

import sys

from .cli import main

sys.exit(main())
