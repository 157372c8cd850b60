"""Reading: sampling plans and the lazy, sampled Video sources (files through OpenCV, arrays, iterables).
The semantics are described in x2l_edge/video/__init__.py."""
from __future__ import annotations

import math
import os
import stat
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Optional, Union

import numpy as np

from .frames import Frame, ProgressFn, VideoError, _as_rgb, _cv2


# ============================================================================ sampling plans


def uniform_indices(n: int, max_frames: int) -> np.ndarray:
    """Video-XL uniform sampling: ``np.linspace(0, n-1, F).astype(int)``; all frames when ``F >= n``."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    if max_frames >= n:
        return np.arange(n, dtype=np.int64)
    return np.linspace(0, n - 1, max_frames).astype(np.int64)


_TS_EPS = 1e-6


def _fps_counts(ts: np.ndarray, t0: float, rate: float) -> np.ndarray:
    """Number of targets t0 + k/rate that lie at or before each timestamp (minus one)."""
    return np.floor((ts - t0) * rate + _TS_EPS).astype(np.int64)


def _fps_select(ts: np.ndarray, t0: float, rate: float) -> np.ndarray:
    """Boolean mask: frame i is taken when a target lies in (ts[i-1], ts[i]] (first frame: >= t0)."""
    if ts.size == 0:
        return np.zeros(0, dtype=bool)
    c = _fps_counts(ts, t0, rate)
    c = np.maximum.accumulate(c)
    prev = np.concatenate(([-1], c[:-1]))
    return (c > prev) & (c >= 0)


def _check_sampling_args(max_frames, fps, start, end):
    if max_frames is not None:
        if isinstance(max_frames, bool) or int(max_frames) != max_frames or max_frames < 1:
            raise ValueError(f"max_frames must be a positive integer, got {max_frames!r}")
    if fps is not None and not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number of frames per second, got {fps!r}")
    if start is not None and not (start >= 0 and math.isfinite(start)):
        raise ValueError(f"start must be >= 0 seconds, got {start!r}")
    if end is not None and not (end > 0 and math.isfinite(end)):
        raise ValueError(f"end must be > 0 seconds, got {end!r}")
    if start is not None and end is not None and end <= start:
        raise ValueError(f"end ({end}) must be greater than start ({start})")


def _plan_indices(n: int, src_fps: Optional[float], *, max_frames, fps, start, end) -> np.ndarray:
    """Sorted unique frame indices to return for a source of n frames at src_fps (known up front)."""
    idx = np.arange(n, dtype=np.int64)
    if start is not None or end is not None or fps is not None:
        if not src_fps:
            raise VideoError("fps / start / end need timestamps: the source frame rate is unknown (pass source_fps=)")
        ts = idx / src_fps
        keep = np.ones(n, dtype=bool)
        if start is not None:
            keep &= ts >= start - _TS_EPS
        if end is not None:
            keep &= ts < end - _TS_EPS
        idx, ts = idx[keep], ts[keep]
        if fps is not None:
            t0 = start if start is not None else 0.0
            sel = _fps_select(ts, t0, fps)
            idx = idx[sel]
    if max_frames is not None and idx.size > max_frames:
        idx = idx[uniform_indices(idx.size, max_frames)]
    return idx


# ============================================================================ Video objects


class Video:
    """A frame source with a sampling plan.  Iterate it (or call :meth:`frames`) to decode lazily.

    Attributes (None when unknown): ``n_frames_total`` (frames in the source), ``fps`` (source frame
    rate), ``duration_s``, ``sample_indices`` (the planned source indices, ``np.int64``),
    ``width``, ``height``; ``truncated`` becomes True when the source ended before the plan did.
    """

    n_frames_total: Optional[int] = None
    fps: Optional[float] = None
    duration_s: Optional[float] = None
    sample_indices: Optional[np.ndarray] = None
    width: Optional[int] = None
    height: Optional[int] = None
    truncated: bool = False

    def __init__(self, *, max_frames=None, fps=None, start=None, end=None, allow_convert=False,
                 progress: Optional[ProgressFn] = None):
        _check_sampling_args(max_frames, fps, start, end)
        self._max_frames = None if max_frames is None else int(max_frames)
        self._rate = None if fps is None else float(fps)
        self._start = None if start is None else float(start)
        self._end = None if end is None else float(end)
        self._allow_convert = bool(allow_convert)
        self._progress = progress

    # -- public API ----------------------------------------------------------
    @property
    def n_samples(self) -> Optional[int]:
        """How many frames iteration will yield (None when unknown in advance)."""
        return None if self.sample_indices is None else int(self.sample_indices.size)

    def frames(self, progress: Optional[ProgressFn] = None) -> Iterator[Frame]:
        """Yield the sampled frames one at a time; ``progress(done, total)`` after each one."""
        progress = progress if progress is not None else self._progress
        total = self.n_samples
        done = 0
        if progress is not None:
            progress(0, total)
        for fr in self._iter_frames():
            done += 1
            yield fr
            if progress is not None:
                progress(done, total)
        if done == 0:
            raise VideoError(f"{self._describe()}: no frames could be read")

    def __iter__(self) -> Iterator[Frame]:
        return self.frames()

    def read_all(self, progress: Optional[ProgressFn] = None) -> list:
        """All sampled frames as a list (holds them all in memory: use for sampled subsets)."""
        return list(self.frames(progress))

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self._describe()} n_frames_total={self.n_frames_total} "
                f"fps={self.fps} samples={self.n_samples}>")

    # -- implementation ------------------------------------------------------
    def _iter_frames(self) -> Iterator[Frame]:
        raise NotImplementedError

    def _describe(self) -> str:
        return "video"

    def _mark_truncated(self, got: int, planned: Optional[int]):
        self.truncated = True
        warnings.warn(f"{self._describe()}: source ended early ({got} of {planned} planned frames read)",
                      RuntimeWarning, stacklevel=3)


class _ArrayVideo(Video):
    def __init__(self, arr: np.ndarray, *, source_fps=None, bgr=False, **kw):
        super().__init__(**kw)
        if arr.dtype != np.uint8:
            raise VideoError(f"video array: expected dtype uint8, got {arr.dtype}")
        if arr.ndim == 3:
            hint = " (a single image? pass arr[None])" if arr.shape[-1] in (3, 4) else ""
            if not self._allow_convert or hint:
                raise VideoError(
                    f"video array: expected shape (T, H, W, 3), got {arr.shape}{hint}; a (T, H, W) "
                    "grayscale video needs allow_convert=True"
                )
        elif arr.ndim != 4:
            raise VideoError(f"video array: expected shape (T, H, W, 3), got {arr.shape} (ndim {arr.ndim})")
        elif arr.shape[3] not in (1, 3, 4):
            raise VideoError(f"video array: expected 3 channels in (T, H, W, 3), got shape {arr.shape}")
        elif arr.shape[3] != 3 and not self._allow_convert:
            kind = "grayscale" if arr.shape[3] == 1 else "4-channel (RGBA / alpha)"
            raise VideoError(f"video array: {kind} frames of shape {arr.shape[1:]}; RGB expected "
                             "(pass allow_convert=True to convert)")
        if arr.shape[0] == 0:
            raise VideoError("video array: zero frames")
        if arr.shape[1] == 0 or arr.shape[2] == 0:
            raise VideoError(f"video array: empty frames of shape {arr.shape}")
        if source_fps is not None and not source_fps > 0:
            raise ValueError(f"source_fps must be > 0, got {source_fps!r}")
        self._arr = arr
        self._bgr = bool(bgr)
        self.n_frames_total = int(arr.shape[0])
        self.height, self.width = int(arr.shape[1]), int(arr.shape[2])
        self.fps = None if source_fps is None else float(source_fps)
        self.duration_s = None if self.fps is None else self.n_frames_total / self.fps
        self.sample_indices = _plan_indices(self.n_frames_total, self.fps, max_frames=self._max_frames,
                                            fps=self._rate, start=self._start, end=self._end)

    def _describe(self):
        return f"video array {self._arr.shape}"

    def _iter_frames(self):
        for i in self.sample_indices:
            i = int(i)
            rgb = _as_rgb(self._arr[i], allow_convert=self._allow_convert, bgr=self._bgr, what=f"frame {i}")
            yield Frame(i, None if self.fps is None else i / self.fps, rgb)


class _IterableVideo(Video):
    def __init__(self, source: Iterable, *, source_fps=None, bgr=False, **kw):
        super().__init__(**kw)
        if source_fps is not None and not source_fps > 0:
            raise ValueError(f"source_fps must be > 0, got {source_fps!r}")
        self._src = source
        self._bgr = bool(bgr)
        self.fps = None if source_fps is None else float(source_fps)
        self._consumed = False
        self._random_access = isinstance(source, Sequence) and not isinstance(source, (str, bytes))
        if self._random_access:
            n = len(source)
            if n == 0:
                raise VideoError("frame sequence: zero frames")
            self.n_frames_total = n
            if self.fps is not None:
                self.duration_s = n / self.fps
            # Timestamps may live in the items ((ts, frame) pairs); the plan is exact only when the
            # selection does not depend on them.
            if self._rate is None and self._start is None and self._end is None:
                self.sample_indices = uniform_indices(n, self._max_frames) if self._max_frames else np.arange(n)

    def _describe(self):
        return f"frame source {type(self._src).__name__}"

    def _unpack(self, item, i):
        ts = None
        if isinstance(item, Frame):
            ts, arr = item.timestamp_s, item.rgb
        elif isinstance(item, np.ndarray):
            arr = item
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], np.ndarray):
            ts, arr = item
            try:
                ts = float(ts)
            except (TypeError, ValueError):
                raise VideoError(f"frame {i}: timestamp must be a number, got {type(item[0]).__name__}") from None
        else:
            raise VideoError(
                f"frame {i}: expected an [H, W, 3] uint8 array or a (timestamp_s, array) pair, got "
                f"{type(item).__name__}"
            )
        if ts is None and self.fps is not None:
            ts = i / self.fps
        return ts, arr

    def _convert(self, arr, i):
        return _as_rgb(arr, allow_convert=self._allow_convert, bgr=self._bgr, what=f"frame {i}")

    def _iter_frames(self):
        if self.sample_indices is not None:
            # Sized sequence without time-based selection: exact plan, random access.
            for i in self.sample_indices:
                i = int(i)
                ts, arr = self._unpack(self._src[i], i)
                yield Frame(i, ts, self._convert(arr, i))
            return
        it = iter(self._src)
        if it is self._src:  # an iterator / generator: one pass only
            if self._consumed:
                raise VideoError("this frame iterator was already consumed (one-shot source)")
            self._consumed = True
        stream = self._select_stream(it)
        if self._max_frames is None:
            for i, ts, arr in stream:
                yield Frame(i, ts, self._convert(arr, i))
            return
        yield from self._decimate(stream)

    def _select_stream(self, it):
        """Yield (index, ts, raw array) for frames passing start/end/fps; pulls one item at a time."""
        need_ts = self._rate is not None or self._start is not None or self._end is not None
        t0 = self._start
        c_prev = -1
        i = -1
        for i, item in enumerate(it):
            ts, arr = self._unpack(item, i)
            if need_ts:
                if ts is None:
                    raise VideoError(
                        "fps / start / end need timestamps: yield (timestamp_s, frame) pairs or pass source_fps="
                    )
                if self._end is not None and ts >= self._end - _TS_EPS:
                    return  # stop pulling: the rest of a live source is never read
                if self._start is not None and ts < self._start - _TS_EPS:
                    continue
                if self._rate is not None:
                    if t0 is None:
                        t0 = ts
                    c = int(math.floor((ts - t0) * self._rate + _TS_EPS))
                    take = c > c_prev and c >= 0
                    c_prev = max(c_prev, c)
                    if not take:
                        continue
            yield i, ts, arr
        if self.n_frames_total is None:  # exhausted: now the length is known
            self.n_frames_total = i + 1
            if self.fps is not None:
                self.duration_s = self.n_frames_total / self.fps

    def _decimate(self, stream):
        """max_frames over a stream of unknown length (see module doc): keep every s-th candidate,
        halving the kept list and doubling s when it reaches 2F, plus the latest candidate; at the
        end pick, for each target of linspace(0, n-1, F), the nearest kept candidate (in order)."""
        F = self._max_frames
        kept = []  # (position among candidates, Frame), positions multiples of stride
        stride = 1
        last = None
        for pos, (i, ts, arr) in enumerate(stream):
            rgb = self._convert(arr, i)
            if pos % stride == 0:
                kept.append((pos, Frame(i, ts, rgb.copy())))  # sources may reuse their buffers
                if len(kept) >= 2 * F:
                    kept = kept[::2]
                    stride *= 2
                last = None
            else:
                last = (pos, Frame(i, ts, rgb))  # the stream's last frame is never overwritten
        if last is not None:
            kept.append(last)
        if not kept:
            return
        n = kept[-1][0] + 1
        pos = np.array([p for p, _ in kept], dtype=np.float64)
        m = len(kept)
        if m <= F:
            pick = list(range(m))
        else:
            pick, lo = [], 0
            for j, q in enumerate(np.linspace(0, n - 1, F)):
                hi = m - (F - j)
                k = int(np.searchsorted(pos, q))
                best = min((c for c in (k - 1, k) if lo <= c <= hi), key=lambda c: abs(pos[c] - q), default=None)
                if best is None:
                    best = min(max(k, lo), hi)
                pick.append(best)
                lo = best + 1
        self.sample_indices = np.array([kept[j][1].index for j in pick], dtype=np.int64)
        for j in pick:
            yield kept[j][1]


class _FileVideo(Video):
    def __init__(self, path, *, max_failures: int = 8, **kw):
        super().__init__(**kw)
        self._path = os.fspath(path)
        if isinstance(self._path, bytes):
            self._path = os.fsdecode(self._path)
        is_url = "://" in self._path
        if not is_url:
            if not os.path.exists(self._path):
                raise FileNotFoundError(2, "video file not found", self._path)
            if os.path.isdir(self._path):
                raise IsADirectoryError(21, "is a directory, not a video file", self._path)
            if not stat.S_ISREG(os.stat(self._path).st_mode):  # a FIFO or device would block or never end
                raise VideoError(f"video file {self._path!r} is not a regular file")
            if os.path.getsize(self._path) == 0:
                raise VideoError(f"video file {self._path!r} is empty (0 bytes)")
        self._max_failures = max(1, int(max_failures))
        self._is_url = is_url
        cap = self._open()
        try:
            cv2 = _cv2()
            n = cap.get(cv2.CAP_PROP_FRAME_COUNT)
            fps = cap.get(cv2.CAP_PROP_FPS)
            self.width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) or None
            self.height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) or None
            self.fps = float(fps) if fps and math.isfinite(fps) and 0 < fps < 10000 else None
            n = int(n) if n and math.isfinite(n) and n > 0 else None
            # The header count matters for uniform sampling: check that its last frame exists,
            # else count the frames (second pass).
            if n is not None and self._max_frames is not None and not self._frame_exists(cap, n - 1):
                n = None
            if n is None and not is_url:
                cap.release()
                cap = self._open()
                n = self._count_frames(cap)
                if n == 0:
                    raise VideoError(f"video file {self._path!r}: no decodable frames")
            self.n_frames_total = n
        finally:
            cap.release()
        if self.n_frames_total == 0:
            raise VideoError(f"video file {self._path!r}: zero frames")
        if self.n_frames_total is not None and self.fps:
            self.duration_s = self.n_frames_total / self.fps
        if self.n_frames_total is not None:
            if (self._rate or self._start is not None or self._end is not None) and not self.fps:
                raise VideoError(f"video file {self._path!r}: frame rate unknown, cannot sample by time")
            self.sample_indices = _plan_indices(self.n_frames_total, self.fps, max_frames=self._max_frames,
                                                fps=self._rate, start=self._start, end=self._end)
            if self.sample_indices.size == 0:
                raise VideoError(f"video file {self._path!r}: no frames in the requested range "
                                 f"[{self._start}, {self._end}) s (duration {self.duration_s} s)")
        elif self._rate is not None and not self.fps:
            raise VideoError(f"video file {self._path!r}: frame rate unknown, cannot sample by time")
        # Seek-vs-grab cost model (seconds), refined while decoding.
        self._t_grab = 1e-3
        self._t_read = 2e-3
        self._t_seek = None

    def _describe(self):
        return f"video file {self._path!r}"

    def _open(self):
        cv2 = _cv2()
        cap = cv2.VideoCapture(self._path)
        if not cap.isOpened():
            cap.release()
            raise VideoError(
                f"cannot open video {self._path!r}: not a video OpenCV/FFmpeg can decode "
                "(corrupt, truncated before its index, or an unsupported codec)"
            )
        return cap

    def _frame_exists(self, cap, i: int) -> bool:
        cv2 = _cv2()
        if i == 0:
            return bool(cap.grab())
        cap.set(cv2.CAP_PROP_POS_FRAMES, i)
        return bool(cap.grab())

    def _count_frames(self, cap) -> int:
        """Count decodable frames with grab() (no colour conversion); stops after max_failures
        consecutive failures (end of stream returns False at once, so that costs nothing)."""
        n = fails = 0
        while fails < self._max_failures:
            if cap.grab():
                n += 1
                fails = 0
            else:
                fails += 1
        return n

    def _iter_frames(self):
        cv2 = _cv2()
        indices = self.sample_indices
        cap = self._open()
        try:
            if indices is None:  # unknown count (URL/stream) and no uniform plan: read sequentially
                yield from self._iter_sequential(cap)
                return
            pos = 0  # index of the frame the next grab()/read() returns
            fails = 0
            got = 0
            can_seek = True
            for target in indices:
                target = int(target)
                gap = target - pos
                if gap > 0 and can_seek and self._seek_is_cheaper(gap):
                    t = time.perf_counter()
                    cap.set(cv2.CAP_PROP_POS_FRAMES, target)
                    back = int(round(cap.get(cv2.CAP_PROP_POS_FRAMES)))
                    if back == target:
                        ok, bgr = cap.read()
                        ok = bool(ok) and bgr is not None
                        dt = time.perf_counter() - t
                        self._t_seek = dt if self._t_seek is None else 0.7 * self._t_seek + 0.3 * dt
                        pos = target + 1
                    elif back < target and not cap.read()[0]:
                        break  # the stream ends before target (header count too high)
                    else:  # unreliable seeking in this container: reopen, decode sequentially
                        can_seek = False
                        cap.release()
                        cap = self._open()
                        pos = 0
                        ok, bgr, pos, fails = self._skip_and_read(cap, pos, target, fails)
                else:
                    ok, bgr, pos, fails = self._skip_and_read(cap, pos, target, fails)
                if ok:
                    fails = 0
                    got += 1
                    yield Frame(target, target / self.fps if self.fps else None, _bgr_to_rgb(bgr))
                else:
                    fails += 1
                    if fails >= self._max_failures:
                        break
            if got < indices.size:
                self._mark_truncated(got, int(indices.size))
        finally:
            cap.release()

    def _seek_is_cheaper(self, gap: int) -> bool:
        grab_cost = gap * self._t_grab + self._t_read
        if self._t_seek is None:
            return gap > 24
        return self._t_seek < grab_cost

    def _skip_and_read(self, cap, pos, target, fails):
        """grab() up to target, then read() it.  Returns (ok, bgr, new pos, consecutive failures)."""
        while pos < target:
            t = time.perf_counter()
            ok = cap.grab()
            self._t_grab = 0.9 * self._t_grab + 0.1 * (time.perf_counter() - t)
            pos += 1
            if ok:
                fails = 0
            else:
                fails += 1
                if fails >= self._max_failures:
                    return False, None, pos, fails
        t = time.perf_counter()
        ok, bgr = cap.read()
        self._t_read = 0.9 * self._t_read + 0.1 * (time.perf_counter() - t)
        return bool(ok) and bgr is not None, bgr, pos + 1, fails

    def _iter_sequential(self, cap):
        """Unknown frame count (streams): read in order; sampling as for iterables of unknown length."""
        cv2 = _cv2()

        def frames():
            fails = i = 0
            while fails < self._max_failures:
                ok, bgr = cap.read()
                if not ok or bgr is None:
                    fails += 1
                    continue
                fails = 0
                ts = i / self.fps if self.fps else cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
                yield Frame(i, ts, _bgr_to_rgb(bgr))
                i += 1

        inner = _IterableVideo(frames(), max_frames=self._max_frames, fps=self._rate, start=self._start,
                               end=self._end)
        for fr in inner._iter_frames():
            yield fr
        self.sample_indices = inner.sample_indices
        if inner.n_frames_total is not None:
            self.n_frames_total = inner.n_frames_total


def _bgr_to_rgb(bgr: np.ndarray) -> np.ndarray:
    if bgr.ndim == 2:  # CAP_PROP_CONVERT_RGB off or a gray decoder: replicate
        return np.repeat(bgr[:, :, None], 3, axis=2)
    if bgr.shape[2] == 4:
        bgr = bgr[:, :, :3]
    return np.ascontiguousarray(bgr[:, :, ::-1])


def open_video(
    source: Union[str, os.PathLike, np.ndarray, Iterable],
    *,
    max_frames: Optional[int] = None,
    fps: Optional[float] = None,
    start: Optional[float] = None,
    end: Optional[float] = None,
    source_fps: Optional[float] = None,
    allow_convert: bool = False,
    bgr: bool = False,
    progress: Optional[ProgressFn] = None,
    max_failures: int = 8,
) -> Video:
    """Open a video for lazy, sampled decoding.  See the module docstring for the semantics.

    ``max_frames``: uniform (Video-XL linspace) sample count; ``fps``: sampling rate in frames per
    second; ``start`` / ``end``: time window in seconds; ``source_fps``: frame rate of an array or
    iterable source (for timestamps); ``allow_convert``: accept grayscale / RGBA frames (converted
    to RGB) instead of raising :class:`VideoError`; ``bgr``: arrays/iterable frames are BGR
    (OpenCV order); ``progress``: default ``progress(done, total)`` hook for iteration;
    ``max_failures``: consecutive failed reads after which decoding of a file stops.

    Raises FileNotFoundError (missing file), VideoError (unreadable file, no frames, bad frames),
    ValueError (bad arguments).
    """
    kw = dict(max_frames=max_frames, fps=fps, start=start, end=end, allow_convert=allow_convert, progress=progress)
    if isinstance(source, (str, bytes, os.PathLike)):
        return _FileVideo(source, max_failures=max_failures, **kw)
    if isinstance(source, np.ndarray):
        return _ArrayVideo(source, source_fps=source_fps, bgr=bgr, **kw)
    if isinstance(source, Video):
        raise TypeError("source is already an opened Video")
    if isinstance(source, Iterable):
        return _IterableVideo(source, source_fps=source_fps, bgr=bgr, **kw)
    raise TypeError(
        f"unsupported video source {type(source).__name__}: pass a path, a (T, H, W, 3) uint8 array, "
        "or an iterable of frames"
    )
