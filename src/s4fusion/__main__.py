"""``python -m s4fusion`` runs the ``s4fusion`` console script."""

import sys

from .cli import main

sys.exit(main())
