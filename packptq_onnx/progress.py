"""Progress on stderr: a tqdm bar on a terminal; in a log (stderr not a terminal) a plain line at
least every 30 s with the count, the loss when known, and the time left at the rate so far.
PACKPTQ_QUIET turns both off."""
from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

EVERY = 30.0


def fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


class LogLines:
    """Iterates like a tqdm bar; prints `desc: i/total  loss x  ~T left` every `every` seconds."""

    def __init__(self, iterable, desc: str, total: int | None, every: float = EVERY, stream=None):
        self.iterable, self.desc, self.every = iterable, desc, every
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.stream = stream or sys.stderr
        self.postfix = ""

    def set_postfix(self, **kw):
        self.postfix = "  ".join(f"{k} {v}" for k, v in kw.items())

    def __iter__(self):
        t0 = last = time.monotonic()
        for i, item in enumerate(self.iterable):
            now = time.monotonic()
            if now - last >= self.every and i:
                last = now
                left = f"  ~{fmt_seconds((now - t0) / i * (self.total - i))} left" if self.total else ""
                count = f"{i}/{self.total}" if self.total else str(i)
                extra = f"  {self.postfix}" if self.postfix else ""
                print(f"  {self.desc}: {count}{extra}{left}", file=self.stream, flush=True)
            yield item


def bar(iterable, desc: str, total: int | None = None):
    if os.environ.get("PACKPTQ_QUIET"):
        return iterable
    if not sys.stderr.isatty():
        return LogLines(iterable, desc, total)
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, mininterval=0.5)
