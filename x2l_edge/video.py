"""Video input for x2l-edge: streaming frame sampling and HF-exact image preprocessing.

Pure Python + numpy; OpenCV (``opencv-python-headless``) is imported lazily, only when a video file
is opened or written, so ``import x2l_edge`` works without it.  Pillow is *not* needed at run time:
the bicubic resize is a numpy re-implementation of Pillow's ``Image.resize(..., Image.BICUBIC)``
(``libImaging/Resample.c``, 8-bit fixed-point path) that reproduces it bit for bit.

Reading
-------
``open_video(source, max_frames=None, fps=None, start=None, end=None, ...)`` returns a
:class:`Video`; iterating it yields :class:`Frame` ``(index, timestamp_s, rgb)`` one at a time
(``rgb``: ``uint8 [H, W, 3]``).  Nothing but the frame being handed out is decoded and kept, so a
one-hour video never sits in memory.  Sources:

* a path (``str`` / ``os.PathLike``; ``scheme://`` URLs are passed to OpenCV unchecked);
* a ``numpy`` array ``(T, H, W, 3)`` ``uint8``;
* any iterable / iterator of frames: ``H x W x 3`` ``uint8`` arrays, ``(timestamp_s, array)``
  pairs, or :class:`Frame` objects (e.g. a camera generator).  Arrays from iterables are taken as
  RGB; pass ``bgr=True`` for frames straight from ``cv2.VideoCapture.read()``.

Sampling (all selection happens before decoding; skipped frames are never converted):

* ``max_frames=F``: uniform, exactly Video-XL's ``np.linspace(0, N-1, F).astype(int)`` over the
  ``N`` frames in ``[start, end)``.  When ``F >= N`` every frame is returned once (no duplicates).
  The file's frame count is checked before sampling by seeking to the last claimed frame; when the
  header lies (truncated file) or the count is unknown, one counting pass with ``grab()``
  (demux + decode, no colour conversion) establishes the true count (two-pass).
  For iterables of unknown length the count cannot be known in advance: frames are decimated on
  the fly (keep every ``s``-th frame, halve the kept list and double ``s`` whenever it reaches
  ``2F``; the latest frame is kept too), which holds at most ``2F`` frames; at the end, for each
  target of ``linspace(0, n-1, F)`` the nearest kept frame is chosen (first and last frame exact,
  the others within ``s/2``; such a source yields nothing until it is exhausted).  Sized
  sequences (lists, tuples) are sampled exactly.
* ``fps=r``: one frame every ``1/r`` seconds by timestamp: for the targets ``t_k = t0 + k/r``
  (``t0`` = ``start``, else 0 for files / arrays, else the first frame's timestamp), the first
  frame with ``timestamp >= t_k`` is taken (each frame at most once).  With ``max_frames`` as
  well, the fps-selected frames are then uniformly subsampled to at most ``F``.
* neither: every frame.  ``start`` / ``end`` (seconds) restrict to ``start <= t < end``.

Files are read up to the frame count in their header (checked against the file for uniform
sampling, see above).  Timestamps of files and arrays are ``index / fps`` (constant frame rate
assumed); arrays and iterables without timestamps need ``source_fps=`` for timestamps, ``fps=``,
``start=`` and ``end=``.  Frames from arrays are views into the array (no copy).

Seeking: on every jump the reader picks ``grab()`` (skip without colour conversion) or
``CAP_PROP_POS_FRAMES`` (container seek + decode from the previous key frame) by their measured
cost.  Measured on a 5-minute 640x360 30 fps file (2 CPU cores), 32 uniform frames: mp4v
0.4-0.5 s with seeks vs 8.7 s with grab() only; MJPG 0.8-1.4 s vs 22 s; both exact.  FFV1 in
Matroska seeks slowly (~0.5 s) and the cost model then prefers grab() for short gaps.  A seek
whose reported position disagrees with the request disables seeking for that file (reopen +
grab()).  Decoding stops after ``max_failures`` consecutive failed reads, so a file whose header
claims more frames than it holds never hangs; the video is then marked ``truncated`` and a
``RuntimeWarning`` is issued.

Preprocessing
-------------
``preprocess(rgb, image_size=, mean=, std=, resize=)`` -> ``float32 [3, S, S]`` reproduces the
Hugging Face (PIL backend) image processors: PIL bicubic resize on uint8 (support scaled for
downsampling, a = -0.5, 22-bit fixed-point coefficients, int32 accumulation, rounding to uint8
after each of the two passes), HF center crop (``top = (h - S) // 2``), ``x * (1/255)`` in float64
cast to float32, then ``(x - mean) / std`` in float32.

* ``resize="shortest_center_crop"`` (CLIP / Video-XL): shortest side to ``S``, long side
  ``int(S * long / short)``, center crop ``S x S``.
* ``resize="square"`` (SigLIP / LLaVA-OneVision video): resize straight to ``S x S``.

The resize is separable: per axis, the taps (input index, int32 coefficient) are precomputed per
(in size, out size, crop) and cached, and each pass is ``ksize`` vectorised gather-multiply-adds
in int32, exactly Pillow's arithmetic (no BLAS, so no thread oversubscription).  Only the output
pixels that survive the crop are computed.  Pass order: recent Pillow (13.0; not yet 12.0) runs
the vertical pass first when the height shrinks by more than twice as many pixels as the width
(``pass_order="auto"``, the default); older Pillow always runs the horizontal pass first
(``pass_order="horizontal_first"``).  The two orders can differ by a few levels on some pixels,
only for such shapes (e.g. portrait 1080x1920 -> 384x384); landscape video frames are unaffected.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, NamedTuple, Optional, Union

import numpy as np

__all__ = [
    "VideoError",
    "Frame",
    "Video",
    "open_video",
    "uniform_indices",
    "write_video",
    "preprocess",
    "preprocess_batch",
    "pil_resize",
    "VideoPreprocessor",
    "CLIP_MEAN",
    "CLIP_STD",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

ProgressFn = Callable[[int, Optional[int]], Any]


class VideoError(ValueError):
    """A video or frame that cannot be used: unreadable/corrupt file, no frames, bad dtype/shape."""


class Frame(NamedTuple):
    """One decoded frame: position in the source, time in seconds (None when unknown), RGB pixels."""

    index: int
    timestamp_s: Optional[float]
    rgb: np.ndarray


def _cv2():
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading or writing video files needs OpenCV: pip install opencv-python-headless"
        ) from e
    return cv2


# ============================================================================ frame validation


def _as_rgb(arr: Any, *, allow_convert: bool, bgr: bool = False, what: str = "frame") -> np.ndarray:
    """Validate one frame and return it as uint8 [H, W, 3] RGB (a view when nothing changes)."""
    if not isinstance(arr, np.ndarray):
        raise VideoError(f"{what}: expected a numpy uint8 array [H, W, 3], got {type(arr).__name__}")
    if arr.dtype != np.uint8:
        raise VideoError(
            f"{what}: expected dtype uint8, got {arr.dtype} (convert explicitly, e.g. "
            "(x * 255).round().clip(0, 255).astype(np.uint8) for floats in [0, 1])"
        )
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 1):
        if not allow_convert:
            raise VideoError(
                f"{what}: grayscale frame of shape {arr.shape}; RGB [H, W, 3] expected "
                "(pass allow_convert=True to replicate the gray channel)"
            )
        g = arr if arr.ndim == 2 else arr[:, :, 0]
        arr = np.repeat(g[:, :, None], 3, axis=2)
        bgr = False
    elif arr.ndim == 3 and arr.shape[2] == 4:
        if not allow_convert:
            raise VideoError(
                f"{what}: 4-channel (RGBA / alpha) frame of shape {arr.shape}; RGB [H, W, 3] expected "
                "(pass allow_convert=True to drop the alpha channel)"
            )
        arr = arr[:, :, :3]
    elif arr.ndim != 3 or arr.shape[2] != 3:
        raise VideoError(f"{what}: expected shape [H, W, 3], got {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise VideoError(f"{what}: empty frame of shape {arr.shape}")
    if bgr:
        arr = arr[:, :, ::-1]
    return arr


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


# ============================================================================ writing


_CODECS = {"mp4v": "mp4v", "MJPG": "MJPG", "FFV1": "FFV1"}


def write_video(path, frames, fps: float, codec: str = "mp4v") -> int:
    """Write RGB uint8 frames ((T, H, W, 3) array or iterable of [H, W, 3]) with OpenCV.

    Codecs that the headless OpenCV wheel encodes: ``mp4v`` (.mp4/.avi/.mkv), ``MJPG`` (.avi/.mkv),
    ``FFV1`` (lossless; .mkv/.avi).  H.264 is not available.  Width and height must be even
    (OpenCV's FFmpeg writer would silently drop the last row/column otherwise).  Returns the number
    of frames written; raises VideoError if the writer cannot be opened or there are no frames.
    """
    cv2 = _cv2()
    if codec not in _CODECS:
        raise VideoError(f"unsupported codec {codec!r}; choose one of {sorted(_CODECS)}")
    if not (fps and fps > 0):
        raise ValueError(f"fps must be > 0, got {fps!r}")
    path = os.fspath(path)
    writer = None
    size = None
    n = 0
    try:
        for i, fr in enumerate(frames):
            rgb = _as_rgb(fr, allow_convert=False, what=f"frame {i}")
            h, w = rgb.shape[:2]
            if writer is None:
                if h % 2 or w % 2:
                    raise VideoError(f"frame size {w}x{h}: video encoders need even width and height")
                size = (w, h)
                writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*_CODECS[codec]), float(fps), size)
                if not writer.isOpened():
                    writer.release()
                    writer = None
                    raise VideoError(
                        f"OpenCV cannot open a {codec} writer for {path!r} (unsupported codec/container "
                        "combination or unwritable path; try .mp4 for mp4v, .avi for MJPG, .mkv for FFV1)"
                    )
            elif (w, h) != size:
                raise VideoError(f"frame {i} has size {w}x{h}, expected {size[0]}x{size[1]} like frame 0")
            writer.write(np.ascontiguousarray(rgb[:, :, ::-1]))
            n += 1
    finally:
        if writer is not None:
            writer.release()
    if n == 0:
        raise VideoError("write_video: no frames to write")
    return n


# ============================================================================ PIL-exact resize

_PRECISION_BITS = 32 - 8 - 2  # Pillow Resample.c, 8 bits per channel


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    out = np.zeros_like(x)
    m1 = x < 1.0
    m2 = (x >= 1.0) & (x < 2.0)
    x1 = x[m1]
    out[m1] = ((a + 2.0) * x1 - (a + 3.0)) * x1 * x1 + 1
    x2 = x[m2]
    out[m2] = (((x2 - 5) * x2 + 8) * x2 - 4) * a
    return out


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


_FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}
_PASS_ORDERS = ("auto", "horizontal_first")


@lru_cache(maxsize=64)
def _axis_taps(in_size: int, out_size: int, lo: int, hi: int, resample: str):
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc for outputs [lo, hi) of in_size -> out_size.

    Returns (first input used, number of inputs used, taps); each tap is (idx, k): for every output
    the input row (relative to the first used; clamped where the coefficient is 0) and its int32
    22-bit fixed-point coefficient as a column [n_out, 1].
    """
    fn, fsupport = _FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = fsupport * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(lo, hi, dtype=np.float64) + 0.5) * scale
    ss = 1.0 / filterscale
    # C (int) casts truncate toward zero
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    k = np.arange(ksize, dtype=np.int64)
    valid = k[None, :] < xmax[:, None]
    w = np.where(valid, fn((k[None, :] + xmin[:, None] - center[:, None] + 0.5) * ss), 0.0)
    ww = np.zeros(len(center))
    for j in range(ksize):  # sequential sum in C order (bit-identical normalisation)
        ww = ww + w[:, j]
    w = np.where(ww[:, None] != 0.0, w / np.where(ww == 0.0, 1.0, ww)[:, None], w)
    one = float(1 << _PRECISION_BITS)
    kk = np.where(valid, np.where(w < 0, np.trunc(-0.5 + w * one), np.trunc(0.5 + w * one)), 0.0)
    kk = kk.astype(np.int32)
    first = int(xmin.min())
    used = int((xmin + xmax).max()) - first
    idx = np.minimum(xmin[:, None] - first + k[None, :], used - 1)
    taps = tuple(
        (np.ascontiguousarray(idx[:, j]), np.ascontiguousarray(kk[:, j: j + 1]))
        for j in range(ksize)
        if kk[:, j].any()
    )
    return first, used, taps


def _resample_axis0(x: np.ndarray, taps) -> np.ndarray:
    """One Pillow 8-bit pass along axis 0 of a C-contiguous uint8 [n_in, M] array:
    out[o] = clip8(2^21 + sum_j k[o, j] * x[idx[o, j]]) in int32, exactly as Resample.c."""
    n_out, M = taps[0][0].shape[0], x.shape[1]
    acc = np.full((n_out, M), 1 << (_PRECISION_BITS - 1), dtype=np.int32)
    gathered = np.empty((n_out, M), dtype=np.uint8)
    prod = np.empty((n_out, M), dtype=np.int32)
    for idx, kcol in taps:
        np.take(x, idx, axis=0, out=gathered)
        np.multiply(gathered, kcol, out=prod)
        acc += prod
    acc >>= _PRECISION_BITS
    np.clip(acc, 0, 255, out=acc)
    return acc.astype(np.uint8)


def _vertical_first(h: int, w: int, out_h: int, out_w: int, pass_order: str) -> bool:
    if pass_order == "horizontal_first":
        return False
    # Recent Pillow (13.0; after 12.0) ImagingResampleInner: "If height is being scaled down more
    # than twice the amount the width is, run the vertical pass first".  Older: horizontal first.
    return (h - out_h) > 0 and (h - out_h) > (w - out_w) * 2


def _resize_hwc(rgb: np.ndarray, out_h: int, out_w: int, crop: tuple, resample: str,
                pass_order: str = "auto") -> np.ndarray:
    """PIL-exact resize of uint8 [H, W, 3] to (out_h, out_w), keeping only rows [top, top+ch) and
    columns [left, left+cw) of the result (only those are computed).  Returns uint8 [ch, cw, 3]."""
    if resample not in _FILTERS:
        raise ValueError(f"unsupported resample {resample!r}; supported: {sorted(_FILTERS)}")
    if pass_order not in _PASS_ORDERS:
        raise ValueError(f"pass_order must be one of {_PASS_ORDERS}, got {pass_order!r}")
    h, w, c = rgb.shape
    top, left, ch, cw = crop
    need_v, need_h = out_h != h, out_w != w
    if need_v:
        vfirst, vcount, vtaps = _axis_taps(h, out_h, top, top + ch, resample)
    if need_h:
        hfirst, hcount, htaps = _axis_taps(w, out_w, left, left + cw, resample)

    def hpass(x):  # [R, Wu, 3] -> [R, cw, 3]
        r, wu = x.shape[0], x.shape[1]
        xt = np.ascontiguousarray(np.transpose(x, (1, 0, 2))).reshape(wu, r * c)
        return np.transpose(_resample_axis0(xt, htaps).reshape(cw, r, c), (1, 0, 2))

    def vpass(x):  # [Hu, Wc, 3] -> [ch, Wc, 3]
        hu, wc = x.shape[0], x.shape[1]
        return _resample_axis0(np.ascontiguousarray(x).reshape(hu, wc * c), vtaps).reshape(ch, wc, c)

    if need_v and need_h and _vertical_first(h, w, out_h, out_w, pass_order):
        return hpass(vpass(rgb[vfirst: vfirst + vcount, hfirst: hfirst + hcount]))
    x = rgb[vfirst: vfirst + vcount] if need_v else rgb[top: top + ch]
    x = hpass(x[:, hfirst: hfirst + hcount]) if need_h else x[:, left: left + cw]
    if need_v:
        x = vpass(x)
    return x


def pil_resize(rgb: np.ndarray, size: tuple, resample: str = "bicubic", pass_order: str = "auto") -> np.ndarray:
    """``np.asarray(Image.fromarray(rgb).resize((w, h), Image.BICUBIC))`` without Pillow (bit-exact).

    ``size`` is (width, height) like PIL; uint8 [H, W, 3] in and out.  ``pass_order="auto"``
    follows recent Pillow (13.0: vertical pass first when the height shrinks more than twice as
    much as the width); ``"horizontal_first"`` reproduces older Pillow releases.
    """
    rgb = _as_rgb(rgb, allow_convert=False, what="image")
    w, h = int(size[0]), int(size[1])
    if w <= 0 or h <= 0:
        raise ValueError(f"size must be positive, got {size}")
    out = _resize_hwc(rgb, h, w, (0, 0, h, w), resample, pass_order)
    return out.copy() if np.shares_memory(out, rgb) else np.ascontiguousarray(out)


# ============================================================================ preprocessing

_RESIZE_MODES = ("square", "shortest_center_crop")


@lru_cache(maxsize=16)
def _norm_lut(mean: tuple, std: tuple) -> np.ndarray:
    """float32 [3, 256]: HF rescale (float64 * 1/255 -> float32) then (x - mean) / std in float32."""
    x = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    m = np.asarray(mean, dtype=np.float32)
    s = np.asarray(std, dtype=np.float32)
    return ((x[None, :] - m[:, None]) / s[:, None]).astype(np.float32)


def _geometry(h: int, w: int, size: int, resize: str):
    """(resized h, resized w, (top, left, crop h, crop w)) as the HF PIL-backend processors do."""
    if resize == "square":
        return size, size, (0, 0, size, size)
    if resize == "shortest_center_crop":
        # transformers get_resize_output_image_size(default_to_square=False)
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        oh, ow = (new_long, new_short) if w <= h else (new_short, new_long)
        top = (oh - size) // 2
        left = (ow - size) // 2
        return oh, ow, (top, left, size, size)
    raise ValueError(f"resize must be one of {_RESIZE_MODES}, got {resize!r}")


def _check_vec3(name, v):
    t = tuple(float(x) for x in np.asarray(v, dtype=np.float64).reshape(-1))
    if len(t) == 1:
        t = t * 3
    if len(t) != 3:
        raise ValueError(f"{name} must have 3 values, got {len(t)}")
    if name == "std" and any(x == 0 for x in t):
        raise ValueError("std must be non-zero")
    return t


def preprocess(
    rgb: np.ndarray,
    *,
    image_size: int,
    mean=CLIP_MEAN,
    std=CLIP_STD,
    resize: str = "square",
    resample: str = "bicubic",
    pass_order: str = "auto",
    allow_convert: bool = False,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """One RGB uint8 [H, W, 3] frame -> float32 [3, S, S], identical to the HF PIL-backend processors
    (``CLIPImageProcessor`` for ``shortest_center_crop``, ``SiglipImageProcessor`` for ``square``)."""
    if isinstance(rgb, Frame):
        rgb = rgb.rgb
    rgb = _as_rgb(rgb, allow_convert=allow_convert, what="image")
    S = int(image_size)
    if S <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    lut = _norm_lut(_check_vec3("mean", mean), _check_vec3("std", std))
    oh, ow, crop = _geometry(rgb.shape[0], rgb.shape[1], S, resize)
    u8 = _resize_hwc(rgb, oh, ow, crop, resample, pass_order)
    if out is None:
        out = np.empty((3, S, S), dtype=np.float32)
    for c in range(3):
        np.take(lut[c], u8[:, :, c], out=out[c])
    return out


def preprocess_batch(frames, **kw) -> np.ndarray:
    """Frames (iterable of [H, W, 3] uint8 or :class:`Frame`, or a (T, H, W, 3) array) ->
    float32 [F, 3, S, S]; keyword arguments as :func:`preprocess`."""
    S = int(kw["image_size"])
    if hasattr(frames, "__len__") and not isinstance(frames, Video):
        n = len(frames)
        out = np.empty((n, 3, S, S), dtype=np.float32)
        for i, fr in enumerate(frames):
            preprocess(fr, out=out[i], **kw)
        return out
    outs = [preprocess(fr, **kw) for fr in frames]
    if not outs:
        return np.zeros((0, 3, S, S), dtype=np.float32)
    return np.stack(outs)


@dataclass(frozen=True)
class VideoPreprocessor:
    """Preprocessing settings of a vision tower; call it on a frame or use :meth:`batch`."""

    image_size: int
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    resize: str = "square"
    resample: str = "bicubic"
    pass_order: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "mean", _check_vec3("mean", self.mean))
        object.__setattr__(self, "std", _check_vec3("std", self.std))
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.resize not in _RESIZE_MODES:
            raise ValueError(f"resize must be one of {_RESIZE_MODES}, got {self.resize!r}")
        if self.resample not in _FILTERS:
            raise ValueError(f"resample must be one of {sorted(_FILTERS)}, got {self.resample!r}")
        if self.pass_order not in _PASS_ORDERS:
            raise ValueError(f"pass_order must be one of {_PASS_ORDERS}, got {self.pass_order!r}")

    def _kw(self):
        return dict(image_size=self.image_size, mean=self.mean, std=self.std, resize=self.resize,
                    resample=self.resample, pass_order=self.pass_order)

    def __call__(self, rgb, *, allow_convert: bool = False) -> np.ndarray:
        return preprocess(rgb, allow_convert=allow_convert, **self._kw())

    def batch(self, frames, *, allow_convert: bool = False) -> np.ndarray:
        return preprocess_batch(frames, allow_convert=allow_convert, **self._kw())

    @classmethod
    def clip_336(cls) -> "VideoPreprocessor":
        """Video-XL: CLIP ViT-L/14-336 (shortest side 336, center crop, CLIP mean/std)."""
        return cls(336, CLIP_MEAN, CLIP_STD, "shortest_center_crop")

    @classmethod
    def siglip_384(cls) -> "VideoPreprocessor":
        """LLaVA-OneVision video: SigLIP 384x384 square resize, mean = std = 0.5."""
        return cls(384, SIGLIP_MEAN, SIGLIP_STD, "square")

    @classmethod
    def from_gguf_metadata(cls, get: Callable[[str], Any]) -> "VideoPreprocessor":
        """Build from GGUF keys; ``get(key)`` returns the value or None / raises KeyError when absent
        (e.g. ``x2l_edge.GGUFFile.open(path).get``).  See docs/gguf_layout.md."""

        def val(key, default=None):
            try:
                v = get(key)
            except KeyError:
                v = None
            return default if v is None else v

        size = val("clip.vision.image_size")
        if size is None:
            raise VideoError("GGUF metadata has no clip.vision.image_size (not a vision model?)")
        kind = str(val("x2l.vision.kind", "")).lower()
        default_resize = "shortest_center_crop" if kind == "clip" else "square"
        mean = val("clip.vision.image_mean", CLIP_MEAN if kind == "clip" else None)
        std = val("clip.vision.image_std", CLIP_STD if kind == "clip" else None)
        if mean is None or std is None:
            raise VideoError("GGUF metadata lacks clip.vision.image_mean / clip.vision.image_std")
        resize = str(val("x2l.image.resize", default_resize))
        resample = str(val("x2l.image.resample", "bicubic"))
        return cls(int(size), tuple(mean), tuple(std), resize, resample)

    @classmethod
    def from_gguf(cls, path) -> "VideoPreprocessor":
        from . import GGUFFile

        return cls.from_gguf_metadata(GGUFFile.open(os.fspath(path)).get)
