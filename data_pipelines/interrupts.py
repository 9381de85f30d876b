"""Stopping a data preparation on SIGTERM or SIGINT, with its temporary folder removed.
"""

import contextlib
import signal
import sys
import threading


class Interrupted(BaseException):
    """SIGTERM or SIGINT during a preparation (a BaseException, like KeyboardInterrupt, so no
    `except Exception` on the way turns it into something else)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_pending_signal: list[int] = []  # the signal received inside stop_on_signals, if any


def raise_if_interrupted() -> None:
    """Raises Interrupted if a signal arrived but its exception was lost on the way."""
    if _pending_signal:
        raise Interrupted(_pending_signal[0])


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGINT raise Interrupted inside the block, so the `finally` clauses of the
    preparation remove its temporary folder; later signals are ignored until the block exits,
    so that cleanup finishes. Only in the main thread (where Python delivers signals).

    Python runs a handler between any two bytecodes, also inside a garbage-collection callback
    or a __del__, where a raised exception is dropped (and printed as a traceback, which
    sys.unraisablehook is set to keep quiet). So the signal is recorded too, and the record is
    checked at every batch and before the commit (raise_if_interrupted)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = (signal.SIGTERM, signal.SIGINT)

    def handler(signum, frame):
        del frame
        for s in signums:
            signal.signal(s, signal.SIG_IGN)
        _pending_signal.append(signum)
        raise Interrupted(signum)

    def unraisable(info):
        if not isinstance(info.exc_value, Interrupted):
            previous_hook(info)

    previous = {s: signal.signal(s, handler) for s in signums}
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
        raise_if_interrupted()
    finally:
        _pending_signal.clear()
        sys.unraisablehook = previous_hook
        for s, h in previous.items():
            signal.signal(s, h)
