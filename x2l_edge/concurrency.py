"""One operation at a time per Session, and cancelling an operation from another thread.

A Session's chat context, its VideoContexts' decoders and its thread pool are shared state: an
operation (generate, an X²L prefill, a question on a VideoContext) is several native calls that must
not interleave with another thread's. Each Session therefore has one OperationLock:

- a plain call holds it for the whole operation (nested calls in the same thread reuse it);
- a stream (stream=True) holds it from its creation until it is exhausted, raises, is closed or is
  garbage-collected, whichever thread does that (the lock is not owned by a thread);
- different Sessions have different locks and run in parallel (the native calls release the GIL).

Cancelling: Session.cancel() stops the operation running now; a CancelToken passed as cancel= stops
the operation it was given to (also while that one still waits for the lock). Both make the native
call stop between layers and raise CancelledError; the session stays usable.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from . import _core

CancelledError = _core.CancelledError


class CancelToken:
    """Cancels the operations it is passed to (cancel=token), from any thread, at any time: before
    the operation starts (it raises CancelledError at once, or within CANCEL_POLL_S while it waits for
    another operation on the session), while it runs (the native call stops between layers) or between
    a stream's tokens."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._cancelled = False
        self._running: list = []  # native sessions running an operation of this token

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        with self._mu:
            self._cancelled = True
            for core in self._running:
                core.cancel()

    def _bind(self, core) -> None:
        with self._mu:
            if self._cancelled:
                raise CancelledError("cancelled before it started")
            self._running.append(core)

    def _unbind(self, core) -> None:
        # Under _mu: a cancel() that saw this operation has set the flag before the next one can clear it.
        with self._mu:
            self._running.remove(core)


class OperationLock:
    """The lock of one Session (see the module docstring). core: the native LlmSession, whose
    cancel flag is cleared when an operation starts."""

    CANCEL_POLL_S = 0.05  # how often an operation waiting for the lock looks at its CancelToken

    def __init__(self, core) -> None:
        self._core = core
        self._lock = threading.Lock()
        self._local = threading.local()  # .depth: nesting of operations in this thread
        # The stream holding the lock, if any: the thread that opened it and whether only that
        # thread has advanced it (then a new operation from that thread could never get the lock).
        self._stream_thread: int | None = None
        self._stream_moved = False

    def cancel(self) -> None:
        self._core.cancel()

    def _acquire(self, cancel: CancelToken | None) -> None:
        me = threading.get_ident()
        if self._stream_thread == me and not self._stream_moved:
            raise RuntimeError("this thread has an unfinished stream on this Session: read it to the end or "
                               "close() it before starting another operation")
        if cancel is not None and cancel.cancelled:
            raise CancelledError("cancelled before it started")
        if cancel is None:
            self._lock.acquire()
        else:  # a token cancelled while this waits for another operation: give up now, not when that one ends
            while not self._lock.acquire(timeout=self.CANCEL_POLL_S):
                if cancel.cancelled:
                    raise CancelledError("cancelled while waiting for the session")
        try:
            self._core.clear_cancel()
            if cancel is not None:
                cancel._bind(self._core)
        except BaseException:
            self._lock.release()
            raise

    def _release(self, cancel: CancelToken | None) -> None:
        try:
            if cancel is not None:
                cancel._unbind(self._core)
        finally:
            self._lock.release()

    @contextmanager
    def op(self, cancel: CancelToken | None = None):
        """Hold the session for one operation (re-entrant within a thread)."""
        depth = getattr(self._local, "depth", 0)
        if depth:
            if cancel is not None:
                raise ValueError("cancel= is given to the outermost operation only")
            self._local.depth = depth + 1
            try:
                yield
            finally:
                self._local.depth = depth
            return
        self._acquire(cancel)
        self._local.depth = 1
        try:
            yield
        finally:
            self._local.depth = 0
            self._release(cancel)

    def stream(self, start: Callable[[], Iterator], cancel: CancelToken | None = None) -> "LockedStream":
        """Run start() under the lock and return its iterator holding the lock until it ends."""
        if getattr(self._local, "depth", 0):
            raise RuntimeError("stream=True cannot be used inside another operation on the same Session")
        self._acquire(cancel)
        self._local.depth = 1
        try:
            it = start()
        except BaseException:
            self._local.depth = 0
            self._release(cancel)
            raise
        self._local.depth = 0
        self._stream_thread = threading.get_ident()
        self._stream_moved = False
        return LockedStream(self, it, cancel)


class LockedStream:
    """An iterator over an operation's output that holds its Session's lock until it is exhausted,
    raises, or is closed (close(), a with block, or garbage collection)."""

    def __init__(self, lock: OperationLock, it: Iterator, cancel: CancelToken | None) -> None:
        self._owner = lock
        self._it = it
        self._cancel = cancel
        self._open = True

    def __iter__(self) -> "LockedStream":
        return self

    def __next__(self):
        if not self._open:
            raise StopIteration
        lock = self._owner
        if threading.get_ident() != lock._stream_thread:
            lock._stream_moved = True
        lock._local.depth = 1  # calls the iterator makes are part of this operation
        try:
            return next(self._it)
        except BaseException:
            lock._local.depth = 0
            self.close()
            raise
        finally:
            lock._local.depth = 0

    def cancel(self) -> None:
        """Stop this stream from another thread: its next step raises CancelledError."""
        if self._open:
            self._owner.cancel()

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        lock = self._owner
        try:
            close = getattr(self._it, "close", None)
            if close is not None:
                close()
        finally:
            lock._stream_thread = None
            lock._stream_moved = False
            lock._release(self._cancel)

    def __enter__(self) -> "LockedStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
