"""`python -m exporter` runs the same command line as the console script."""

import sys

from exporter.cli import main

sys.exit(main())
