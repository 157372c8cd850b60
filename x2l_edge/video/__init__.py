"""Video input for x2l-edge: streaming frame sampling and HF-exact image preprocessing.

Pure Python + numpy; OpenCV (``opencv-python-headless``) is imported lazily, only when a video file
is opened or written, so ``import x2l_edge`` works without it.  Pillow is *not* needed at run time:
the bicubic resize is a numpy re-implementation of Pillow's ``Image.resize(..., Image.BICUBIC)``
(``libImaging/Resample.c``, 8-bit fixed-point path) that reproduces it bit for bit.

Modules: ``frames`` (Frame, VideoError, frame validation), ``reading`` (sampling plans, Video sources,
open_video), ``writing`` (write_video), ``resize`` (PIL-exact resize), ``preprocess`` (normalisation,
VideoPreprocessor).  Every public name is importable from ``x2l_edge.video``.

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

from .frames import Frame, VideoError
from .preprocess import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, VideoPreprocessor, preprocess, preprocess_batch
from .reading import Video, open_video, uniform_indices
from .resize import pil_resize
from .writing import write_video

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
