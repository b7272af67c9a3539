"""The static scan's time budget: one deadline per scanned file, checked cooperatively.

The scanner reads hostile bytes in the parent process, which has no rlimit or cgroup around it: every
loop over input-controlled data (pickle opcodes, containers, zip entries, CRC and inflate chunks)
calls ``tick()``, which raises ``ScanDeadline`` once the file's deadline has passed. ``formats``
turns that into a model-caused finding (``RESOURCE_LIMIT``): a scanner that gave up never passes a
file, and no checkpoint writer produces a file that takes this long to read.

The deadline lives in a context variable so that the walkers need no extra argument, and code that
runs outside a scan (the worker's ``pickle_globals``) has no deadline at all.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator

#: Bytes of the file that each extra second of deadline pays for: reading and CRC-checking a large
#: checkpoint is legitimate work (a 140 GB shard must not time out), so the budget grows with size.
BYTES_PER_SECOND = 200 * 2**20


class ScanDeadline(Exception):
    """The scan of one file ran past its deadline."""

    def __init__(self, seconds: float):
        super().__init__(f"the static scan ran past its deadline of {seconds:.0f} s")
        self.seconds = seconds


class _Deadline:
    __slots__ = ("at", "seconds")

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds


_CURRENT: contextvars.ContextVar[_Deadline | None] = contextvars.ContextVar("ckpt_stage_scan_deadline",
                                                                            default=None)


def allowance(base_s: float, size: int) -> float:
    """Seconds one file of ``size`` bytes may take: the base plus its reading time at ``BYTES_PER_SECOND``."""
    return base_s + size / BYTES_PER_SECOND


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Run the body under a deadline ``seconds`` from now (an enclosing, earlier deadline wins;
    ``seconds <= 0`` means none)."""
    outer = _CURRENT.get()
    if seconds <= 0:
        yield
        return
    mine = _Deadline(seconds)
    token = _CURRENT.set(mine if outer is None or mine.at < outer.at else outer)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def tick() -> None:
    """Raise ``ScanDeadline`` if the current scan is past its deadline (cheap: one clock read)."""
    d = _CURRENT.get()
    if d is not None and time.monotonic() > d.at:
        raise ScanDeadline(d.seconds)


def expired() -> bool:
    d = _CURRENT.get()
    return d is not None and time.monotonic() > d.at
