"""``python -m hipseg_lib VERB``: the same command line as ``hipseg``."""
import sys

from .cli import main

sys.exit(main())
