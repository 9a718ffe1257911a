"""Registration of the fast scan backends.

Each backend lives in its own module and is imported only when first used;
the probe functions here only check whether it could be imported/run.
"""

from __future__ import annotations

from typing import Optional
