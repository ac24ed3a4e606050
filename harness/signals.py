"""SIGINT and SIGTERM as Ctrl-C: a KeyboardInterrupt that every command turns into one line
`harness: interrupted: ...` and exit status 130, after its clean-up (temporary folders removed,
cells marked interrupted)."""
from __future__ import annotations

import contextlib
import signal
import threading


class InterruptOnce:
    """A SIGINT / SIGTERM handler that raises KeyboardInterrupt at the first signal and ignores the
    later ones, so that a second signal (Ctrl-C to the group and the grid forwarding it) cannot break
    the clean-up. (Not SIG_IGN from inside the handler: Python then fails on a signal already pending.)"""

    def __init__(self):
        self.fired = False

    def __call__(self, signum, frame) -> None:
        if not self.fired:
            self.fired = True
            raise KeyboardInterrupt

    def install(self) -> dict:
        """Handle SIGINT and SIGTERM; returns the previous handlers."""
        return {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}


@contextlib.contextmanager
def interrupt_signals():
    """SIGINT and SIGTERM end the run as Ctrl-C does (KeyboardInterrupt), in the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = InterruptOnce().install()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
