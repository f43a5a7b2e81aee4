"""Signals as exceptions, so that an interrupted merge cleans up, and steps a signal must not cut in half."""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator

from .errors import Interrupted

HANDLED_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


class _SignalState:
    """What the handler of ``signals_as_exceptions`` does now (signals only ever run in the main thread)."""

    def __init__(self) -> None:
        self.raised = False  # an Interrupted is unwinding: later signals must not cut its cleanup short
        self.deferring = 0  # inside ``deferred_signals``: remember the signal, raise it afterwards
        self.pending: int | None = None

    def handler(self, signum: int, frame: object) -> None:
        if self.raised:
            return
        if self.deferring:
            self.pending = self.pending or signum
            return
        self.raised = True
        raise Interrupted(signum)


_state: _SignalState | None = None


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into ``Interrupted`` so that cleanup code runs.

    Python runs signal handlers in the main thread whichever thread the signal hit, so a signal
    that lands in a reader thread still interrupts the main thread. Only the first signal raises:
    the ones that follow while it unwinds are ignored, so cleanup is never cut short.
    """
    global _state
    state, outer = _SignalState(), _state
    previous = {}
    try:
        for sig in HANDLED_SIGNALS:
            previous[sig] = signal.signal(sig, state.handler)
    except ValueError:  # not in the main thread: leave signals alone
        pass
    _state = state if previous else outer
    try:
        yield
    finally:
        _state = outer
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def deferred_signals(published: bool = False) -> Iterator[None]:
    """Hold back a signal for a step that must not be cut in half; raise it once the step is done
    (``published``: the step publishes the output, as the raised Interrupted then says).

    Starting and joining worker threads are such steps. ``Thread.start`` catches an exception raised
    by a signal handler right after the new thread began and unregisters it; the running thread then
    fails as it registers itself (KeyError in ``_bootstrap_inner``) and prints a traceback over the
    one-line interruption message. Before Python 3.12 a handler raising inside ``Thread.join`` marks
    a still-running thread as stopped (bpo-45274).
    """
    state = _state
    if state is None:
        yield
        return
    state.deferring += 1
    try:
        yield
    finally:
        state.deferring -= 1
    if not state.deferring and state.pending is not None and not state.raised:
        signum, state.pending, state.raised = state.pending, None, True
        raise Interrupted(signum, published=published)
