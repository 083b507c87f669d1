"""Ctrl-C and SIGTERM during a multi-run loop: noted as they come, raised where the loop can
stop cleanly (:func:`deferred_interrupts`)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


class _Interrupts:
    """Ctrl-C and SIGTERM noted as they come and raised by :meth:`check` where the loop
    can stop cleanly (raised at once, a KeyboardInterrupt can land inside a library's
    callback, which only prints it)."""

    def __init__(self):
        self.signum: int | None = None
        self.handlers = {}

    def note(self, signum, frame):
        self.signum = signum

    def check(self) -> None:
        if self.signum is not None:
            handler = self.handlers.get(self.signum)
            if callable(handler):
                handler(self.signum, None)  # the command's own: KeyboardInterrupt, or Terminated
            raise KeyboardInterrupt


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[_Interrupts]:
    interrupts = _Interrupts()
    for signum in (signal.SIGINT, signal.SIGTERM):
        interrupts.handlers[signum] = signal.signal(signum, interrupts.note)
    try:
        yield interrupts
    finally:
        for signum, handler in interrupts.handlers.items():
            signal.signal(signum, handler)


#: How often a multi-run loop looks for a finished job or a Ctrl-C.
POLL_SECONDS = 0.2
