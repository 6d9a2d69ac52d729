"""``python -m cuneiform_stack``: the same as the ``cuneiform-stack`` command."""

import sys

from cuneiform_stack.cli import main

sys.exit(main())
