"""The store's layout on disk: file names, block sizes, chunking constants, `StoreError`.

See :mod:`.store` for how a store is written and read.
"""

from __future__ import annotations

import re

STEP = "step"
BLOCK = 32  # snapshots per small file (the most an append ever copies)
MERGE = 32  # full small files merged into one file of BLOCK * MERGE snapshots
PART = re.compile(r"^steps_(-?\d+)_(-?\d+)\.nc$")
# note: readers load files this small into memory at once (the writer removes them when it
# continues or merges them); larger files are never removed while training runs, so they are read lazily
_CELL_DIMS = ("layer", "module")
_CHUNK_BYTES = 1 << 16
_READ_RETRIES = 20


class StoreError(ValueError):
    """A dataset that does not fit the store's schema, or a store file that cannot be read."""
