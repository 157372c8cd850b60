"""Preprocessing: RGB frames -> the vision tower's normalised float32 input, exactly as the Hugging Face
(PIL backend) image processors compute it."""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Optional

import numpy as np

from .frames import Frame, VideoError, _as_rgb
from .reading import Video
from .resize import _FILTERS, _PASS_ORDERS, _resize_hwc

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


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
        from .. import GGUFFile

        return cls.from_gguf_metadata(GGUFFile.open(os.fspath(path)).get)
