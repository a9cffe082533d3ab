"""Progress bars on stderr (tqdm); quiet when PACKPTQ_QUIET is set."""
from __future__ import annotations

import os

from tqdm import tqdm


def bar(iterable, desc: str, total: int | None = None):
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True,
                disable=bool(os.environ.get("PACKPTQ_QUIET")), mininterval=0.5)
