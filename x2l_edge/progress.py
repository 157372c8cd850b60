"""Progress of the long steps (video decode, vision encoding, the bi-level index, full-KV prefill, model
conversion): terminal bars, a callback, or nothing, chosen by one ``progress=`` argument.

``progress=None`` (the default): a bar per step on stderr when stderr is a terminal, nothing otherwise
(logs, pipes, notebooks, CI). ``True``: bars even when stderr is not a terminal. ``False``: nothing.
A callable: ``progress(step, done, total)`` after every unit of work, ``total`` None when unknown;
returning ``False`` stops the call with KeyboardInterrupt. The steps:
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Optional, Union

ProgressCallback = Callable[[str, int, Optional[int]], Any]
ProgressArg = Union[None, bool, ProgressCallback, "Progress"]

# step -> (bar label, unit)
STEPS = {
    "decode": ("decode frames", "frame"),
    "encode": ("vision encoder", "frame"),
    "index": ("bi-level index (2 passes/chunk)", "chunk"),
    "prefill": ("full-KV prefill", "chunk"),
    "convert": ("convert tensors", "tensor"),
}
__doc__ += "".join(f"\n- ``{k}``: {label}, one call per {unit}" for k, (label, unit) in STEPS.items()) + "\n"


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


class Progress:
    """The progress of one API call: ``update(step, done, total)`` per unit, ``close()`` at the end
    (a context manager). Built from a ``progress=`` argument by ``Progress.of``."""

    def __init__(self, progress: Union[None, bool, ProgressCallback] = None, *, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        if progress is None:
            progress = _isatty(self.stream)
        if not (isinstance(progress, bool) or callable(progress)):
            raise TypeError("progress must be None, True, False or a callable progress(step, done, total)")
        self._callback = None if isinstance(progress, bool) else progress
        self.bars_on = progress is True
        self._bars: dict = {}

    @classmethod
    def of(cls, progress: ProgressArg) -> "Progress":
        return progress if isinstance(progress, Progress) else cls(progress)

    @property
    def active(self) -> bool:
        return self.bars_on or self._callback is not None

    def update(self, step: str, done: int, total: Optional[int] = None, *, note: str | None = None) -> None:
        if self._callback is not None:
            if self._callback(step, int(done), None if total is None else int(total)) is False:
                raise KeyboardInterrupt(f"stopped by the progress callback (step {step!r})")
        if not self.bars_on:
            return
        bar = self._bars.get(step)
        if bar is None:
            from tqdm import tqdm

            label, unit = STEPS.get(step, (step, "it"))
            bar = self._bars[step] = tqdm(total=total, desc=label, unit=unit, file=self.stream, leave=True,
                                          dynamic_ncols=True, mininterval=0.1)
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(int(done) - bar.n)
        if note is not None:
            bar.set_postfix_str(note, refresh=False)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def scope(progress: ProgressArg):
    """A Progress for one call, closed at its end; a Progress passed in is used and left open."""
    if isinstance(progress, Progress):
        yield progress
        return
    p = Progress(progress)
    try:
        yield p
    finally:
        p.close()
