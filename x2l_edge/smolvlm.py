"""SmolVLM2 / Idefics3 (llama.cpp's clip.projector_type idefics3; docs/families.md §5): frame
preprocessing, the timestamped video prompt, and the full-KV and X²L answer paths.

The tower is _core.VisionEncoder with the pixel-shuffle projector (cpp/vision/vision.h); the LLM is the
llama path with 1-D positions, so every frame's text ("\\nFrame from MM:SS:" and the image wrapper
tokens) and its image rows simply follow each other: a frame becomes one run of input embeddings,
text rows looked up with LlmSession.embed_tokens (the rows eval() would feed) and image rows from the
tower. The layout is transformers' SmolVLMProcessor's (replace_video_token), the prompt around it
transformers' SmolVLM DEFAULT_CHAT_TEMPLATE, which transformers uses for every video prompt whatever
the checkpoint's own template says:

    <|im_start|>[System: {system}<end_of_utterance>\\n]User: You are provided the following series of
    {N in words} frames from a {H:MM:SS} [H:MM:SS] video.\\n
    \\nFrame from {MM:SS}:<fake_token_around_image><global-img><image>*T<fake_token_around_image>  (per frame)
    \\n\\n{question}<end_of_utterance>\\nAssistant:
"""
from __future__ import annotations

import os
from datetime import timedelta

import numpy as np

VIDEO_FPS = 1.0            # SmolVLM2's video_sampling: 1 frame per second ...
VIDEO_MAX_FRAMES = 64      # ... at most 64 frames
MAX_IMAGE_SIZE = 4096      # transformers' cap on the longest edge
FAKE = "<fake_token_around_image>"
GLOBAL = "<global-img>"
IMAGE = "<image>"
END = "<end_of_utterance>"
SPECIALS = (FAKE, GLOBAL, IMAGE, END)
FAMILY_NAME = "SmolVLM2 / Idefics3"
LIVE_REFUSAL = "the prompt names the frame count and duration before the first frame, which a live source does not know"

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_words(n: int) -> str:
    """The frame count in English as num2words writes it (what SmolVLMProcessor puts in the prompt):
    21 -> 'twenty-one', 342 -> 'three hundred and forty-two', 1100 -> 'one thousand, one hundred';
    0 <= n < 10**6."""
    if not 0 <= n < 10 ** 6:
        raise ValueError(f"{n} frames: number words are written for 0..999999")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("-" + _ONES[n % 10] if n % 10 else "")
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + (" and " + number_words(rest) if rest else "")
    rest = n % 1000
    head = number_words(n // 1000) + " thousand"
    if not rest:
        return head
    return head + (" and " if rest < 100 else ", ") + number_words(rest)


# ----------------------------------------------------------------------------- preprocessing


def resize_frame(rgb: np.ndarray, side: int, longest_edge: int | None = None) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [side, side, 3] as SmolVLM2 prepares a video frame: the longest edge to
    `longest_edge` (default `side`) keeping the aspect ratio (the other side truncated, then made
    even), then stretched to side x side (videos are never tiled); both steps LANCZOS, Pillow-exact,
    uint8 in between (transformers' SmolVLMImageProcessorPil with do_image_splitting=False)."""
    from .video.resize import pil_resize

    h, w = rgb.shape[:2]
    edge = min(MAX_IMAGE_SIZE, int(longest_edge or side))
    aspect = w / h
    if w >= h:
        nw, nh = edge, int(edge / aspect)
        nh += nh % 2
    else:
        nh, nw = edge, int(edge * aspect)
        nw += nw % 2
    nh, nw = max(nh, 1), max(nw, 1)
    x = pil_resize(rgb, (nw, nh), "lanczos")
    return pil_resize(x, (side, side), "lanczos")


def preprocess(frames, side: int, mean, std, longest_edge: int | None = None) -> np.ndarray:
    """RGB uint8 frames [H0, W0, 3] -> float32 [F, 3, side, side]: resize_frame, then x / 255, then
    (x - mean) / std per channel."""
    from .video.preprocess import _check_vec3, _norm_lut

    lut = _norm_lut(_check_vec3("mean", mean), _check_vec3("std", std))
    out = np.empty((len(frames), 3, side, side), dtype=np.float32)
    for i, rgb in enumerate(frames):
        u8 = resize_frame(np.asarray(rgb), side, longest_edge)
        for c in range(3):
            np.take(lut[c], u8[:, :, c], out=out[i, c])
    return out


# ----------------------------------------------------------------------------- prompt text


def video_intro(n_frames: int, duration_s: float) -> str:
    return (f"You are provided the following series of {number_words(n_frames)} frames from a "
            f"{timedelta(seconds=int(duration_s))} [H:MM:SS] video.\n")


def frame_head(timestamp_s: float) -> str:
    """The text before one frame's image tokens."""
    return f"\nFrame from {int(timestamp_s // 60):02d}:{int(timestamp_s % 60):02d}:{FAKE}{GLOBAL}"


def video_text(timestamps_s, duration_s: float, tokens_per_frame: int) -> str:
    """What SmolVLMProcessor puts in place of one <video>: the intro, each frame's head + <image> x T + the
    closing wrapper token, then '\\n\\n'."""
    text = video_intro(len(timestamps_s), duration_s)
    for t in timestamps_s:
        text += frame_head(t) + IMAGE * tokens_per_frame + FAKE
    return text + "\n\n"


def prompt_head(n_frames: int, duration_s: float, system: str | None = None) -> str:
    """The prompt up to the first frame (the X²L sink)."""
    sys_turn = "" if system is None else f"System: {system}{END}\n"
    return f"<|im_start|>{sys_turn}User: " + video_intro(n_frames, duration_s)


QUESTION_PREFIX = "\n\n"
QUESTION_SUFFIX = f"{END}\nAssistant:"


def prompt_text(question: str, timestamps_s, duration_s: float, tokens_per_frame: int,
                system: str | None = None) -> str:
    """The whole single-turn video prompt with <image> placeholders (as the processor builds it)."""
    sys_turn = "" if system is None else f"System: {system}{END}\n"
    return (f"<|im_start|>{sys_turn}User: " + video_text(timestamps_s, duration_s, tokens_per_frame) + question
            + QUESTION_SUFFIX)


# ----------------------------------------------------------------------------- frames -> embeddings


class SmolMedia:
    """Encodes frames with the session's tower and lays them out with their timestamps."""

    def __init__(self, session):
        self.s = session
        self.enc = session.vision
        cfg = self.enc.config
        if cfg.get("projector") != "pixel_shuffle":
            raise ValueError(f"{session.vision_path} is not an idefics3 (SmolVLM) vision file")
        self.side = cfg["image_size"]
        self.tokens_per_frame = cfg["tokens_per_frame"]
        self.mean, self.std = cfg["image_mean"], cfg["image_std"]
        # SmolVLM2's video_sampling.video_size.longest_edge equals the tower's side in the released models.
        self.longest_edge = int(session._vision_meta("x2l.video.frame_size", self.side))
        self.fake_ids = session.tokenize(FAKE)

    def encode(self, frames) -> np.ndarray:
        """RGB uint8 frames -> image rows [F * tokens_per_frame, n_embd]."""
        px = preprocess(frames, self.side, self.mean, self.std, self.longest_edge)
        return self.enc.encode(px, session=self.s._s)  # the session's cancel stops it between layers

    def frames_embd(self, rows: np.ndarray, timestamps_s) -> np.ndarray:
        """Image rows of len(timestamps_s) frames -> the input embeddings of those frames' prompt part:
        per frame embed(frame_head) + its image rows + embed(<fake_token_around_image>)."""
        T = self.tokens_per_frame
        if len(rows) != T * len(timestamps_s):
            raise ValueError(f"{len(rows)} image rows for {len(timestamps_s)} frames of {T} tokens")
        heads = [self.s.tokenize(frame_head(t)) for t in timestamps_s]
        text = self.s._s.embed_tokens([i for h in heads for i in h] + self.fake_ids)
        fake = text[len(text) - len(self.fake_ids):]
        parts, at = [], 0
        for f, h in enumerate(heads):
            parts += [text[at:at + len(h)], rows[f * T:(f + 1) * T], fake]
            at += len(h)
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def default_sampling(video, max_frames, fps):
    """(max_frames, fps) as this family samples `video`: a file with neither is sampled as SmolVLM2
    samples, 1 frame per second, at most 64 (open_sampled applies the processor's rule)."""
    if max_frames is None and fps is None and isinstance(video, (str, os.PathLike)):
        fps, max_frames = VIDEO_FPS, VIDEO_MAX_FRAMES
    return max_frames, fps


# The processor skips this much at each end of a video long enough to sample without it.
SKIP_SECONDS = 1.0


def processor_indices(n_frames: int, source_fps: float, *, max_frames: int = VIDEO_MAX_FRAMES,
                      fps: float = VIDEO_FPS, skip_s: float = SKIP_SECONDS) -> np.ndarray:
    """The source frames SmolVLM2's video processor samples (transformers' SmolVLMVideoProcessor
    .sample_frames, written from its rule): round(fps x duration) frames, at most max_frames and at least
    one, spread by an integer linspace over [first, last]; the video's first and last skip_s seconds
    are left out when the video minus both skips is longer than max_frames x fps (frame counts and
    seconds compared as the processor does); repeated indices are merged."""
    if n_frames < 1 or not source_fps > 0:
        raise ValueError("a video with frames and a known frame rate is needed")
    duration = n_frames / source_fps
    want = max(1, min(int(round(fps * duration)), int(max_frames)))
    first, last = 0, n_frames - 1
    if skip_s > 0 and duration - 2 * skip_s > max_frames * fps:
        first, last = int(skip_s * source_fps), int(n_frames - skip_s * source_fps)
    first, last = max(0, first), min(last, n_frames - 1)
    if first >= last:
        first, last = 0, n_frames - 1
    return np.unique(np.linspace(first, last, want, dtype=int)).astype(np.int64)


def open_sampled(video, max_frames=None, fps=None):
    """The Video this family reads: with a sampling rate (given, or SmolVLM2's 1 fps default for a file),
    the processor's frames (processor_indices, max_frames defaulting to 64) of a source whose length
    and frame rate are known; otherwise open_video's sampling (max_frames alone: uniform)."""
    from .video import open_video

    max_frames, fps = default_sampling(video, max_frames, fps)
    if fps is None:
        return open_video(video, max_frames=max_frames)
    limit = int(max_frames or VIDEO_MAX_FRAMES)
    # Opened with a frame budget so that a file's frame count is checked against its last frame.
    vid = open_video(video, max_frames=limit)
    if vid.n_frames_total is None or not vid.fps:
        vid.close()
        return open_video(video, max_frames=max_frames, fps=fps)  # unknown length or rate: time-based sampling
    # The plan Video iterates (sample_indices) becomes the processor's.
    vid.sample_indices = processor_indices(vid.n_frames_total, vid.fps, max_frames=limit, fps=fps)
    return vid


def whole_chunk_frames(chunk_frames: int) -> int:
    """Frames per X²L chunk as this family prefills them: any count."""
    return chunk_frames


SAVES_INDEX = True


def context_kwargs(session=None, system: str | None = None) -> dict:
    """VideoContext's question_prefix / question_suffix for an index of this family (the same for every
    session and system message: the question follows the last frame)."""
    return {"question_prefix": QUESTION_PREFIX, "question_suffix": QUESTION_SUFFIX}


def _open(video, max_frames, fps):
    """The sampled Video (open_sampled's rule)."""
    return open_sampled(video, max_frames, fps)


def _timestamps(frames, default_fps: float) -> list[float]:
    """Frame times in seconds; frames without one (an array with no source_fps) count as sampled at
    default_fps from 0."""
    ts = [f.timestamp_s for f in frames]
    if any(t is None for t in ts):
        return [i / default_fps for i in range(len(frames))]
    return [float(t) for t in ts]


def _duration(vid, timestamps) -> float:
    """The processor's rule: the video's duration when known, else the last frame's time."""
    return float(vid.duration_s) if vid.duration_s is not None else float(timestamps[-1])


def _read_all(vid, video):
    frames = list(vid.frames())
    if not frames:
        from .video import VideoError

        raise VideoError(f"no frames could be read from {video!r}")
    return frames


def ask_full(session, video, question: str, *, system=None, max_frames=None, fps=None, chunk_frames=None,
             max_tokens=64, progress=None, stream=False, **sampling):
    """Answer about a video with every visual token in the KV cache (frames sampled as open_sampled does:
    the processor's rule, 1 fps and at most 64 for a file). Frames are encoded and evaluated
    chunk_frames at a time (default 8) so only one group's pixels and activations are held.
    progress: as Session.prefill (steps 'encode' and 'prefill', in frames)."""
    from .generation import generate_ids, stream_text
    from .progress import scope as progress_scope

    group = int(chunk_frames or 8)
    if group < 1:
        raise ValueError("chunk_frames must be >= 1")
    vid = _open(video, max_frames, fps)
    read = _read_all(vid, video)
    ts = _timestamps(read, fps or VIDEO_FPS)
    media = SmolMedia(session)
    session.reset()
    session._s.eval(session.tokenize(prompt_head(len(read), _duration(vid, ts), system)))
    with progress_scope(progress) as prog:
        for a in range(0, len(read), group):
            rows = media.encode([f.rgb for f in read[a:a + group]])
            done = min(a + group, len(read))
            prog.update("encode", done, len(read))
            session._s.eval_embd(media.frames_embd(rows, ts[a:done]))
            prog.update("prefill", done, len(read))
    ids = list(session._s.history) + session.tokenize(QUESTION_PREFIX + question + QUESTION_SUFFIX)
    gen = generate_ids(session._s, ids, stop_ids=session._stop_ids, max_tokens=max_tokens, **sampling)
    it = stream_text(session._tok, gen, [])
    return it if stream else "".join(it)


def prefill_video(session, video, *, system=None, chunk_frames=None, max_frames=None, fps=None, progress=None,
                  **x2l_options):
    """X²L bi-level prefill of a video on a SmolVLM2 / Idefics3 model: the sink is the prompt up to the
    first frame (it names the frame count and duration, so a source of unknown length is read first);
    each chunk is chunk_frames frames, each with its timestamp text and wrapper tokens around its image
    rows; the question ('\\n\\n' + question + '<end_of_utterance>\\nAssistant:') follows the last frame.
    Returns a VideoContext."""
    from .options import X2LOptions
    from .progress import scope as progress_scope
    from .x2l import VideoContext, prefill_chunks

    opts = X2LOptions.for_model(session, video=True, **x2l_options)
    if opts.compressor == "beacon":
        raise ValueError("SmolVLM2 models have no beacon tokens: use compressor 'snapkv', 'kvzip', 'keydiff' or 'hybrid'")
    chunk_frames = int(chunk_frames or opts.chunk_frames)
    if chunk_frames < 1:
        raise ValueError("chunk_frames must be >= 1")
    vid = _open(video, max_frames, fps)
    media = SmolMedia(session)
    if vid.n_samples is None or vid.duration_s is None:
        frames = _read_all(vid, video)  # the sink needs the count (and duration) before the first chunk
        n_frames, source = len(frames), iter(frames)
        ts_all = _timestamps(frames, fps or VIDEO_FPS)
        duration = _duration(vid, ts_all)
    else:
        n_frames, source, ts_all = vid.n_samples, None, None
        duration = float(vid.duration_s)
    sink = session.tokenize(prompt_head(n_frames, duration, system))

    with progress_scope(progress) as prog:
        def chunks():
            it = source if source is not None else vid.frames()
            buf, done = [], 0

            def flush():
                nonlocal done
                ts = (ts_all[done:done + len(buf)] if ts_all is not None
                      else [f.timestamp_s if f.timestamp_s is not None else (done + i) / (fps or VIDEO_FPS)
                            for i, f in enumerate(buf)])
                rows = media.encode([f.rgb for f in buf])
                done += len(buf)
                prog.update("encode", done, n_frames)
                return media.frames_embd(rows, ts)

            for frame in it:
                buf.append(frame)
                if len(buf) == chunk_frames:
                    yield flush()
                    buf = []
            if buf:
                yield flush()
            if done == 0:
                from .video import VideoError

                raise VideoError(f"no frames could be read from {video!r}")

        index, stats = prefill_chunks(session, chunks(), sink_ids=sink, n_chunks=-(-n_frames // chunk_frames),
                                      frames_per_chunk=chunk_frames, options=opts, progress=prog)
    ctx = VideoContext(session, index, **context_kwargs(session), **opts.question_kwargs())
    ctx.prefill_stats = stats
    return ctx
