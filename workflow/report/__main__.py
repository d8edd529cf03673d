"""``python -m workflow.report``: see the package docstring."""

import sys

from workflow.report import main

sys.exit(main())
