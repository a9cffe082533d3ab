"""Progress bars on stderr (tqdm): shown on a terminal, off when piped or PACKPTQ_QUIET is set."""
from __future__ import annotations

import os

from tqdm import tqdm


def bar(iterable, desc: str, total: int | None = None):
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True,
                disable=True if os.environ.get("PACKPTQ_QUIET") else None, mininterval=0.5)
