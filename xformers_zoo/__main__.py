"""``python -m xformers_zoo`` runs the command-line interface."""

import sys

from xformers_zoo.cli import main

sys.exit(main())
