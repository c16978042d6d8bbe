"""Soft wall-clock limits for pure-Python work (symbolic math) in any thread.

math-verify bounds its own work with ``signal.alarm``, which only works in the main thread and
only in whole seconds. Graders run in worker processes (main thread) but also inside Ray actors
and thread pools, so this module provides one mechanism that works everywhere:

- main thread: ``signal.setitimer(ITIMER_REAL)`` raises :class:`GradingTimeout` from the handler;
- other threads: a watchdog thread injects :class:`GradingTimeout` into the worker thread with
  ``PyThreadState_SetAsyncExc``.

Both only interrupt Python bytecode: a single long C call (e.g. a gigantic integer power) runs to
completion first. That is why :class:`prime.verifiers.pool.VerifierPool` additionally kills a
worker process that overruns its budget; this module is the cheap first line of defence.

:class:`GradingTimeout` derives from ``BaseException`` so that library code catching
``Exception`` (math-verify and sympy do) cannot swallow it. The injection repeats every 50 ms
until the guarded block has exited, in case a bare ``except:`` swallows one delivery.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import threading
from typing import Iterator

__all__ = ["GradingTimeout", "time_limit"]

_REPEAT_S = 0.05


class GradingTimeout(BaseException):
    """Raised inside a :func:`time_limit` block when its time is up."""


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`GradingTimeout` inside the block once ``seconds`` of wall time have passed.

    ``seconds`` of None or <= 0 disables the limit. Safe to call from any thread; nested use in
    the main thread is not supported (the inner timer replaces the outer one).
    """
    if seconds is None or seconds <= 0:
        yield
        return
    if threading.current_thread() is threading.main_thread():
        with _main_thread_limit(seconds):
            yield
    else:
        with _worker_thread_limit(seconds):
            yield


@contextlib.contextmanager
def _main_thread_limit(seconds: float) -> Iterator[None]:
    def _on_alarm(signum, frame):  # noqa: ARG001 - signal handler signature
        raise GradingTimeout(f"exceeded {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, _on_alarm)
    # The interval re-fires the alarm in case the first exception is swallowed.
    signal.setitimer(signal.ITIMER_REAL, seconds, _REPEAT_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, previous)


_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)
_set_async_exc.restype = ctypes.c_int
_clear_async_exc_fn = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)


@contextlib.contextmanager
def _worker_thread_limit(seconds: float) -> Iterator[None]:
    target = threading.get_ident()
    lock = threading.Lock()
    state = {"inside": True, "fired": False}
    stop = threading.Event()

    def _watchdog() -> None:
        if stop.wait(seconds):
            return
        while True:
            with lock:
                if not state["inside"]:
                    return
                state["fired"] = True
                _set_async_exc(target, GradingTimeout)
            if stop.wait(_REPEAT_S):
                return

    watchdog = threading.Thread(target=_watchdog, name="prime-time-limit", daemon=True)
    watchdog.start()
    try:
        yield
    finally:
        with lock:
            state["inside"] = False
            if state["fired"]:
                # A delivery may still be pending; clear it so it cannot fire after the block.
                _clear_async_exc_fn(target, None)
        stop.set()
