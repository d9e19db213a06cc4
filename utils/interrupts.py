"""Signals during a run: SIGTERM handled like Ctrl-C (so the run saves), and both held back
while matplotlib draws (it can swallow a KeyboardInterrupt)."""

from __future__ import annotations

import contextlib
import signal
import threading


SIGCHLD = getattr(signal, "SIGCHLD", None)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (wandb agent early-stopping, a cluster's time limit) saves like Ctrl-C does. Once
    either arrives, DataLoader workers dying of the same signal (Slurm's scancel and docker stop
    signal the whole process group) are expected: torch's SIGCHLD handler, which would raise a
    RuntimeError at any later line of the main process, is switched off for the rest of the block."""
    def handler(signum, frame):
        if SIGCHLD is not None:
            signal.signal(SIGCHLD, signal.SIG_DFL)
        raise KeyboardInterrupt

    try:
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, handler)}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # an ignored SIGINT stays ignored
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, handler)
    if SIGCHLD is not None:
        previous[SIGCHLD] = signal.getsignal(SIGCHLD)
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old if old is not None else signal.SIG_DFL)


@contextlib.contextmanager
def interrupts_deferred():
    """Hold Ctrl-C and SIGTERM until the block ends, then raise KeyboardInterrupt. matplotlib
    swallows a KeyboardInterrupt raised inside savefig now and then (measured: 4 of 40 SIGINTs
    lost), which would silently cancel a user's Ctrl-C; outside the main thread: no change."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        # a signal the process ignored before (a background job's SIGINT) stays ignored
        if any(previous[s] is not signal.SIG_IGN for s in received):
            raise KeyboardInterrupt


@contextlib.contextmanager
def last_words():
    """The save after an interrupt: a second Ctrl-C or SIGTERM waits until it is written (the
    run is stopping anyway), and DataLoader workers dying of the same signal do not abort it
    (torch's SIGCHLD handler raises RuntimeError in the main process when a worker exits)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGCHLD] if hasattr(signal, "SIGCHLD") else [])
    previous = {s: signal.signal(s, signal.SIG_IGN if s != getattr(signal, "SIGCHLD", None) else signal.SIG_DFL)
                for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def start_iterating(loader):
    """iter(loader) with Ctrl-C and SIGTERM held while it runs: a DataLoader forks its workers
    there, and a signal that lands mid-fork is then raised once they exist, not lost."""
    with interrupts_deferred():
        return iter(loader)
