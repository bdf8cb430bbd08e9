"""``python -m fastattn.bench``: the same as the ``fastattn-bench`` command."""

import sys

from fastattn.bench.cli import main

sys.exit(main())
