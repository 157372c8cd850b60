"""x2l_edge.video: frame sampling from files / arrays / iterators, and HF-exact preprocessing.

Videos are written here with OpenCV (mp4v, MJPG, FFV1) with the frame index drawn as 10 black/white
blocks, so every decoded frame says which source frame it is, even through lossy codecs.
"""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import time
import tracemalloc
import warnings

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
from x2l_edge import video as V  # noqa: E402
from x2l_edge.video import (  # noqa: E402
    CLIP_MEAN,
    CLIP_STD,
    Frame,
    VideoError,
    VideoPreprocessor,
    open_video,
    pil_resize,
    preprocess,
    preprocess_batch,
    uniform_indices,
    write_video,
)

W, H, FPS = 160, 64, 30.0
NBITS = 10


def make_frame(i: int, w: int = W, h: int = H) -> np.ndarray:
    """RGB frame whose top half encodes i in 10 blocks; bottom half a moving gradient."""
    img = np.zeros((h, w, 3), np.uint8)
    bw = w // NBITS
    for b in range(NBITS):
        if (i >> b) & 1:
            img[: h // 2, b * bw: (b + 1) * bw] = 255
    xx = np.arange(w)[None, :]
    yy = np.arange(h // 2)[:, None]
    img[h // 2:, :, 0] = (xx * 255 // (w - 1) + 0 * yy).astype(np.uint8)
    img[h // 2:, :, 1] = ((yy * 8 + i * 3) % 256).astype(np.uint8)
    img[h // 2:, :, 2] = 128
    return img


def read_index(rgb: np.ndarray) -> int:
    h, w = rgb.shape[:2]
    bw = w // NBITS
    v = 0
    for b in range(NBITS):
        blk = rgb[3: h // 2 - 3, b * bw + 3: (b + 1) * bw - 3]
        if blk.mean() > 127:
            v |= 1 << b
    return v


CODECS = [("mp4v", "mp4"), ("MJPG", "avi"), ("FFV1", "mkv")]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """{codec: path} of 90-frame (3 s at 30 fps) videos, plus 'long': 600 frames mp4v."""
    d = tmp_path_factory.mktemp("videos")
    out = {}
    for codec, ext in CODECS:
        p = d / f"v_{codec}.{ext}"
        assert write_video(p, (make_frame(i) for i in range(90)), FPS, codec) == 90
        out[codec] = str(p)
    p = d / "long_mp4v.mp4"
    write_video(p, (make_frame(i) for i in range(600)), FPS, "mp4v")
    out["long"] = str(p)
    return out


# ============================================================================ sampling plans


def test_uniform_indices_match_videoxl():
    for n, f in [(90, 8), (9000, 32), (33, 32), (2, 1), (100, 100)]:
        exp = np.linspace(0, n - 1, f, dtype=int) if f < n else np.arange(n)
        assert np.array_equal(uniform_indices(n, f), exp)
    assert np.array_equal(uniform_indices(5, 8), np.arange(5))  # no duplicates when F >= N
    assert uniform_indices(0, 4).size == 0


# ============================================================================ files


@pytest.mark.parametrize("codec", [c for c, _ in CODECS])
def test_file_uniform_sampling(videos, codec):
    v = open_video(videos[codec], max_frames=8)
    assert v.n_frames_total == 90
    assert v.fps == pytest.approx(FPS)
    assert v.duration_s == pytest.approx(3.0)
    assert (v.width, v.height) == (W, H)
    exp = np.linspace(0, 89, 8).astype(int)
    assert np.array_equal(v.sample_indices, exp)
    frames = list(v)
    assert [f.index for f in frames] == exp.tolist()
    assert [read_index(f.rgb) for f in frames] == exp.tolist()
    for f in frames:
        assert f.rgb.dtype == np.uint8 and f.rgb.shape == (H, W, 3)
        assert f.timestamp_s == pytest.approx(f.index / FPS)
    # re-iterable
    assert [f.index for f in v] == exp.tolist()


@pytest.mark.parametrize("codec", [c for c, _ in CODECS])
def test_file_every_frame_and_rgb_order(videos, codec):
    frames = list(open_video(videos[codec]))
    assert [f.index for f in frames] == list(range(90))
    assert [read_index(f.rgb) for f in frames] == list(range(90))
    ref = make_frame(7)
    got = frames[7].rgb
    # RGB (not BGR): the bottom half's red ramp and constant blue survive
    if codec == "FFV1":
        assert np.array_equal(got, ref)  # lossless round trip
    else:
        err = np.abs(got.astype(int) - ref.astype(int))[H // 2 + 4: -4, 8:-8]
        assert err.mean() < 12


def test_file_fps_sampling(videos):
    p = videos["mp4v"]
    v = open_video(p, fps=2)
    assert v.sample_indices.tolist() == list(range(0, 90, 15))
    fr = list(v)
    assert [read_index(f.rgb) for f in fr] == list(range(0, 90, 15))
    assert [f.timestamp_s for f in fr] == pytest.approx([0, 0.5, 1, 1.5, 2, 2.5])
    # non-divisor rate: first frame at or after k/7 s
    exp = sorted({math.ceil(k * FPS / 7 - 1e-9) for k in range(int(3 * 7) + 1)} - {90})
    exp = [i for i in exp if i < 90]
    v = open_video(p, fps=7)
    assert v.sample_indices.tolist() == exp
    assert [read_index(f.rgb) for f in v] == exp
    # rate above the source rate: every frame once
    assert open_video(p, fps=100).sample_indices.tolist() == list(range(90))


def test_file_start_end_and_combined(videos):
    p = videos["MJPG"]
    v = open_video(p, start=1.0, end=2.0, max_frames=4)
    exp = (30 + np.linspace(0, 29, 4).astype(int)).tolist()
    assert v.sample_indices.tolist() == exp
    assert [read_index(f.rgb) for f in v] == exp
    v = open_video(p, fps=10, max_frames=5)  # fps first (30 frames), then uniform to 5
    sel = np.arange(0, 90, 3)
    assert v.sample_indices.tolist() == sel[np.linspace(0, 29, 5).astype(int)].tolist()
    v = open_video(p, start=2.5)
    assert v.sample_indices.tolist() == list(range(75, 90))
    with pytest.raises(VideoError):
        open_video(p, start=10.0)  # nothing in range
    with pytest.raises(ValueError):
        open_video(p, start=2.0, end=1.0)
    with pytest.raises(ValueError):
        open_video(p, max_frames=0)
    with pytest.raises(ValueError):
        open_video(p, fps=-1)


def test_file_seek_path_is_exact(videos):
    """Large gaps take the CAP_PROP_POS_FRAMES path; frames must still be the exact ones."""
    v = open_video(videos["long"], max_frames=12)
    exp = np.linspace(0, 599, 12).astype(int).tolist()
    t = time.perf_counter()
    got = [read_index(f.rgb) for f in v]
    assert got == exp
    assert v._t_seek is not None  # the seek path was used
    assert time.perf_counter() - t < 20


def test_file_streaming_memory(videos):
    """Decoding all 600 frames keeps only O(1) frames alive."""
    frame_bytes = W * H * 3
    v = open_video(videos["long"])
    tracemalloc.start()
    try:
        n = 0
        for f in v:
            n += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 600
    assert peak < 20 * frame_bytes, peak


def test_progress_hook(videos):
    calls = []
    v = open_video(videos["MJPG"], max_frames=5)
    frames = list(v.frames(progress=lambda d, t: calls.append((d, t))))
    assert len(frames) == 5
    assert calls == [(i, 5) for i in range(6)]
    calls.clear()
    list(open_video(videos["MJPG"], max_frames=3, progress=lambda d, t: calls.append((d, t))))
    assert calls[-1] == (3, 3)


# ============================================================================ arrays and iterators


def test_numpy_source():
    arr = np.stack([make_frame(i) for i in range(50)])
    v = open_video(arr, max_frames=6)
    exp = np.linspace(0, 49, 6).astype(int).tolist()
    fr = list(v)
    assert [f.index for f in fr] == exp
    assert all(np.shares_memory(f.rgb, arr) for f in fr)  # views, no copies
    assert all(f.timestamp_s is None for f in fr)
    assert v.fps is None and v.n_frames_total == 50
    v = open_video(arr, fps=5, source_fps=25)
    assert v.sample_indices.tolist() == list(range(0, 50, 5))
    assert [f.timestamp_s for f in v][:3] == pytest.approx([0, 0.2, 0.4])
    with pytest.raises(VideoError, match="source_fps"):
        open_video(arr, fps=5)
    # bgr input
    f0 = next(iter(open_video(arr[:, :, :, ::-1], bgr=True)))
    assert np.array_equal(f0.rgb, arr[0])


def test_iterator_streaming_pulls_one_at_a_time():
    pulled = []

    def camera():
        i = 0
        while True:  # infinite live source
            pulled.append(i)
            yield make_frame(i % 1000)
            i += 1

    it = iter(open_video(camera()))
    for k in range(1, 6):
        f = next(it)
        assert f.index == k - 1 and read_index(f.rgb) == k - 1
        assert len(pulled) == k  # nothing read ahead
    it.close()

    pulled.clear()
    gen = ((i / 10.0, make_frame(i)) for i in range(10**9) if not pulled.append(i))
    v = open_video(gen, fps=2, end=3.0)  # (timestamp, frame) pairs; stops at 3 s
    fr = list(v)
    assert [f.index for f in fr] == [0, 5, 10, 15, 20, 25]
    assert [f.timestamp_s for f in fr] == pytest.approx([0, 0.5, 1, 1.5, 2, 2.5])
    assert len(pulled) == 31  # pulled through the first frame at t >= end, no further
    with pytest.raises(VideoError, match="consumed"):
        list(v)


def test_iterator_timestamps_and_fps_from_first_frame():
    # camera clock does not start at 0; 20 fps source sampled at 4 fps
    items = [(1000.0 + i / 20, make_frame(i)) for i in range(40)]
    fr = list(open_video(iter(items), fps=4))
    assert [f.index for f in fr] == list(range(0, 40, 5))
    fr = list(open_video(iter(items), start=1001.0, max_frames=3))
    idx = [f.index for f in fr]  # 20 frames from 1001 s; streams of unknown length: approx. uniform
    assert idx[0] == 20 and idx[-1] == 39 and abs(idx[1] - 29) <= 4
    with pytest.raises(VideoError, match="timestamps"):
        list(open_video(iter([make_frame(0)]), fps=1))


def test_sized_sequence_exact_and_unknown_length_decimation():
    frames = [make_frame(i) for i in range(200)]
    v = open_video(frames, max_frames=7)  # list: exact plan
    assert v.sample_indices.tolist() == np.linspace(0, 199, 7).astype(int).tolist()
    assert [read_index(f.rgb) for f in v] == v.sample_indices.tolist()

    n, F = 1000, 10
    gen = (make_frame(i % 1000) for i in range(n))
    fr = list(open_video(gen, max_frames=F))
    idx = [f.index for f in fr]
    assert len(idx) == F and idx == sorted(set(idx)) and idx[0] == 0 and idx[-1] == n - 1
    ideal = np.linspace(0, n - 1, F)
    assert np.abs(np.array(idx) - ideal).max() <= n / (2 * F)  # approximately uniform
    assert [read_index(f.rgb) for f in fr] == idx


# ============================================================================ errors


def test_error_cases_are_quick(tmp_path, videos):
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError):
        open_video(tmp_path / "missing.mp4")
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match="cannot open"):
        open_video(bad)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError):
        open_video(empty)
    with pytest.raises(IsADirectoryError):
        open_video(tmp_path)
    # a container with zero frames
    zero = tmp_path / "zero.avi"
    wr = cv2.VideoWriter(str(zero), cv2.VideoWriter_fourcc(*"MJPG"), 10, (W, H))
    wr.release()
    with pytest.raises(VideoError):
        v = open_video(zero)
        list(v)
    # numpy: zero frames, dtype, ndim, channels
    with pytest.raises(VideoError, match="zero frames"):
        open_video(np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(VideoError, match="uint8"):
        open_video(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(VideoError, match="single image"):
        open_video(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(VideoError, match="shape"):
        open_video(np.zeros((2, 2, 8, 8, 3), np.uint8))
    with pytest.raises(VideoError, match="grayscale"):
        open_video(np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(VideoError, match="grayscale"):
        open_video(np.zeros((2, 8, 8, 1), np.uint8))
    with pytest.raises(VideoError, match="alpha"):
        open_video(np.zeros((2, 8, 8, 4), np.uint8))
    with pytest.raises(TypeError):
        open_video(42)
    # iterators: bad items are reported when reached
    with pytest.raises(VideoError, match="grayscale"):
        list(open_video(iter([make_frame(0), np.zeros((8, 8), np.uint8)])))
    with pytest.raises(VideoError, match="alpha"):
        list(open_video([np.zeros((8, 8, 4), np.uint8)]))
    with pytest.raises(VideoError, match="uint8"):
        list(open_video([np.zeros((8, 8, 3), np.float64)]))
    with pytest.raises(VideoError, match="expected"):
        list(open_video(["not a frame"]))
    with pytest.raises(VideoError, match="no frames"):
        list(open_video(iter([])))
    assert time.perf_counter() - t0 < 10


def test_allow_convert():
    gray = np.arange(2 * 4 * 6, dtype=np.uint8).reshape(2, 4, 6)
    f = next(iter(open_video(gray, allow_convert=True)))
    assert f.rgb.shape == (4, 6, 3) and np.array_equal(f.rgb[:, :, 1], gray[0])
    rgba = np.random.default_rng(0).integers(0, 256, (3, 4, 6, 4), dtype=np.uint8)
    f = next(iter(open_video(rgba, allow_convert=True)))
    assert np.array_equal(f.rgb, rgba[0, :, :, :3])
    f = next(iter(open_video([gray[0][:, :, None]], allow_convert=True)))
    assert f.rgb.shape == (4, 6, 3)


def test_truncated_file_never_hangs(tmp_path, videos):
    """An AVI cut short still claims 90 frames in its header."""
    data = open(videos["MJPG"], "rb").read()
    p = tmp_path / "trunc.avi"
    p.write_bytes(data[: len(data) // 3])
    t0 = time.perf_counter()
    v = open_video(p, max_frames=5)  # uniform: the count is verified and corrected (2nd pass)
    n = v.n_frames_total
    assert 5 <= n < 90
    exp = np.linspace(0, n - 1, 5).astype(int).tolist()
    assert [read_index(f.rgb) for f in v] == exp
    v = open_video(p, fps=10)  # plan from the header; stops at the real end with a warning
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fr = list(v)
    assert v.truncated and any(issubclass(x.category, RuntimeWarning) for x in w)
    assert [read_index(f.rgb) for f in fr] == list(range(0, n, 3))
    assert time.perf_counter() - t0 < 10


def test_write_video_errors(tmp_path):
    fr = [make_frame(0)] * 2
    with pytest.raises(VideoError, match="even"):
        write_video(tmp_path / "odd.avi", [np.zeros((9, 16, 3), np.uint8)], 10, "MJPG")
    with pytest.raises(VideoError, match="codec"):
        write_video(tmp_path / "x.mp4", fr, 10, "H264")
    with pytest.raises(VideoError, match="cannot open"):
        write_video(tmp_path / "no_such_dir" / "x.avi", fr, 10, "MJPG")
    with pytest.raises(VideoError, match="no frames"):
        write_video(tmp_path / "none.avi", [], 10, "MJPG")
    with pytest.raises(VideoError, match="size"):
        write_video(tmp_path / "mixed.avi", [make_frame(0), make_frame(0, 80, 32)], 10, "MJPG")
    with pytest.raises(VideoError, match="grayscale"):
        write_video(tmp_path / "g.avi", [np.zeros((8, 8), np.uint8)], 10, "MJPG")


def test_import_does_not_need_cv2(tmp_path):
    code = "import sys, x2l_edge.video as v; assert 'cv2' not in sys.modules; print('ok')"
    # cwd: a neutral folder, so `python -c` imports the installed package, not the source tree
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy(),
                       cwd=tmp_path)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


# ============================================================================ preprocessing


def natural_image(h, w, seed):
    """Smooth shading + hard-edged shapes + texture + noise (like a video frame)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for c in range(3):
        fx, fy, ph = rng.uniform(0.5, 4, 3)
        img[:, :, c] = 128 + 90 * np.sin(2 * np.pi * (fx * xx / w + fy * yy / h) + ph)
    for _ in range(6):  # discs and rectangles with sharp edges
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, max(4.0, max(h, w) / 4))
        col = rng.uniform(0, 255, 3)
        if rng.random() < 0.5:
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = col
        else:
            img[(abs(yy - cy) < r / 2) & (abs(xx - cx) < r)] = col
    img[::7, :] *= 0.9  # fine texture
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _pillow_pass_order() -> str:
    """Recent Pillow runs the vertical pass first when the height shrinks much more than the width;
    older releases always go horizontal first.  Probe the installed one."""
    from PIL import Image

    img = np.random.default_rng(3).integers(0, 256, (120, 40, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(img).resize((90, 30), Image.BICUBIC))
    return "auto" if np.array_equal(pil_resize(img, (90, 30), pass_order="auto"), ref) else "horizontal_first"


def pil_ref(img, w, h, filt=None):
    from PIL import Image

    filt = Image.BICUBIC if filt is None else filt
    return np.asarray(Image.fromarray(img).resize((w, h), filt))


SIZES = [
    ((360, 640), (384, 384)),    # SigLIP square from landscape (down x, up y)
    ((360, 640), (336, 597)),    # CLIP shortest side
    ((1080, 1920), (384, 384)),  # big downsample
    ((1920, 1080), (384, 384)),  # portrait: recent Pillow runs the vertical pass first
    ((48, 64), (384, 384)),      # upsample
    ((37, 53), (29, 101)),       # odd sizes, mixed
    ((200, 30), (13, 77)),
    ((5, 300), (120, 7)),
    ((1, 1), (3, 2)),
]


@pytest.mark.parametrize("src,dst", SIZES)
def test_pil_resize_is_exact(src, dst):
    pytest.importorskip("PIL")
    from PIL import Image

    for img in [natural_image(*src, seed=1),
                np.random.default_rng(2).integers(0, 256, (*src, 3), dtype=np.uint8)]:
        ref = pil_ref(img, dst[1], dst[0])
        got = pil_resize(img, (dst[1], dst[0]), pass_order=_pillow_pass_order())
        assert got.dtype == np.uint8 and got.shape == ref.shape
        assert np.array_equal(got, ref), np.abs(got.astype(int) - ref).max()
        ref_bl = pil_ref(img, dst[1], dst[0], Image.BILINEAR)
        assert np.array_equal(pil_resize(img, (dst[1], dst[0]), "bilinear", _pillow_pass_order()), ref_bl)


def test_pil_resize_random_shapes():
    pytest.importorskip("PIL")
    rng = np.random.default_rng(7)
    order = _pillow_pass_order()
    for _ in range(150):
        h, w = (int(x) for x in rng.integers(1, 150, 2))
        oh, ow = (int(x) for x in rng.integers(1, 300, 2))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        assert np.array_equal(pil_resize(img, (ow, oh), pass_order=order), pil_ref(img, ow, oh)), (h, w, oh, ow)


def test_horizontal_first_order_matches_old_pillow():
    """pass_order='horizontal_first' == PIL horizontal-only then vertical-only (old Pillow)."""
    pytest.importorskip("PIL")
    img = np.random.default_rng(3).integers(0, 256, (120, 40, 3), dtype=np.uint8)
    ref = pil_ref(pil_ref(img, 90, 120), 90, 30)  # width up, height down: orders differ
    assert np.array_equal(pil_resize(img, (90, 30), pass_order="horizontal_first"), ref)
    ref_v = pil_ref(pil_ref(img, 40, 30), 90, 30)  # vertical first (recent Pillow)
    assert np.array_equal(pil_resize(img, (90, 30)), ref_v)
    assert not np.array_equal(ref, ref_v)


def hf_manual(img, size, mean, std, crop):
    """transformers' PIL-backend math written out: resize, center crop, rescale, normalize."""
    h, w = img.shape[:2]
    if crop:
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        oh, ow = (new_long, size) if w <= h else (size, new_long)
        r = pil_ref(img, ow, oh)
        top, left = (oh - size) // 2, (ow - size) // 2
        r = r[top: top + size, left: left + size]
    else:
        r = pil_ref(img, size, size)
    x = (r.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(mean, np.float32)) / np.array(std, np.float32)
    return x.transpose(2, 0, 1)


@pytest.mark.parametrize("shape", [(360, 640), (480, 640), (337, 600), (1920, 1080), (241, 431), (100, 50), (336, 336)])
def test_preprocess_matches_hf_math(shape):
    pytest.importorskip("PIL")
    img = natural_image(*shape, seed=shape[0])
    order = _pillow_pass_order()
    clip = preprocess(img, image_size=336, mean=CLIP_MEAN, std=CLIP_STD, resize="shortest_center_crop",
                      pass_order=order)
    assert clip.dtype == np.float32 and clip.shape == (3, 336, 336)
    assert np.array_equal(clip, hf_manual(img, 336, CLIP_MEAN, CLIP_STD, True))
    sig = preprocess(img, image_size=384, mean=(0.5,) * 3, std=(0.5,) * 3, resize="square", pass_order=order)
    assert np.array_equal(sig, hf_manual(img, 384, (0.5,) * 3, (0.5,) * 3, False))


def test_preprocess_matches_transformers_processors():
    pytest.importorskip("PIL")
    tr = pytest.importorskip("transformers")
    clip_cls = getattr(tr, "CLIPImageProcessorPil", None) or tr.CLIPImageProcessor
    sig_cls = getattr(tr, "SiglipImageProcessorPil", None) or tr.SiglipImageProcessor
    try:
        clip = clip_cls(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True,
                        resample=3, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
        sig = sig_cls(size={"height": 384, "width": 384}, resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    except Exception as e:  # pragma: no cover - depends on the transformers version
        pytest.skip(f"transformers image processors unavailable: {e}")
    frames = [natural_image(360, 640, 1), natural_image(1080, 1920, 2), natural_image(300, 200, 3)]
    ref_c = np.stack([clip(f, return_tensors="np")["pixel_values"][0] for f in frames])
    ref_s = np.stack([sig(f, return_tensors="np")["pixel_values"][0] for f in frames])
    order = _pillow_pass_order()
    got_c = dataclasses.replace(VideoPreprocessor.clip_336(), pass_order=order).batch(frames)
    got_s = dataclasses.replace(VideoPreprocessor.siglip_384(), pass_order=order).batch(frames)
    assert np.array_equal(got_c, ref_c), np.abs(got_c - ref_c).max()
    assert np.array_equal(got_s, ref_s), np.abs(got_s - ref_s).max()


def test_preprocess_batch_and_errors(videos):
    pp = VideoPreprocessor.siglip_384()
    frames = list(open_video(videos["FFV1"], max_frames=3))
    b = preprocess_batch(frames, image_size=384, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert b.shape == (3, 3, 384, 384) and b.dtype == np.float32
    assert np.array_equal(b, pp.batch(frames))
    assert np.array_equal(b, pp.batch(f.rgb for f in frames))  # generator input
    assert np.array_equal(b[1], pp(frames[1].rgb))
    assert b.min() >= -1 and b.max() <= 1
    gray = np.zeros((20, 30), np.uint8)
    with pytest.raises(VideoError, match="grayscale"):
        pp(gray)
    with pytest.raises(VideoError, match="alpha"):
        pp(np.zeros((20, 30, 4), np.uint8))
    with pytest.raises(VideoError, match="uint8"):
        pp(np.zeros((20, 30, 3), np.float32))
    assert np.array_equal(pp(gray, allow_convert=True), pp(np.zeros((20, 30, 3), np.uint8)))
    with pytest.raises(ValueError):
        VideoPreprocessor(336, resize="crop")
    with pytest.raises(ValueError):
        VideoPreprocessor(336, resample="box")


def test_preprocessor_from_gguf_metadata(tmp_path):
    meta = {
        "clip.vision.image_size": 336,
        "clip.vision.image_mean": [0.48145467042922974, 0.45782750844955444, 0.40821072459220886],  # f32 round trip
        "clip.vision.image_std": [0.2686295509338379, 0.2613025903701782, 0.27577710151672363],
        "x2l.image.resize": "shortest_center_crop",
        "x2l.image.resample": "bicubic",
        "x2l.vision.kind": "clip",
    }
    pp = VideoPreprocessor.from_gguf_metadata(meta.get)
    assert (pp.image_size, pp.resize, pp.resample) == (336, "shortest_center_crop", "bicubic")
    img = natural_image(360, 640, 5)
    assert np.array_equal(pp(img), VideoPreprocessor.clip_336()(img))  # float32 mean/std: same result

    sig_meta = {"clip.vision.image_size": 384, "clip.vision.image_mean": [0.5] * 3,
                "clip.vision.image_std": [0.5] * 3, "x2l.vision.kind": "siglip"}
    sig = VideoPreprocessor.from_gguf_metadata(sig_meta.__getitem__)  # raises KeyError when absent
    assert sig == VideoPreprocessor.siglip_384()
    with pytest.raises(VideoError):
        VideoPreprocessor.from_gguf_metadata({}.get)

    gguf = pytest.importorskip("gguf")
    import x2l_edge

    path = str(tmp_path / "meta.gguf")
    w = gguf.GGUFWriter(path, "clip")
    w.add_uint32("clip.vision.image_size", 336)
    w.add_array("clip.vision.image_mean", list(CLIP_MEAN))
    w.add_array("clip.vision.image_std", list(CLIP_STD))
    w.add_string("x2l.image.resize", "shortest_center_crop")
    w.add_string("x2l.image.resample", "bicubic")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    pp2 = VideoPreprocessor.from_gguf_metadata(x2l_edge.GGUFFile.open(path).get)
    assert pp2 == pp
    assert VideoPreprocessor.from_gguf(path) == pp


def test_frame_namedtuple():
    f = Frame(3, 0.1, np.zeros((2, 2, 3), np.uint8))
    i, ts, rgb = f
    assert (i, ts) == (3, 0.1) and rgb.shape == (2, 2, 3)
    # Frame objects are accepted as iterable items (keep their timestamps)
    fr = list(open_video([Frame(0, 5.0, make_frame(0)), Frame(1, 5.5, make_frame(1))], fps=1))
    assert [x.timestamp_s for x in fr] == [5.0]
    assert isinstance(V.VideoError("x"), ValueError)
