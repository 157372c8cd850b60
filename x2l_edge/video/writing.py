"""Writing RGB frames to a video file with OpenCV."""
from __future__ import annotations

import os

import numpy as np

from .frames import VideoError, _as_rgb, _cv2


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
