"""Qwen2-VL / Qwen2.5-VL: frame sizes, preprocessing, the prompt layout and the full-KV answer path
(docs/families.md §2-§4). The tower is _core.QwenVision (cpp/vision/qwen.h); the LLM places each image or
video run at its M-RoPE positions (LlmSession::eval_media)."""
from __future__ import annotations

import math

import numpy as np

from .progress import scope as progress_scope

FACTOR = 28                          # patch 14 x merge 2: frame sides are multiples of this
IMAGE_MIN_PIXELS = 56 * 56           # Qwen2VLImageProcessor defaults
IMAGE_MAX_PIXELS = 28 * 28 * 1280
VIDEO_MIN_PIXELS = 128 * 28 * 28     # Qwen2VLVideoProcessor defaults (per frame)
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_FPS = 2.0                      # the released configs' sampling rate
TOKENS_PER_SECOND = 2.0              # Qwen2.5-VL's temporal position scale (not in llama.cpp's mmproj)
MEDIA_PAD = {"video": "<|video_pad|>", "image": "<|image_pad|>"}
FAMILY_NAME = "Qwen2-VL / Qwen2.5-VL"
LIVE_REFUSAL = ("questions while a source records are answered on snapshots of its prefill, which M-RoPE indexes "
                "do not support")


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = IMAGE_MIN_PIXELS,
                 max_pixels: int = IMAGE_MAX_PIXELS) -> tuple[int, int]:
    """Qwen's resize target (transformers' smart_resize): each side rounded to a multiple of `factor`
    (halves to even), then scaled down (floor) or up (ceil) to bring the area within [min_pixels,
    max_pixels]. Aspect ratios above 200 are refused."""
    if min(height, width) <= 0 or max(height, width) / min(height, width) > 200:
        raise ValueError(f"unsupported image size {height}x{width} (empty, or aspect ratio above 200)")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def preprocess(frames, height: int, width: int, mean, std) -> np.ndarray:
    """RGB uint8 frames [H0, W0, 3] -> float32 [F, 3, height, width]: bicubic resize (PIL-exact), rescale
    1/255, (x - mean) / std, as the HF Qwen2-VL processors."""
    from .video.preprocess import _check_vec3, _norm_lut
    from .video.resize import pil_resize

    lut = _norm_lut(_check_vec3("mean", mean), _check_vec3("std", std))
    out = np.empty((len(frames), 3, height, width), dtype=np.float32)
    for i, rgb in enumerate(frames):
        u8 = pil_resize(rgb, (width, height))
        for c in range(3):
            np.take(lut[c], u8[:, :, c], out=out[i, c])
    return out


def prompt_parts(session, question: str, kind: str = "video", system: str | None = None) -> tuple[str, str]:
    """(text before the media pads, text after them) from the model's chat template rendered with
    `<|vision_start|><|video_pad|><|vision_end|>` + question as the user message (the Qwen layout)."""
    pad = MEDIA_PAD[kind]
    text = session.chat_prompt([{"role": "user", "content": "<|vision_start|>" + pad + "<|vision_end|>" + question}],
                               system=system)
    if text.count(pad) != 1:
        raise ValueError(f"the chat template does not keep the {pad} placeholder once")
    before, after = text.split(pad)
    return before, after


def default_sampling(video, max_frames, fps):
    """(max_frames, fps) as this family samples `video`: a file with neither is read at VIDEO_FPS (it has
    timestamps); frames given as an array or iterable are taken as they are."""
    import os

    if max_frames is None and fps is None and isinstance(video, (str, os.PathLike)):
        fps = VIDEO_FPS
    return max_frames, fps


def open_sampled(video, max_frames=None, fps=None):
    """The Video this family reads (default_sampling's rule through open_video)."""
    from .video import open_video

    max_frames, fps = default_sampling(video, max_frames, fps)
    return open_video(video, max_frames=max_frames, fps=fps)


def whole_chunk_frames(chunk_frames: int) -> int:
    """Frames per X²L chunk as this family prefills them: whole temporal pairs (rounded up)."""
    return chunk_frames + chunk_frames % 2


# An index of this family is saved like any other: the index format keeps its M-RoPE text position
# (cpp/x2l/kv_store.h), and its entries keep the rotation of their 3-D positions.
SAVES_INDEX = True


def context_kwargs(session, system: str | None = None) -> dict:
    """VideoContext's question_prefix / question_suffix for an index of this family: the chat template's
    text after the video pads, around the question (system: the prompt's system message)."""
    _, after = prompt_parts(session, _QUESTION_MARK, "video", system)
    q_prefix, q_suffix = after.split(_QUESTION_MARK)
    return {"question_prefix": q_prefix, "question_suffix": q_suffix}


_QUESTION_MARK = "\x00x2l-question\x00"


def sampled_fps(timestamps) -> float:
    """The rate frames were sampled at, from their timestamps (VIDEO_FPS when unknown or a single frame):
    Qwen2.5-VL's temporal positions count seconds."""
    ts = [t for t in timestamps if t is not None]
    if len(ts) < 2 or len(ts) != len(timestamps) or ts[-1] <= ts[0]:
        return VIDEO_FPS
    return (len(ts) - 1) / (ts[-1] - ts[0])


class QwenMedia:
    """Encodes images and videos with the session's Qwen tower and appends them to its context."""

    def __init__(self, session):
        self.s = session
        self.enc = session.vision
        cfg = self.enc.config
        self.kind = cfg["kind"]
        self.patch, self.merge = cfg["patch_size"], cfg["merge"]
        self.mean, self.std = cfg["image_mean"], cfg["image_std"]
        tps = session._vision_meta("x2l.vision.tokens_per_second", TOKENS_PER_SECOND)
        self.tokens_per_second = float(tps) if self.kind == "qwen25vl" else 0.0

    def encode(self, frames, *, video: bool, min_pixels=None, max_pixels=None):
        """RGB frames -> (embeddings [n, n_embd], patch grid (t, h, w))."""
        if not frames:
            raise ValueError("no frames to encode")
        h0, w0 = frames[0].shape[:2]
        lo = min_pixels or (VIDEO_MIN_PIXELS if video else IMAGE_MIN_PIXELS)
        hi = max_pixels or (VIDEO_MAX_PIXELS if video else IMAGE_MAX_PIXELS)
        h, w = smart_resize(h0, w0, self.patch * self.merge, lo, hi)
        px = preprocess(frames, h, w, self.mean, self.std)
        embd = self.enc.encode(px, session=self.s._s)  # the session's cancel stops it between blocks
        grid = ((len(frames) + 1) // 2, h // self.patch, w // self.patch)
        return embd, grid

    def append(self, embd, grid, *, video: bool, fps: float = VIDEO_FPS, text_after: str = "max"):
        """Append one media run at its M-RoPE positions (Qwen2.5 videos: time scaled by tokens_per_second
        x 2 / fps seconds per temporal patch)."""
        self.s._s.eval_media(np.ascontiguousarray(embd, dtype=np.float32), *grid, video=video, merge=self.merge,
                             seconds_per_grid=2.0 / fps, tokens_per_second=self.tokens_per_second,
                             text_after=text_after)


def ask_full(session, video, question: str, *, system=None, max_frames=None, fps=None, max_tokens=64,
             progress=None, stream=False, min_pixels=None, max_pixels=None, text_after="max", chunk_frames=None,
             **sampling):
    """Answer about a video with every visual token in the KV cache (frames sampled at `fps`, default 2,
    or `max_frames` uniformly). chunk_frames is not used: the video is encoded in one call."""
    from .generation import generate_ids, stream_text
    from .video import open_video

    max_frames, fps = default_sampling(video, max_frames, fps)
    vid = open_video(video, max_frames=max_frames, fps=fps)
    with progress_scope(progress) as prog:  # None, False, True or a callable, as Session.prefill takes
        read = list(vid.frames(progress=lambda done, total: prog.update("decode", done, total)))
    if not read:
        from .video import VideoError

        raise VideoError(f"no frames could be read from {video!r}")
    frames = [f.rgb for f in read]
    fps = fps or sampled_fps([f.timestamp_s for f in read])
    media = QwenMedia(session)
    embd, grid = media.encode(frames, video=True, min_pixels=min_pixels, max_pixels=max_pixels)
    before, after = prompt_parts(session, question, "video", system)
    session.reset()
    session._s.eval(session.tokenize(before))
    media.append(embd, grid, video=True, fps=fps, text_after=text_after)
    ids = list(session._s.history) + session.tokenize(after)
    gen = generate_ids(session._s, ids, stop_ids=session._stop_ids, max_tokens=max_tokens, **sampling)
    it = stream_text(session._tok, gen, [])
    return it if stream else "".join(it)


def prefill_video(session, video, *, system=None, chunk_frames=None, max_frames=None, fps=None, progress=None,
                  min_pixels=None, max_pixels=None, text_after="max", **x2l_options):
    """X²L bi-level prefill of a video on a Qwen2-VL / Qwen2.5-VL model: the sink is the prompt up to
    `<|vision_start|>`; each chunk is chunk_frames frames (rounded up to whole temporal pairs) whose tokens
    keep their M-RoPE (t, h, w) positions, so any mix of H and L chunks sits where the full prompt puts
    it; the question ('<|vision_end|>' + question + the template's end) continues at the video's
    text-after position. Returns a VideoContext."""
    from . import _core
    from .options import X2LOptions
    from .video import VideoError, open_video
    from .x2l import VideoContext

    opts = X2LOptions.for_model(session, video=True, **x2l_options)
    if opts.compressor != "snapkv" or opts.high_compressor not in ("", "snapkv"):
        raise ValueError("Qwen2-VL models use the snapkv compressor (beacon is Video-XL's)")
    if opts.dense_positions:
        raise ValueError("Qwen2-VL models keep their M-RoPE (t, h, w) positions: dense_positions is not supported")
    chunk_frames = int(chunk_frames or opts.chunk_frames)
    if chunk_frames < 1:
        raise ValueError("chunk_frames must be >= 1")
    chunk_frames = whole_chunk_frames(chunk_frames)
    max_frames, fps = default_sampling(video, max_frames, fps)
    before, _ = prompt_parts(session, _QUESTION_MARK, "video", system)
    sink = session.tokenize(before)
    media = QwenMedia(session)
    p = _core.X2LPrefill(session._s, **opts.prefill_kwargs(), repeat_prompt=[])  # snapkv: no kvzip re-read
    p.add_sink(sink)
    vid = open_video(video, max_frames=max_frames, fps=fps)

    state = {"pairs": 0, "grid": None, "times": []}

    def encode(buf):
        embd, grid = media.encode(buf, video=True, min_pixels=min_pixels, max_pixels=max_pixels)
        if state["grid"] is not None and grid[1:] != state["grid"][1:]:
            raise VideoError("all frames of a video must have the same size")
        t0 = state["pairs"]
        state["pairs"] += grid[0]
        state["grid"] = grid
        return embd, t0, t0 + grid[0]

    def rate():
        return fps or sampled_fps(state["times"])

    pending, buf = None, []

    def add(item, last):
        embd, t_begin, t_end = item
        _, h, w = state["grid"]
        pos, _ = _core.mrope_run_positions(t_end, h, w, merge=media.merge, video=True, seconds_per_grid=2.0 / rate(),
                                           tokens_per_second=media.tokens_per_second, text_after=text_after,
                                           start=len(sink), t_begin=t_begin, t_end=t_end)
        p.add_chunk_embd(np.ascontiguousarray(embd, dtype=np.float32), n_frames=t_end - t_begin, is_last=last,
                         pos=np.ascontiguousarray(pos))

    with progress_scope(progress) as prog:  # None, False, True or a callable, as Session.prefill takes
        for frame in vid.frames(progress=lambda done, total: prog.update("decode", done, total)):
            buf.append(frame.rgb)
            state["times"].append(frame.timestamp_s)
            if len(buf) == chunk_frames:
                if pending is not None:
                    add(pending, False)
                pending, buf = encode(buf), []
        if buf:
            if pending is not None:
                add(pending, False)
            pending = encode(buf)
        if pending is None:
            raise VideoError(f"no frames could be read from {video!r}")
        add(pending, True)
    _, h, w = state["grid"]
    _, text_pos = _core.mrope_run_positions(state["pairs"], h, w, merge=media.merge, video=True,
                                            seconds_per_grid=2.0 / rate(), tokens_per_second=media.tokens_per_second,
                                            text_after=text_after, start=len(sink), t_begin=0, t_end=state["pairs"])
    p.set_text_position(int(text_pos))
    stats = p.stats()
    ctx = VideoContext(session, p.finish(), **context_kwargs(session, system),
                       **opts.question_kwargs())
    ctx.prefill_stats = stats
    return ctx
