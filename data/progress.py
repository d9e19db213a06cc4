"""Progress of every long phase (decoding, features, epochs, tests, the lr finder): a tqdm bar in a
terminal, and where there is none (nohup, a sweep agent's log, a batch job) a plain line every
30 seconds with the phase, how far, the rate and the time left, as timm's and torchvision's
reference scripts log every N steps. Nothing is printed for a phase shorter than that."""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterable

from tqdm import tqdm

EVERY_S = 30.0


def batch_size_of(loader) -> int:
    """Images a batch of loader holds (its sampler's batch size; 1 when it has none)."""
    sampler = getattr(loader, "batch_sampler", None) or getattr(loader, "sampler", None)
    return getattr(sampler, "batch_size", None) or 1


def progress(iterable: Iterable | None = None, desc: str = "", total: int | None = None, unit: str = "batch",
             per_item: int = 1, show: bool = True, stream=None, clock: Callable[[], float] = time.monotonic,
             every_s: float = EVERY_S):
    """A bar (in a terminal) or a LogProgress (elsewhere) over iterable; nothing when not show.
    per_item: images an item stands for (a batch's size), for the img/s of the log lines."""
    stream = stream or sys.stderr
    if not show:
        return tqdm(iterable, desc=desc, total=total, disable=True)
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True, file=stream)
    return LogProgress(iterable, desc, total, per_item, stream, clock, every_s)


class LogProgress:
    """The part of tqdm's interface the project uses, writing a line every every_s seconds."""

    def __init__(self, iterable, desc: str, total: int | None, per_item: int, stream, clock, every_s: float):
        self.iterable, self.desc, self.per_item, self.stream = iterable, desc, per_item, stream
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.clock, self.every_s, self.n, self.postfix = clock, every_s, 0, {}
        self.start = self.last = clock()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            self.stream.write(self.line(now - self.start) + "\n")
            self.stream.flush()

    def line(self, elapsed: float) -> str:
        rate = self.n * self.per_item / elapsed if elapsed > 0 else 0.0
        where = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        left = ""
        if self.total and self.n:
            seconds = elapsed / self.n * (self.total - self.n)
            left = f", {int(seconds // 60)}:{int(seconds % 60):02d} left"
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        return f"{self.desc}: {where} ({rate:.1f} img/s{left}{extra})"

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = values

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
