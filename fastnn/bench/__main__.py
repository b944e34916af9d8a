"""``python -m fastnn.bench``: same as the ``fastnn-bench`` command."""
import sys

from . import main

sys.exit(main())
