"""InternVL 2.5 / 3 (llama.cpp's clip.projector_type internvl; docs/families.md §6): frame preprocessing, the
video prompt, and the full-KV and X²L answer paths.

The tower is _core.VisionEncoder's InternViT + pixel shuffle + MLP projector (cpp/vision/vision.h); the LLM
is the qwen2 path with 1-D positions. A video is what transformers' InternVLProcessor makes of it: every
frame one tile at the tower's size (video frames are never tiled), and in place of the chat template's
`<video>\\n` the frames joined by newlines,

    <|im_start|>[system\\n{system}<|im_end|>\\n<|im_start|>]user\\n
    Frame1: <img><IMG_CONTEXT>*T</img>\\nFrame2: <img>...</img>   (T = tokens per frame, 256 at 448 px)
    \\n{question}<|im_end|>\\n<|im_start|>assistant\\n

Each frame becomes one run of input embeddings: its text ("Frame{i}: <img>", with the newline before it
for i > 1) looked up with LlmSession.embed_tokens, its T image rows from the tower, and "</img>". So an X²L
chunk is whole frames with their text, and the sink (the prompt up to the first frame) does not depend on
the video: frames stream straight from the decoder.
"""
from __future__ import annotations

import os

import numpy as np

VIDEO_MAX_FRAMES = 32   # frames sampled uniformly from a file when neither max_frames nor fps is given
START = "<img>"
END = "</img>"
CONTEXT = "<IMG_CONTEXT>"  # the placeholder the processor repeats T times (the runtime feeds rows instead)
SPECIALS = (START, END)     # what the runtime's layout tokenizes
FAMILY_NAME = "InternVL 2.5 / 3"
SAVES_INDEX = True          # 1-D positions: the index format holds everything
# The prompt would allow it (the sink does not depend on the video); the server's live recorder feeds the
# single-file pipeline's chunks, which lack the frame text.
LIVE_REFUSAL = "the server's live recorder does not lay out InternVL's per-frame text yet"

QUESTION_PREFIX = "\n"
QUESTION_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"


# ----------------------------------------------------------------------------- preprocessing


def preprocess(frames, side: int, mean, std) -> np.ndarray:
    """RGB uint8 frames [H0, W0, 3] -> float32 [F, 3, side, side]: stretched to side x side with Pillow's
    bicubic (one tile, no aspect-preserving crop: GotOcr2ImageProcessor with crop_to_patches=False, and
    OpenGVLab's build_transform), then x / 255 and (x - mean) / std per channel."""
    from .video.preprocess import _check_vec3, _norm_lut
    from .video.resize import pil_resize

    lut = _norm_lut(_check_vec3("mean", mean), _check_vec3("std", std))
    out = np.empty((len(frames), 3, side, side), dtype=np.float32)
    for i, rgb in enumerate(frames):
        u8 = pil_resize(np.asarray(rgb), (side, side), "bicubic")
        for c in range(3):
            np.take(lut[c], u8[:, :, c], out=out[i, c])
    return out


# ----------------------------------------------------------------------------- prompt text


def frame_head(index: int) -> str:
    """The text before frame `index`'s (0-based) image rows: 'Frame{index + 1}: <img>', after a newline for
    every frame but the first."""
    return ("" if index == 0 else "\n") + f"Frame{index + 1}: {START}"


def video_text(n_frames: int, tokens_per_frame: int) -> str:
    """What InternVLProcessor puts in place of one <video>: per frame 'Frame{i}: <img>' + <IMG_CONTEXT> x T
    + '</img>', joined by newlines."""
    return "".join(frame_head(i) + CONTEXT * tokens_per_frame + END for i in range(n_frames))


def prompt_head(system: str | None = None) -> str:
    """The prompt up to the first frame (the X²L sink)."""
    sys_turn = "" if system is None else f"<|im_start|>system\n{system}<|im_end|>\n"
    return sys_turn + "<|im_start|>user\n"


def prompt_text(question: str, n_frames: int, tokens_per_frame: int, system: str | None = None) -> str:
    """The whole single-turn video prompt with <IMG_CONTEXT> placeholders (as the processor builds it)."""
    return prompt_head(system) + video_text(n_frames, tokens_per_frame) + QUESTION_PREFIX + question + QUESTION_SUFFIX


# ----------------------------------------------------------------------------- frames -> embeddings


class InternMedia:
    """Encodes frames with the session's tower and lays them out with their frame numbers."""

    def __init__(self, session):
        self.s = session
        self.enc = session.vision
        cfg = self.enc.config
        if cfg.get("projector") != "shuffle_mlp":
            raise ValueError(f"{session.vision_path} is not an internvl (InternVL) vision file")
        self.side = cfg["image_size"]
        self.tokens_per_frame = cfg["tokens_per_frame"]
        self.mean, self.std = cfg["image_mean"], cfg["image_std"]
        self.end_ids = session.tokenize(END)

    def encode(self, frames) -> np.ndarray:
        """RGB uint8 frames -> image rows [F * tokens_per_frame, n_embd]."""
        px = preprocess(frames, self.side, self.mean, self.std)
        return self.enc.encode(px, session=self.s._s)  # the session's cancel stops it between layers

    def frames_embd(self, rows: np.ndarray, first: int) -> np.ndarray:
        """Image rows of frames first, first + 1, ... -> the input embeddings of those frames' prompt part:
        per frame embed(frame_head) + its image rows + embed('</img>')."""
        T = self.tokens_per_frame
        if len(rows) % T:
            raise ValueError(f"{len(rows)} image rows are not whole frames of {T} tokens")
        n = len(rows) // T
        heads = [self.s.tokenize(frame_head(first + f)) for f in range(n)]
        text = self.s._s.embed_tokens([i for h in heads for i in h] + self.end_ids)
        end = text[len(text) - len(self.end_ids):]
        parts, at = [], 0
        for f, h in enumerate(heads):
            parts += [text[at:at + len(h)], rows[f * T:(f + 1) * T], end]
            at += len(h)
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


# ----------------------------------------------------------------------------- family hooks


def default_sampling(video, max_frames, fps):
    """(max_frames, fps) as this family samples `video`: a file with neither gives VIDEO_MAX_FRAMES frames
    spread uniformly over it (InternVL's prompts carry no timestamps); arrays are taken as they are."""
    if max_frames is None and fps is None and isinstance(video, (str, os.PathLike)):
        max_frames = VIDEO_MAX_FRAMES
    return max_frames, fps


def open_sampled(video, max_frames=None, fps=None):
    """The Video this family reads (default_sampling's rule through open_video)."""
    from .video import open_video

    max_frames, fps = default_sampling(video, max_frames, fps)
    return open_video(video, max_frames=max_frames, fps=fps)


def whole_chunk_frames(chunk_frames: int) -> int:
    """Frames per X²L chunk as this family prefills them: any count."""
    return chunk_frames


def context_kwargs(session=None, system: str | None = None) -> dict:
    """VideoContext's question_prefix / question_suffix for an index of this family (the same for every
    session and system message)."""
    return {"question_prefix": QUESTION_PREFIX, "question_suffix": QUESTION_SUFFIX}


def _open(video, max_frames, fps):
    from .video import open_video

    max_frames, fps = default_sampling(video, max_frames, fps)
    return open_video(video, max_frames=max_frames, fps=fps)


def _groups(vid, video, size: int):
    """Lists of at most `size` decoded frames; VideoError when the source gives none."""
    buf, seen = [], 0
    for frame in vid.frames():
        buf.append(frame.rgb)
        seen += 1
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf
    if seen == 0:
        from .video import VideoError

        raise VideoError(f"no frames could be read from {video!r}")


def ask_full(session, video, question: str, *, system=None, max_frames=None, fps=None, chunk_frames=None,
             max_tokens=64, progress=None, stream=False, **sampling):
    """Answer about a video with every visual token in the KV cache (a file: VIDEO_MAX_FRAMES uniform frames;
    `max_frames` / `fps` as open_video takes them). Frames are encoded and evaluated chunk_frames at a time
    (default 8) so only one group's pixels and activations are held.
    progress: as Session.prefill (steps 'encode' and 'prefill', in frames)."""
    from .generation import generate_ids, stream_text
    from .progress import scope as progress_scope

    group = int(chunk_frames or 8)
    if group < 1:
        raise ValueError("chunk_frames must be >= 1")
    vid = _open(video, max_frames, fps)
    total = vid.n_samples
    media = InternMedia(session)
    session.reset()
    session._s.eval(session.tokenize(prompt_head(system)))
    done = 0
    with progress_scope(progress) as prog:
        for frames in _groups(vid, video, group):
            rows = media.encode(frames)
            prog.update("encode", done + len(frames), total)
            session._s.eval_embd(media.frames_embd(rows, done))
            done += len(frames)
            prog.update("prefill", done, total)
    ids = list(session._s.history) + session.tokenize(QUESTION_PREFIX + question + QUESTION_SUFFIX)
    gen = generate_ids(session._s, ids, stop_ids=session._stop_ids, max_tokens=max_tokens, **sampling)
    it = stream_text(session._tok, gen, [])
    return it if stream else "".join(it)


def prefill_video(session, video, *, system=None, chunk_frames=None, max_frames=None, fps=None, progress=None,
                  **x2l_options):
    """X²L bi-level prefill of a video on an InternVL model: the sink is the prompt up to the first frame;
    each chunk is chunk_frames frames, each with its 'Frame{i}: <img>' text and '</img>'; the question
    ('\\n' + question + '<|im_end|>\\n<|im_start|>assistant\\n') follows the last frame. Returns a
    VideoContext."""
    from .options import X2LOptions
    from .progress import scope as progress_scope
    from .x2l import VideoContext, prefill_chunks

    opts = X2LOptions.for_model(session, video=True, **x2l_options)
    if opts.compressor == "beacon":
        raise ValueError("InternVL models have no beacon tokens: use compressor 'snapkv', 'kvzip' or 'keydiff'")
    chunk_frames = int(chunk_frames or opts.chunk_frames)
    if chunk_frames < 1:
        raise ValueError("chunk_frames must be >= 1")
    vid = _open(video, max_frames, fps)
    total = vid.n_samples
    media = InternMedia(session)
    sink = session.tokenize(prompt_head(system))

    with progress_scope(progress) as prog:
        def chunks():
            done = 0
            for frames in _groups(vid, video, chunk_frames):
                rows = media.encode(frames)
                prog.update("encode", done + len(frames), total)
                yield media.frames_embd(rows, done)
                done += len(frames)

        n_chunks = None if total is None else -(-total // chunk_frames)
        index, stats = prefill_chunks(session, chunks(), sink_ids=sink, n_chunks=n_chunks,
                                      frames_per_chunk=chunk_frames, options=opts, progress=prog)
    ctx = VideoContext(session, index, **context_kwargs(), **opts.question_kwargs())
    ctx.prefill_stats = stats
    return ctx
