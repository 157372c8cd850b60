"""Frames and their validation, shared by the reader, the writer and the preprocessor."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import numpy as np

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
