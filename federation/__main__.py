"""``python -m federation``: the ``hbn-fed`` command."""

import sys

from federation.cli import main

sys.exit(main())
