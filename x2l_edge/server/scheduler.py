"""One worker thread runs every model call of the process, in small steps.

C++ calls on one Session must not overlap, and a chat generation on the plain session owns its KV cache
from the prompt to the last token. So:

* an *answer* job (a chat completion, one question on an index) runs alone, step by step (one step =
  one token, or the prompt's prefill), from start to end; waiting answer jobs are taken round-robin
  over clients (one client's burst does not starve the others), FIFO within a client;
* *background* jobs (indexing a video: one step = decode, encode and prefill one chunk) have their own
  KV caches and interleave with the answer job: one background step whenever no answer is running, or
  when the running answer has had the worker for ``slice_s`` seconds since the last background step;
* a job can be cancelled at any time (client disconnect, DELETE): it stops before its next step.
  ``cancel_hook`` (the server passes ``Session.cancel``) is called as well when the job is the one whose
  step is running, so a long C++ call stops with CancelledError; ``clear_hook`` (the native session's
  ``clear_cancel``) runs after that job's step, so a cancel that arrived after the step's last native
  call does not stop the next job's first one.

A job is a generator: each ``next()`` is one step; what it yields goes to ``job.emit``, its return value
to ``job.finish``, an exception to ``job.fail``. Jobs never run on the event loop.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Callable, Iterator


class Busy(Exception):
    """The queue is full (HTTP 503)."""


class Cancelled(Exception):
    """The job was cancelled before it finished."""


class Job:
    def __init__(self, steps: Iterator, *, client: str = "", background: bool = False,
                 emit: Callable[[object], None] | None = None, finish: Callable[[object], None] | None = None,
                 fail: Callable[[BaseException], None] | None = None, ready: Callable[[], bool] | None = None):
        self.steps = steps
        # ready(): whether the next step can run without waiting (a live source: a chunk of frames is in).
        self.ready = ready or (lambda: True)
        self.client = client
        self.background = background
        self._emit, self._finish, self._fail = emit, finish, fail
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.n_steps = 0

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, item):
        if self._emit is not None:
            self._emit(item)

    def finish(self, value):
        if self._finish is not None:
            self._finish(value)

    def fail(self, exc: BaseException):
        if self._fail is not None:
            self._fail(exc)


class Scheduler:
    def __init__(self, *, max_queue: int = 64, slice_s: float = 2.0, cancel_hook: Callable[[], None] | None = None,
                 clear_hook: Callable[[], None] | None = None):
        self.max_queue = max_queue
        self.slice_s = slice_s
        self.cancel_hook = cancel_hook
        self.clear_hook = clear_hook
        self._cv = threading.Condition()
        self._answers: dict[str, collections.deque] = collections.OrderedDict()  # client -> waiting jobs
        self._background: collections.deque = collections.deque()
        self._active: Job | None = None      # the answer job now running
        self._running: Job | None = None     # the job whose step runs at this moment
        self._stop = False
        self.stats = collections.Counter()
        self._thread = threading.Thread(target=self._loop, name="x2l-model-worker", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ submitting
    def queued(self) -> int:
        with self._cv:
            return sum(len(q) for q in self._answers.values()) + len(self._background)

    def submit(self, job: Job) -> Job:
        with self._cv:
            if self._stop:
                raise Busy("the server is shutting down")
            if not job.background and sum(len(q) for q in self._answers.values()) >= self.max_queue:
                self.stats["rejected_busy"] += 1
                raise Busy(f"{self.max_queue} requests are already waiting for the model; retry later")
            if job.background:
                self._background.append(job)
            else:
                self._answers.setdefault(job.client, collections.deque()).append(job)
            self.stats["submitted"] += 1
            self._cv.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Cancel a job (queued or running); safe to call from any thread, any number of times."""
        if job.cancelled.is_set() or job.done.is_set():
            return
        job.cancel()
        with self._cv:
            # Under _cv: the worker cannot move on to another job's step while the hook runs, and it
            # clears the request (clear_hook) after this step, under _cv too.
            if self._running is job and self.cancel_hook is not None:
                try:
                    self.cancel_hook()
                except Exception:  # a hook failing must not take the worker down
                    pass
            self._cv.notify()

    def close(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stop = True
            pending = [j for q in self._answers.values() for j in q] + list(self._background)
            if self._active is not None:
                pending.append(self._active)
            self._cv.notify()
        for j in pending:
            j.cancel()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker
    def _next_answer(self):
        # Round-robin over clients: take the first client's oldest job, move the client to the back.
        for client in list(self._answers):
            q = self._answers.pop(client)
            job = q.popleft()
            if q:
                self._answers[client] = q
            return job
        return None

    def _pick(self, last_bg: float):
        """(job, is_background) for the next step, or (None, None) to wait."""
        if self._active is None:
            self._active = self._next_answer()
        if self._background and (self._active is None or time.monotonic() - last_bg >= self.slice_s):
            for _ in range(len(self._background)):
                job = self._background.popleft()
                if job.ready() or job.cancelled.is_set():
                    return job, True
                self._background.append(job)
        if self._active is not None:
            return self._active, False
        return None, None

    def _loop(self):
        last_bg = time.monotonic()
        while True:
            with self._cv:
                while True:
                    if self._stop:
                        return
                    job, bg = self._pick(last_bg)
                    if job is not None:
                        break
                    # Background jobs waiting for input (live sources) are polled.
                    self._cv.wait(0.1 if self._background else None)
                self._running = job
            keep = self._step(job)
            with self._cv:
                self._running = None
                if job.cancelled.is_set() and self.clear_hook is not None:
                    try:
                        self.clear_hook()
                    except Exception:
                        pass
                if bg:
                    last_bg = time.monotonic()
                    if keep:
                        self._background.append(job)  # round-robin over background jobs
                elif not keep:
                    self._active = None

    def _step(self, job: Job) -> bool:
        """Run one step of job; False when it is over."""
        if job.cancelled.is_set():
            self._end(job, fail=Cancelled("cancelled"))
            self.stats["cancelled"] += 1
            return False
        try:
            item = next(job.steps)
        except StopIteration as stop:
            self._end(job, value=stop.value)
            self.stats["finished"] += 1
            return False
        except BaseException as e:  # noqa: BLE001 -- reported to the job's owner, the worker lives on
            self.stats["cancelled" if job.cancelled.is_set() else "failed"] += 1
            self._end(job, fail=Cancelled("cancelled") if job.cancelled.is_set() else e)
            return False
        job.n_steps += 1
        self.stats["steps"] += 1
        if item is not None:
            try:
                job.emit(item)
            except Exception:
                pass
        return True

    @staticmethod
    def _end(job: Job, *, value=None, fail: BaseException | None = None):
        try:
            job.steps.close()  # runs the generator's finally blocks (free buffers, temp files)
        except Exception:
            pass
        try:
            if fail is not None:
                job.fail(fail)
            else:
                job.finish(value)
        except Exception:
            pass
        job.done.set()
