"""``python -m safetydpo_core.cli`` runs the command line."""

import sys

from .main import main

sys.exit(main())
