"""A numpy re-implementation of Pillow's Image.resize (bicubic / bilinear / lanczos, 8-bit fixed point) that
reproduces it bit for bit (see x2l_edge/video/__init__.py)."""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from .frames import _as_rgb


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


def _sinc(x: np.ndarray) -> np.ndarray:
    safe = np.where(x == 0.0, 1.0, x * math.pi)
    return np.where(x == 0.0, 1.0, np.sin(safe) / safe)


def _lanczos(x: np.ndarray) -> np.ndarray:
    """Pillow's truncated sinc (Lanczos-3): sinc(x) sinc(x/3) on [-3, 3)."""
    return np.where((x >= -3.0) & (x < 3.0), _sinc(x) * _sinc(x / 3.0), 0.0)


_FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0), "lanczos": (_lanczos, 3.0)}
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
